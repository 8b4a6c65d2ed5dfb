"""Stale-weight guard: a rewrite derived from a weight follows that weight's later changes."""

import pytest
import torch
from helpers import MLP, CopyWeightPass

import effc
from effc.passes import extra_passes


@pytest.fixture
def compiled_mlp():
    torch.manual_seed(0)
    model = MLP().eval()
    with extra_passes(CopyWeightPass):
        yield model, torch.compile(model, backend="effc", options={"toy_copy": True})


def _check(model, compiled, x):
    with torch.inference_mode():
        out, ref = compiled(x), model(x)
    assert torch.equal(out, ref)
    return out


@pytest.mark.parametrize("change", ["in_place", "load_state_dict", "optimizer_step", "swap_data"])
def test_changed_weight_is_rederived(compiled_mlp, change):
    model, compiled = compiled_mlp
    x = torch.randn(5, 16)
    before = _check(model, compiled, x)
    if change == "in_place":
        with torch.no_grad():
            model.fc2.weight.mul_(-2.0)
    elif change == "load_state_dict":
        state = {k: v + 0.5 for k, v in model.state_dict().items()}
        model.load_state_dict(state)
    elif change == "optimizer_step":
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        model(x).sum().backward()
        opt.step()
    else:
        model.head.weight.data = torch.randn_like(model.head.weight)
    after = _check(model, compiled, x)  # equals eager with the new weights
    assert not torch.equal(after, before)
    graph = effc.report().graphs[-1]
    assert graph.rederivations == 1 and "re-derived" in graph.notes[-1]
    assert [s.site for s in graph.sites] == ["fc1.weight", "fc2.weight", "head.weight"]
    _check(model, compiled, x)
    assert graph.rederivations == 1  # unchanged weights: no second re-derivation


def test_unchanged_weights_are_not_rederived(compiled_mlp):
    model, compiled = compiled_mlp
    for _ in range(3):
        _check(model, compiled, torch.randn(3, 16))
    assert effc.report().graphs[-1].rederivations == 0


def test_without_the_guard_the_constants_would_be_stale(compiled_mlp, monkeypatch):
    """Shows the guard is what keeps outputs right: switch it off and the old copy is used."""
    import effc.compiler.backend as backend

    model, compiled = compiled_mlp
    x = torch.randn(5, 16)
    _check(model, compiled, x)
    monkeypatch.setattr(backend, "stale", lambda stamps, args: [])
    with torch.no_grad():
        model.fc1.weight.mul_(3.0)
    with torch.inference_mode():
        assert not torch.equal(compiled(x), model(x))


def test_two_instances_sharing_a_compiled_graph_do_not_rederive_every_call():
    """Same class, equal options: Dynamo reuses one compiled graph for both instances."""
    torch.manual_seed(0)
    a, b = MLP().eval(), MLP().eval()
    x = torch.randn(5, 16)
    with extra_passes(CopyWeightPass):
        ca = torch.compile(a, backend="effc", options={"toy_copy": True})
        cb = torch.compile(b, backend="effc", options={"toy_copy": True})
        for _ in range(3):
            _check(a, ca, x)
            _check(b, cb, x)
    graphs = effc.report().graphs
    assert len(graphs) == 1  # one graph serves both
    assert graphs[0].rederivations == 1  # b's first call; later switches reuse derivations
