"""effc.use_select_attention: decode steps attend to selected cached tokens (TokenSelect).

The select path's own exactness (top_k + initial + recent >= cache length equals SDPA) is
tested on the op (tests/kernels/test_select_attention.py); here: the model-level switch.
"""

import pytest
import torch
import transformers as tf
from torch.utils._python_dispatch import TorchDispatchMode

import effc

GEN = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True,
           return_dict_in_generate=True)


def _llama():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return tf.LlamaForCausalLM(cfg).eval()


class _Calls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.keys = []  # cache length each select call saw

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.effc.select_attention.default:
            self.keys.append(args[1].shape[2])
        return func(*args, **(kwargs or {}))


def test_a_budget_covering_the_cache_generates_exactly_the_original():
    model, ids = _llama(), torch.randint(3, 96, (2, 40))
    with torch.inference_mode():
        ref = model.generate(ids, **GEN)
        effc.use_select_attention(model, top_k=100, initial=4, recent=8)
        out = model.generate(ids, **GEN)
        with _Calls() as calls:  # (a dispatch mode changes SDPA's numerics: not compared)
            model.generate(ids, **GEN)
        effc.restore_attention(model)
    assert torch.equal(out.sequences, ref.sequences) and calls.keys == []
    assert all(torch.equal(a, b) for a, b in zip(out.scores, ref.scores))


def test_decode_steps_past_the_budget_select_and_prefill_does_not():
    model, ids = _llama(), torch.randint(3, 96, (2, 40))
    with torch.inference_mode():
        ref = model.generate(ids, **GEN)
        effc.use_select_attention(model, top_k=8, initial=2, recent=4)
        out = model.generate(ids, **GEN)
        with _Calls() as calls:
            model.generate(ids, **GEN)
        effc.restore_attention(model)
        back = model.generate(ids, **GEN)
    # 5 decode steps (the first token comes from prefill) x 2 layers, caches of 41..45 tokens
    assert sorted(calls.keys) == sorted([t for t in range(41, 46) for _ in range(2)])
    assert max((a - b).abs().max().item() for a, b in zip(out.scores, ref.scores)) > 1e-3
    assert torch.equal(back.sequences, ref.sequences)  # restore_attention undoes it
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("reuse", [None, -1.0])
def test_compiled_by_effc_selects_like_eager(reuse):
    """Compiled, the selection cache lives in effc.select_attention_reusing: the same
    generation and the same counts as eagerly."""
    from effc.token_select import _SLOTS, reuse_counts

    model, ids = _llama(), torch.randint(3, 96, (2, 40))
    effc.use_select_attention(model, top_k=8, initial=2, recent=4, reuse=reuse)
    forward = model.forward
    try:
        with torch.inference_mode():
            eager = model.generate(ids, **GEN)
            counts = reuse_counts(model)
            torch._dynamo.reset()
            effc.reset()
            model.forward = torch.compile(forward, backend="effc")
            compiled = model.generate(ids, **GEN)
            compiled_counts = reuse_counts(model)
            in_op = sorted(k for k in _SLOTS if k.startswith("id:"))  # not eager fallbacks
    finally:
        model.forward = forward
        effc.restore_attention(model)
    assert compiled_counts == counts == ((2, 8) if reuse is not None else (0, 0))
    assert len(in_op) == (2 if reuse is not None else 0)
    assert torch.equal(compiled.sequences, eager.sequences)
    for a, b in zip(compiled.scores, eager.scores):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


@pytest.mark.parametrize("knobs,key", [({"top_k": -1}, "kv_proj.select.top_k"),
                                       ({"recent": 1.5}, "kv_proj.select.recent"),
                                       ({"top_k": 0, "initial": 0, "recent": 0},
                                        "kv_proj.select")])
def test_bad_settings_raise_value_error_naming_the_key(knobs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        effc.use_select_attention(_llama(), **knobs)


def test_reuse_attends_to_the_last_selection_plus_the_new_tokens():
    from effc.token_select import reuse_counts

    model, ids = _llama(), torch.randint(3, 96, (2, 40))
    with torch.inference_mode():
        effc.use_select_attention(model, top_k=8, initial=2, recent=4, reuse=-1.0)  # always
        model.generate(ids, **GEN)
        made, reused = reuse_counts(model)
        layer = model.model.layers[0].self_attn
        state = layer.effc_select_state
        effc.restore_attention(model)
    assert (made, reused) == (2, 2 * 4)  # 5 decode steps x 2 layers: one selection each
    first = state.index[:, :14]          # the selection made at the first decode step (41)
    assert torch.equal(state.index[:, 14:], torch.arange(41, 45).expand(2, -1))
    assert first.shape == (2, 14) and bool((first < 41).all())
    assert not hasattr(layer, "effc_select_state")  # restore_attention forgets it


def test_the_compiled_selection_cache_carries_over_to_the_same_sequences_next_step_only():
    """effc.select_attention_reusing (compiled graphs) keeps a slot's selection for the same
    sequence one token later; a cache with another first key (a new prompt) of the right
    length, or a cache that did not grow by one, selects afresh and restarts the counts."""
    from effc.token_select import _SLOTS, forget_selections

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)

    def step(k, v):
        out = torch.ops.effc.select_attention_reusing(q, k, v, 0.35, 8, 2, 4, -1.0, "slot")
        state = _SLOTS["slot"]
        return out, (state.made, state.reused, state.index.shape[1])

    forget_selections()
    assert step(k, v)[1] == (1, 0, 14)
    grown = torch.cat([k, torch.randn(1, 2, 1, 8)], 2), torch.cat([v, torch.randn(1, 2, 1, 8)], 2)
    out, counts = step(*grown)
    assert counts == (1, 1, 15)  # the old 14 and the new token
    index = torch.cat([_SLOTS["slot"].index[:, :14], torch.tensor([[40]])], 1)
    assert torch.equal(out, torch.ops.effc.gather_attention(q, *grown, index, 0.35))
    other = torch.randn(1, 2, 42, 8)  # one token longer, but another sequence
    assert step(other, other)[1] == (1, 0, 14)
    assert step(other, other)[1] == (1, 0, 14)  # did not grow: afresh
    forget_selections()
    assert not _SLOTS
    # its schema, fake implementation and compiled use (the same cache each call: no reuse)
    torch.library.opcheck(torch.ops.effc.select_attention_reusing.default,
                          (q, k, v, 0.35, 8, 2, 4, -1.0, "check"))
    forget_selections()
