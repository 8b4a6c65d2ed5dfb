"""Hugging Face `generate()` with an effc-compiled forward: the decode loop users run.

Prefill and decode steps compile to different graphs (and the cache objects are graph
inputs); with the static cache, the cache update is an in-place `index_copy_` into a graph
input, which the Triton lowering must leave eager without moving any kernel across it.

Tolerances: passes off with lowering="eager" runs the captured graph as is: scores equal
those of torch's own `backend="eager"` bit for bit. (That one is the reference, not the
uncompiled model: with the static cache, transformers takes other code paths under Dynamo,
and even torch's eager backend differs from the uncompiled model by 1 ulp, 4e-8 measured.)
With lowering="triton" the kernels sum fp32 in another order (measured ~3e-7 relative, see
test_triton_lowering): scores within 1e-5 of max|score|. The greedy tokens equal the
uncompiled model's in every case (no step has a near-tie: the score gap is asserted).
"""

import pytest
import torch
import transformers as tf
from lowering_helpers import DEVICE

import effc

NEW_TOKENS = 6


def _llama():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    model = tf.LlamaForCausalLM(cfg).eval().to(DEVICE)
    ids = torch.randint(3, 96, (2, 7), device=DEVICE)
    return model, ids


def _generate(model, ids, cache):
    kwargs = {"cache_implementation": cache} if cache else {}
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.scores)


def _top2_gap(scores):
    top = scores.float().topk(2, dim=-1).values
    return (top[..., 0] - top[..., 1]).min().item()


@pytest.mark.slow
@pytest.mark.parametrize("cache", [None, "static"], ids=["dynamic_cache", "static_cache"])
@pytest.mark.parametrize("lowering", ["eager", "triton"])
def test_generate_with_passes_off_gives_the_same_tokens(lowering, cache):
    model, ids = _llama()
    ref_tokens, ref_scores = _generate(model, ids, cache)
    assert _top2_gap(ref_scores) > 1e-3  # no near-tie that 1e-5 could flip
    forward = model.forward
    model.forward = torch.compile(forward, backend="eager")
    _, ref_scores = _generate(model, ids, cache)
    effc.reset()
    torch._dynamo.reset()
    model.forward = torch.compile(forward, backend="effc", options={"lowering": lowering})
    tokens, scores = _generate(model, ids, cache)
    assert torch.equal(tokens, ref_tokens)
    if lowering == "eager":
        assert torch.equal(scores, ref_scores)
    else:
        assert (scores - ref_scores).abs().max() <= 1e-5 * ref_scores.abs().max()
    graphs = effc.report().graphs
    assert 2 <= len(graphs) <= 4  # prefill, first decode step, then one dynamic decode graph
    if lowering == "triton":
        assert all(g.kernels for g in graphs)
        runtime = [f for g in graphs for f in g.fallbacks if f.reason.startswith("at run time")]
        assert runtime == []
        eager_writes = {n for g in graphs for f in g.fallbacks for n in f.nodes}
        if cache == "static":  # the cache update, into the caller's tensors, stays eager
            assert any(n.startswith("index_copy") for n in eager_writes)
        else:
            assert eager_writes == set()


@pytest.mark.slow
@pytest.mark.parametrize("lowering", ["eager", "triton"])
def test_generate_with_low_rank_rewrites_every_step_graph(lowering):
    model, ids = _llama()
    model.forward = torch.compile(model.forward, backend="effc", options={
        "lowering": lowering, "low_rank": {"rank": 8}})
    tokens, scores = _generate(model, ids, None)
    assert tokens.shape == (2, 7 + NEW_TOKENS) and torch.isfinite(scores).all()
    graphs = effc.report().graphs
    rewritten = [g.passes[0].counters["rewritten"] for g in graphs]
    assert rewritten == [2 * 7 + 1] * len(graphs)  # 7 linears a layer, and lm_head
