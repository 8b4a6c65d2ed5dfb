"""Power-of-two math: codes, packing, exact round trips, error falling with terms, GPTQ rounding."""

import pytest
import torch

from effc.compiler.metrics import matrix_rel_error as rel_error
from effc.passes.shift_add_math import (ZERO_CODE, decode, encode, exact_codes, fit, lut,
                                        nearest, pack, unpack)


def test_levels_and_nearest_rounding():
    assert lut().tolist() == [1, .5, .25, .125, .0625, .03125, .015625, 0,
                              -1, -.5, -.25, -.125, -.0625, -.03125, -.015625, 0]
    r = torch.tensor([0.0, 0.3, -0.7, 0.01, 0.005, 3.0, -1e-9], dtype=torch.float64)
    values = lut()[nearest(r).long()]
    for x, v in zip(r.tolist(), values.tolist()):   # v is the nearest level to x
        assert min(abs(x - level) for level in lut().tolist()) == pytest.approx(abs(x - v))
    assert nearest(torch.zeros(1, dtype=torch.float64)).item() == ZERO_CODE


@pytest.mark.parametrize("n", [7, 8, 33])
def test_pack_round_trip_and_two_codes_per_byte(n):
    codes = torch.randint(0, 16, (3, 5, n), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(n))
    packed = pack(codes)
    assert packed.shape == (3, 5, (n + 1) // 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack(packed, n), codes)


@pytest.mark.parametrize("terms", [1, 2, 3])
def test_weights_that_are_sums_of_powers_of_two_round_trip_exactly(terms):
    g = torch.Generator().manual_seed(terms)
    codes = torch.randint(0, 16, (terms, 12, 20), dtype=torch.uint8, generator=g)
    codes[0, :, 0] = 0                        # every row holds a +1, so max|w| / s = 1
    scale = torch.rand(12, 1, generator=g, dtype=torch.float64) + 0.5
    w = decode(codes) * scale
    found = exact_codes(w.float(), max_terms=3)
    assert found is not None and found.terms <= terms
    assert rel_error(w, found.matrix(), None) < 1e-6
    dense = torch.randn(12, 20, generator=g)
    assert exact_codes(dense) is None


def test_error_falls_with_terms_and_greedy_codes_decode_to_the_fit():
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = [rel_error(w, fit(w, t).matrix(), None) for t in (1, 2, 3)]
    assert errors[0] > 2 * errors[1] > 4 * errors[2] > 0, errors
    assert errors[1] < 0.05                           # 8 bits per weight
    x = torch.rand(10, dtype=torch.float64)
    assert torch.allclose(decode(encode(x, 3)), x, atol=2 ** -6)


def test_group_scales_lower_the_error_and_cost_their_bytes():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    w[:, :8] *= 20                                    # a few loud input columns
    row, grouped = fit(w, 2), fit(w, 2, group=8)
    assert rel_error(w, grouped.matrix(), None) < 0.8 * rel_error(w, row.matrix(), None)
    assert row.bytes(4) == 2 * 32 * 32 + 32 * 4
    assert grouped.bytes(4) == 2 * 32 * 32 + 32 * 8 * 4


def test_output_aware_rounding_lowers_the_output_error_on_the_calibration_inputs():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(40, 64, generator=g, dtype=torch.float64)
    mix = torch.randn(64, 64, generator=g, dtype=torch.float64)
    x = torch.randn(4000, 64, generator=g, dtype=torch.float64) @ mix * torch.logspace(-1, 1, 64)
    c = x.T @ x / x.shape[0]
    for terms in (1, 2):
        plain, aware = fit(w, terms), fit(w, terms, moment=c)
        measured = {k: ((x @ (w - f.matrix()).T).norm() / (x @ w.T).norm()).item()
                    for k, f in (("plain", plain), ("aware", aware))}
        assert measured["aware"] < 0.8 * measured["plain"], (terms, measured)
        assert rel_error(w, aware.matrix(), c) == pytest.approx(measured["aware"], rel=1e-6)
