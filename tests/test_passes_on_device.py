"""Each pass on the test device: scripts/gpu_check.sh runs this with EFFC_TEST_DEVICE=cuda.

A pass that builds a constant on the wrong device passes every CPU test and breaks every GPU
model (token_skip's router did, found on an H200). Here small Llama, BERT and ViT models (the
Llama with dynamic=True too) are compiled strict with each pass on DEVICE: the pass must rewrite sites there, and the model's error against its own
eager output must be what the same pass gives on the CPU (the rewrites are fitted from the
same weights; SVD signs, summation order and TF32-free GPU arithmetic differ only in
rounding). On a CPU run both sides are the CPU, computed once, and the strict compile and the
site counts are what is checked.
"""

import pytest
import torch
from helpers import hf_model
from lowering_helpers import DEVICE, no_tf32  # noqa: F401 (fixture)

import effc

pytestmark = pytest.mark.usefixtures("no_tf32")

PASSES = {
    "low_rank": {"low_rank": {"rank_ratio": 0.5}},
    "hypercomplex": {"hypercomplex": {"max_error": 1.0}},
    "shift_add": {"shift_add": {"terms": 2}},
    "token_skip": {"token_skip": {"capacity": 0.5, "layers": [0, 1],
                                  "blocks": ["mlp", "attention"]}},
    # whole layers: Mixture-of-Depths proper, in the Llama at batch 2 (a marked cache)
    "token_skip_layers": {"token_skip": {"capacity": 0.5, "layers": [0, 1],
                                         "blocks": ["layer"]}},
}


def _relative_error(device: torch.device, options: dict, kind: str = "llama",
                    dynamic: bool = False) -> tuple[float, int]:
    """(relative error of the compiled model's output against its eager one, sites the
    pass rewrote), with the model and inputs on `device`."""
    model, inputs = hf_model(kind)
    model = model.eval().to(device)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    torch._dynamo.reset()
    effc.reset()
    main = lambda out: out[0]  # noqa: E731  (logits, or an encoder's last hidden state)
    with torch.no_grad():
        ref = main(model(**inputs))
        out = main(torch.compile(model, backend="effc", dynamic=dynamic, options={
            "strict": True, **options})(**inputs))
    assert out.device == ref.device == device and torch.isfinite(out).all()
    (name,) = options
    rewritten = sum(s.decision == "rewritten" for s in effc.report().sites
                    if s.pass_name == name)
    return ((out - ref).norm() / ref.norm()).item(), rewritten


@pytest.mark.parametrize("name,kind,dynamic", [
    (name, kind, dynamic) for name in PASSES
    for kind, dynamic in [("llama", False), ("bert", False), ("vit", False), ("llama", True)]
    if not (name == "token_skip_layers" and kind == "bert")])  # post-norm: no layer sites
def test_each_pass_rewrites_on_the_test_device_as_on_the_cpu(name, kind, dynamic):
    on_device, rewritten = _relative_error(DEVICE, PASSES[name], kind, dynamic)
    on_cpu, rewritten_cpu = (_relative_error(torch.device("cpu"), PASSES[name], kind, dynamic)
                             if DEVICE.type != "cpu" else (on_device, rewritten))
    assert rewritten >= 2 and rewritten == rewritten_cpu
    assert on_device == pytest.approx(on_cpu, rel=0.05, abs=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_projected_cache_generates_on_the_test_device_as_on_the_cpu(kind):
    """effc.kv_cache and the kv_proj pass: bases from a calibration on DEVICE, compiled
    generation on DEVICE picks the CPU's tokens. GPT-2's prefill folds every basis into its
    projections (the fused c_attn rebuilt in the graph)."""
    sequences = {}
    for device in dict.fromkeys((DEVICE, torch.device("cpu"))):  # once on a CPU run
        model, inputs = hf_model(kind)
        model = model.eval().to(device)
        ids = inputs["input_ids"].to(device)
        calib = effc.calibrate(model, [ids], what=("inputs", "kv"), progress=False)
        cache = effc.kv_cache(model, calib, ratio=0.5, keys="pca")
        torch._dynamo.reset()
        effc.reset()
        forward = model.forward
        model.forward = torch.compile(forward, backend="effc",
                                      options={"strict": True, "kv_proj": True})
        try:
            with torch.inference_mode():
                out = model.generate(ids, cache=cache, max_new_tokens=4, do_sample=False,
                                     pad_token_id=0)
        finally:
            model.forward = forward
        rows = [s for s in effc.report().sites if s.pass_name == "kv_proj"]
        assert sum(s.decision == "rewritten" for s in rows) >= 2
        if kind == "gpt2":
            assert rows[0].details["folded"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
        assert cache.layers[0].values.device == device
        sequences[device.type] = out.cpu()
    assert torch.equal(sequences[DEVICE.type], sequences["cpu"])


def _projected_attention(device: torch.device, kind: str) -> tuple[float, int]:
    """kv_proj on attention without a cache (a calibration on `device`, ratio 0.5):
    (relative error of the output against eager, attentions rewritten)."""
    model, inputs = hf_model(kind)
    model = model.eval().to(device)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    calib = effc.calibrate(model, [inputs], what=("inputs", "kv"), progress=False)
    torch._dynamo.reset()
    effc.reset()
    with torch.no_grad():
        ref = model(**inputs).last_hidden_state
        out = torch.compile(model, backend="effc", options={
            "strict": True, "kv_proj": {"ratio": 0.5}, "calibration": calib})(
            **inputs).last_hidden_state
    assert out.device == device and torch.isfinite(out).all()
    rewritten = sum(s.decision == "rewritten" for s in effc.report().sites
                    if s.pass_name == "kv_proj")
    return ((out - ref).norm() / ref.norm()).item(), rewritten


@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_attention_without_a_cache_is_projected_on_the_test_device_as_on_the_cpu(kind):
    """The bases and the weights folded with them are constants made at compile time: they
    must be made on the model's device, and give the CPU's error."""
    on_device, rewritten = _projected_attention(DEVICE, kind)
    on_cpu, rewritten_cpu = (_projected_attention(torch.device("cpu"), kind)
                             if DEVICE.type != "cpu" else (on_device, rewritten))
    assert rewritten >= 2 and rewritten == rewritten_cpu
    assert on_device == pytest.approx(on_cpu, rel=0.05, abs=1e-5)
