"""With no pass enabled, effc must give exactly eager's numbers: outputs and gradients."""

import copy

import pytest
import torch
from helpers import MLP, BrokenMLP, SmallCNN, first_tensor, hf_model

import effc

HF = ["bert", "gpt2", "llama", "vit"]


def _model_and_inputs(kind):
    torch.manual_seed(0)
    if kind == "mlp":
        return MLP(), {"x": torch.randn(7, 16)}
    if kind == "cnn":
        return SmallCNN(), {"x": torch.randn(3, 1, 12, 12)}
    return hf_model(kind)


@pytest.mark.parametrize("kind", ["mlp", "cnn", *HF])
def test_passes_off_bit_identical_under_inference_mode(kind):
    model, inputs = _model_and_inputs(kind)
    model.eval()
    compiled = torch.compile(model, backend="effc")
    with torch.inference_mode():
        ref = first_tensor(model(**inputs))
        out = first_tensor(compiled(**inputs))
    assert out.shape == ref.shape and torch.equal(out, ref)
    assert any(g.nodes_before > 0 for g in effc.report().graphs)


@pytest.mark.parametrize("kind", ["mlp", "cnn", *HF])
def test_passes_off_training_step_gives_identical_gradients(kind):
    model, inputs = _model_and_inputs(kind)
    model.train()
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, backend="effc")
    first_tensor(model(**inputs)).float().pow(2).mean().backward()
    first_tensor(compiled(**inputs)).float().pow(2).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    twin_grads = {n: p.grad for n, p in twin.named_parameters() if p.grad is not None}
    assert grads.keys() == twin_grads.keys() and len(grads) > 0
    for name, g in grads.items():
        assert torch.equal(g, twin_grads[name]), name
    for (name, b), (_, tb) in zip(model.named_buffers(), twin.named_buffers()):
        assert torch.equal(b, tb), name  # BatchNorm running stats updated identically


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("dynamic", [True, None])
def test_two_sequence_lengths_bit_identical(kind, dynamic):
    model, _ = hf_model(kind)
    model.eval()
    compiled = torch.compile(model, backend="effc", dynamic=dynamic)
    with torch.no_grad():
        for length in (5, 11):
            ids = torch.randint(0, 96, (2, length))
            assert torch.equal(first_tensor(compiled(input_ids=ids)), first_tensor(model(input_ids=ids)))
    if dynamic:
        symints = [g.inputs["symint"] for g in effc.report().graphs]
        assert any(n > 0 for n in symints), "dynamic=True should hand effc SymInt inputs"


def test_graph_break_gives_two_graphs_and_identical_output():
    effc.reset()
    torch.manual_seed(0)
    model = BrokenMLP().eval()
    compiled = torch.compile(model, backend="effc")
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert torch.equal(compiled(x), model(x))
    assert len(effc.report().graphs) == 2


def test_mode_is_rejected_with_a_clear_error():
    compiled = torch.compile(MLP(), backend="effc", mode="max-autotune")
    with pytest.raises(Exception, match="mode"):
        compiled(torch.randn(2, 16))


def test_bad_options_surface_as_value_error_at_compile():
    compiled = torch.compile(MLP(), backend="effc", options={"lowrank": True})
    with pytest.raises(Exception) as info:
        compiled(torch.randn(2, 16))
    chain = [info.value] + [e for e in (info.value.__cause__, info.value.__context__) if e]
    assert any(isinstance(e, ValueError) and "'lowrank'" in str(e) for e in chain)
