"""Error measures: exact values on hand-checkable inputs."""

import math

import pytest
import torch

from effc.compiler.metrics import error_stats, sqnr_db


def test_identical_tensors():
    x = torch.randn(10)
    s = error_stats(x, x.clone())
    assert s["max_abs"] == 0 and s["rel_fro"] == 0 and s["cosine"] == pytest.approx(1.0)
    assert s["sqnr_db"] == math.inf


def test_known_values():
    ref = torch.tensor([3.0, 4.0])           # norm 5
    out = torch.tensor([3.0, 4.5])           # diff norm 0.5
    s = error_stats(ref, out)
    assert s["max_abs"] == pytest.approx(0.5)
    assert s["rel_fro"] == pytest.approx(0.1)
    assert s["sqnr_db"] == pytest.approx(20.0)
    assert s["cosine"] == pytest.approx((9 + 18) / (5 * math.hypot(3, 4.5)))


def test_opposite_and_shape_mismatch():
    x = torch.randn(4, 3)
    assert error_stats(x, -x)["cosine"] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        error_stats(x, x.T)
    assert sqnr_db(0.0, 1.0) == -math.inf
