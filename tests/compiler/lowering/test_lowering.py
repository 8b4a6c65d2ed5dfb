"""Lowering: eager is exact; inductor runs the same graph within float tolerance; option values.

The Triton lowering itself is tested in test_triton_lowering.py."""

import pytest
import torch
from helpers import MLP, CopyWeightPass

import effc
from effc.compiler.lowering import resolve
from effc.passes import extra_passes


@pytest.mark.slow
def test_inductor_lowering_matches_eager_with_a_pass_on():
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(9, 16)
    with extra_passes(CopyWeightPass), torch.no_grad():
        out = torch.compile(model, backend="effc",
                            options={"lowering": "inductor", "toy_copy": True})(x)
        ref = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = effc.report().graphs[-1]
    assert g.lowering == "inductor" and g.passes[0].counters["rewritten"] == 3


def test_auto_is_eager_on_cpu():
    model = MLP().eval()
    x = torch.randn(2, 16)
    with torch.no_grad():
        assert torch.equal(torch.compile(model, backend="effc", options={"lowering": "auto"})(x),
                           model(x))
    assert effc.report().graphs[-1].lowering == "eager"


def test_auto_is_eager_on_every_device_until_triton_is_validated_on_gpu():
    assert resolve("auto", torch.device("cpu")) == "eager"
    assert resolve("auto", None) == "eager"
    assert resolve("auto", torch.device("cuda")) == "eager"
    for explicit in ("eager", "inductor", "triton"):
        assert resolve(explicit, torch.device("cuda")) == explicit


def test_triton_is_accepted_and_unknown_lowerings_are_not():
    assert effc.Config.from_options({"lowering": "triton"}, env={}).lowering == "triton"
    assert effc.Config.from_options({}, env={"EFFC_LOWERING": "triton"}).lowering == "triton"
    with pytest.raises(ValueError, match="'lowering'.*'auto', 'eager', 'inductor', 'triton'"):
        effc.Config.from_options({"lowering": "tpu"}, env={})
