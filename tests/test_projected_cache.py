"""effc.kv_cache: a Hugging Face cache that stores fewer dims per head, eagerly and compiled.

Tolerances: ratio 1 stores the tensors unchanged (bit-identical generation). A projection's
round trip is checked against explicit matmuls to fp32 rounding (1e-6 relative).
"""

import math
import re

import pytest
import torch
import transformers as tf
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import effc
from effc.passes.kv_proj_math import plane_selection


def _llama(seed=0):
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = tf.LlamaForCausalLM(cfg).eval()
    batches = [torch.randint(3, 96, (2, 16)) for _ in range(3)]
    return model, effc.calibrate(model, batches, what=("inputs", "kv"), progress=False)


GEN = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True,
           return_dict_in_generate=True)


def test_ratio_1_generates_exactly_what_the_plain_cache_does():
    model, calib = _llama()
    ids = torch.randint(3, 96, (2, 7))
    with torch.inference_mode():
        ref = model.generate(ids, **GEN)
        cache = effc.kv_cache(model, calib, ratio=1.0)
        out = model.generate(ids, cache=cache, **GEN)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.scores, ref.scores))
    assert cache.nbytes() == cache.dense_nbytes()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "effc"])
def test_the_cache_tensors_really_shrink_in_generate(compiled):
    model, calib = _llama()
    ids = torch.randint(3, 96, (2, 7))
    forward = model.forward
    if compiled:
        torch._dynamo.reset()
        effc.reset()
        model.forward = torch.compile(forward, backend="effc")
    try:
        with torch.inference_mode():
            cache = effc.kv_cache(model, calib, ratio=0.5, keys="pca")
            out = model.generate(ids, cache=cache, **GEN)
    finally:
        model.forward = forward
    tokens = out.sequences.shape[1] - 1  # the last token is never written
    for layer in cache.layers:  # [B, G=2 KV heads (GQA), T, 8 * 0.5]
        assert layer.keys.shape == (2, 2, tokens, 4) and layer.values.shape == (2, 2, tokens, 4)
    assert cache.nbytes() == 2 * 2 * (2 * 2 * tokens * 4) * 4  # layers x K/V x elements x fp32
    assert cache.nbytes() * 2 == cache.dense_nbytes()
    with torch.inference_mode():
        again = effc.kv_cache(model, calib, ratio=0.5, keys="pca")
        eager = model.generate(ids, cache=again, **GEN)
    assert torch.equal(out.sequences, eager.sequences)  # compiled and eager agree


@pytest.mark.parametrize("center", [False, "auto"])
def test_attention_reads_the_projection_of_what_it_wrote(center):
    """The cache stores (K - mu_k) P_k and hands attention (K - mu_k) P_k P_k^T + mu_k (the
    calibration's per-head means, by default), or K P_k P_k^T uncentered; values alike."""
    model, calib = _llama()
    cache = effc.kv_cache(model, calib, ratio=0.5, keys="pca", center=center)
    layer = cache.layers[0]
    k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    keys, values = layer.update(k, v)
    kb, vb = layer.key_basis, layer.value_basis  # [G, d, r], orthonormal columns
    torch.testing.assert_close(kb.transpose(1, 2) @ kb, torch.eye(4).expand(2, 4, 4),
                               atol=1e-6, rtol=0)
    name = cache.plan[0]["module"]
    mk, mv = ((calib.keys[name].mean().float()[:, None], calib.values[name].mean().float()[:, None])
              if center else (torch.zeros(2, 1, 8),) * 2)
    assert (layer.key_mean is not None) == bool(center)
    assert not center or mk.abs().max() > 0.01  # a mean that matters
    assert cache.plan[0]["centered"] == (["keys", "values"] if center else [])
    torch.testing.assert_close(keys, (k - mk) @ kb @ kb.transpose(1, 2) + mk, rtol=1e-6,
                               atol=1e-6)
    torch.testing.assert_close(values, (v - mv) @ vb @ vb.transpose(1, 2) + mv, rtol=1e-6,
                               atol=1e-6)
    torch.testing.assert_close(layer.keys, (k - mk) @ kb)  # what is stored: r wide
    assert layer.keys.shape == (2, 2, 5, 4)


def test_centering_keeps_the_ranks_and_lowers_the_stated_errors():
    """At the same ranks, centered bases leave no more energy out, layer by layer (the math
    test checks that the stated error is the measured one; bench_kv_proj part (a) measures
    the effect on a trained model's predictions)."""
    model, calib = _llama()
    plans = {c: effc.kv_cache(model, calib, ratio=0.5, keys="pca", center=c).plan
             for c in (False, "auto")}
    for on, off in zip(plans["auto"], plans[False], strict=True):
        assert on["key_rank"] == off["key_rank"] and on["value_rank"] == off["value_rank"]
        assert on["key_error"] <= off["key_error"] + 1e-6
        assert on["value_error"] <= off["value_error"] + 1e-6
    assert sum(p["value_error"] for p in plans["auto"]) < sum(
        p["value_error"] for p in plans[False]) - 1e-3


def test_rope_plane_selection_commutes_with_the_rotation():
    torch.manual_seed(0)
    b, g, t, d, planes = 2, 3, 7, 8, 2
    k = torch.randn(b, g, t, d)
    angles = torch.randn(1, t, d // 2)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    sel = plane_selection(torch.rand(g, d // 2), planes)  # [G, d, 2 planes]
    rotated_then_selected = apply_rotary_pos_emb(k, k, cos, sin)[1] @ sel
    cols = sel.argmax(1)  # [G, 2 planes]: which dims each head keeps
    cos_s = cos[0][:, cols].permute(1, 0, 2)  # [G, T, 2 planes]
    sin_s = sin[0][:, cols].permute(1, 0, 2)
    selected_then_rotated = apply_rotary_pos_emb(k @ sel, k @ sel, cos_s, sin_s,
                                                 unsqueeze_dim=0)[1]
    assert torch.equal(rotated_then_selected, selected_then_rotated)


def test_a_budget_keeps_that_share_of_the_bytes_and_beats_uniform_ranks():
    model, calib = _llama()
    ids = torch.randint(3, 96, (4, 16))
    with torch.inference_mode():
        ref = model(ids).logits
        errors = {}
        for label, knobs in (("budget", {"budget": 0.5}), ("uniform", {"ratio": 0.5}),
                             ("latent budget", {"budget": 0.5, "keys": "latent"})):
            cache = effc.kv_cache(model, calib, **{"keys": "pca", **knobs})
            out = model(ids, cache=cache, use_cache=True).logits
            errors[label] = ((out - ref).norm() / ref.norm()).item()
            # the budget counts latent keys' position ids too
            assert cache.nbytes() <= 0.5 * cache.dense_nbytes()
    assert errors["budget"] <= errors["uniform"] * 1.05, errors


def test_a_budget_can_weigh_layers_by_their_measured_effect():
    model, calib = _llama()
    batches = [torch.randint(3, 96, (2, 16)) for _ in range(2)]
    cache = effc.kv_cache(model, calib, budget=0.5, batches=batches)
    assert cache.measured_sqnr_db is not None and all("sensitivity" in r for r in cache.plan)
    again = cache.fresh()  # same bases, empty
    assert again.plan == cache.plan and again.layers[0].keys is None
    num = den = 0.0
    with torch.inference_mode():
        for b in batches:  # the logits' SQNR over both batches, as the cache reports it
            ref = model(b).logits.double()
            out = model(b, cache=cache.fresh(), use_cache=True).logits.double()
            num, den = num + (out - ref).pow(2).sum().item(), den + ref.pow(2).sum().item()
    assert abs(-10 * math.log10(num / den) - cache.measured_sqnr_db) <= 1e-6


def test_data_free_bases_need_no_calibration_and_shrink_the_cache():
    model, calib = _llama()
    cache = effc.kv_cache(model, None, ratio=0.5)
    ids = torch.randint(3, 96, (2, 9))
    with torch.inference_mode():
        model(ids, cache=cache, use_cache=True)
    assert cache.layers[0].keys.shape == (2, 2, 9, 4) and cache.layers[1].values.shape == (
        2, 2, 9, 4)
    with pytest.raises(ValueError, match="'kv_proj.bases'"):
        effc.kv_cache(model, effc.calibrate(model, [ids], progress=False), bases="calibration")


def test_data_free_key_moments_average_rope_to_whole_planes():
    from effc.projected_cache import _weight_moment_pair

    model, _ = _llama()
    params = dict(model.named_parameters())
    keys, values = _weight_moment_pair(params, "model.layers.0.self_attn", model.config, None)
    w = params["model.layers.0.self_attn.k_proj.weight"].detach().double()[:8]  # KV head 0
    energy = (w @ w.T).diagonal()
    plane = (energy[:4] + energy[4:]) / 2
    torch.testing.assert_close(keys[0], torch.diag(torch.cat([plane, plane])))
    wv = params["model.layers.0.self_attn.v_proj.weight"].detach().double()[8:16]  # head 1
    torch.testing.assert_close(values[1], wv @ wv.T)


def test_gpt2s_fused_c_attn_gives_data_free_bases_from_its_key_and_value_thirds():
    """GPT-2 computes q, k, v with one Conv1D (x @ W, W [in, 3 * embed]): the data-free
    moments are those of its key and value thirds, biases included; the cache built from
    them shrinks, and at ratio 1 it keeps the model."""
    from effc.projected_cache import _weight_moment_pair

    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    model = tf.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.bias.normal_()
    params = dict(model.named_parameters())
    keys, values = _weight_moment_pair(params, "transformer.h.0.attn", model.config, None)
    w = params["transformer.h.0.attn.c_attn.weight"].detach().double()   # [32, 96]
    b = params["transformer.h.0.attn.c_attn.bias"].detach().double()
    wk, bk = w[:, 32 + 8:32 + 16].T, b[32 + 8:32 + 16]                    # key head 1
    torch.testing.assert_close(keys[1], wk @ wk.T + bk[:, None] * bk[None, :])
    wv, bv = w[:, 64:72].T, b[64:72]                                      # value head 0
    torch.testing.assert_close(values[0], wv @ wv.T + bv[:, None] * bv[None, :])
    ids = torch.randint(3, 96, (2, 9))
    half = effc.kv_cache(model, None, ratio=0.5)
    with torch.inference_mode():
        ref = model(ids).logits
        model(ids, cache=half, use_cache=True)
        whole = model(ids, cache=effc.kv_cache(model, None, ratio=1.0),
                      use_cache=True).logits
    assert half.layers[0].keys.shape == (2, 4, 9, 4)
    torch.testing.assert_close(whole, ref, rtol=1e-4, atol=1e-5)


def test_the_default_keeps_the_stated_share_of_every_layers_energy():
    model, calib = _llama()
    cache = effc.kv_cache(model, calib)
    for row in cache.summary():
        assert row["key_error"] ** 2 <= 0.01 + 1e-9 and row["value_error"] ** 2 <= 0.01 + 1e-9
        assert row["key_rank"] <= row["head_dim"] and row["keys"] in ("pca", "full")


@pytest.mark.parametrize("knobs,key", [({"ratio": 0.0}, "kv_proj.ratio"),
                                       ({"ratio": 1.5}, "kv_proj.ratio"),
                                       ({"budget": 0.5, "ratio": 0.5}, "kv_proj"),
                                       ({"keys": "rope"}, "kv_proj.keys"),
                                       ({"multiple": 0}, "kv_proj.multiple"),
                                       ({"rank": 3}, "kv_proj.rank"),
                                       ({"center": "yes"}, "kv_proj.center"),
                                       ({"center": True, "bases": "weights"}, "kv_proj.center")])
def test_bad_settings_raise_value_error_naming_the_key(knobs, key):
    model, calib = _llama()
    with pytest.raises(ValueError, match=re.escape(repr(key))):
        effc.kv_cache(model, calib, **knobs)


def test_center_true_with_latent_keys_warns_that_only_values_are_centered(caplog):
    model, calib = _llama()
    with caplog.at_level("WARNING", logger="effc"):
        cache = effc.kv_cache(model, calib, ratio=0.5, keys="latent", center=True)
    assert cache.plan[0]["centered"] == ["values"]
    assert "centers the values only" in caplog.text


def test_a_calibration_without_kv_moments_falls_back_to_data_free_bases():
    model, _ = _llama()
    calib = effc.calibrate(model, [torch.randint(3, 96, (2, 8))], progress=False)
    auto = effc.kv_cache(model, calib, ratio=0.5)
    weights = effc.kv_cache(model, calib, ratio=0.5, bases="weights")
    assert all(torch.equal(a.key_basis, b.key_basis) and torch.equal(a.value_basis,
                                                                     b.value_basis)
               for a, b in zip(auto.layers, weights.layers))


def _latent_identity_cache(model):
    """A latent-key cache whose bases are the identity: only the RoPE round trip acts."""
    from effc.projected_cache import ProjectedCache, ProjectedLayer, _rotary

    eye = torch.eye(8).expand(2, 8, 8).contiguous()
    layers = [ProjectedLayer(eye, None, _rotary(model)) for _ in range(2)]
    return ProjectedCache(layers, [], 8)


@pytest.mark.parametrize("padded", [False, True], ids=["plain", "left-padded"])
def test_latent_keys_undo_and_redo_rope_at_each_tokens_position(padded):
    model, _ = _llama()
    ids = torch.randint(3, 96, (2, 9))
    mask = torch.ones_like(ids)
    if padded:  # the second row starts 3 tokens late: its positions are not the cache slots
        ids[1, :3], mask[1, :3] = 0, 0
    with torch.inference_mode():
        ref = model.generate(ids, attention_mask=mask, **GEN)
        cache = _latent_identity_cache(model)
        out = model.generate(ids, attention_mask=mask, cache=cache, **GEN)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    layer = cache.layers[0]
    if padded:  # generate's position ids, not the slot numbers
        assert layer.positions[1, 3:].tolist() == list(range(layer.positions.shape[1] - 3))
    # the positions are part of what the cache holds (int64 per token)
    assert cache.nbytes() == sum(l.keys.numel() * 4 + l.values.numel() * 4 +
                                 l.positions.numel() * 8 for l in cache.layers)


def test_latent_keys_store_the_rank_and_rebuild_the_projection_before_rope():
    model, calib = _llama()
    ids = torch.randint(3, 96, (2, 7))
    with torch.inference_mode():
        cache = effc.kv_cache(model, calib, ratio=0.5, keys="latent", values=False)
        model(ids, cache=cache)
    attn = model.model.layers[0].self_attn
    layer = cache.layers[0]
    assert layer.keys.shape == (2, 2, 7, 4) and layer.values.shape == (2, 2, 7, 8)
    assert cache.summary()[0]["keys"] == "latent"
    # what attention reads: RoPE of (W_k x) P P^T, explicitly
    with torch.inference_mode():
        x = model.model.embed_tokens(ids)
        x = model.model.layers[0].input_layernorm(x)
        k = attn.k_proj(x).view(2, 7, 2, 8).transpose(1, 2)
        p = layer.key_basis
        rebuilt = k @ p @ p.transpose(-1, -2)
        pos = torch.arange(7).expand(2, 7)
        cos, sin = model.model.rotary_emb(x, pos)
        _, want = apply_rotary_pos_emb(rebuilt, rebuilt, cos, sin)
        got, _ = cache.fresh().layers[0].update(
            apply_rotary_pos_emb(k, k, cos, sin)[1], torch.zeros(2, 2, 7, 8),
            kwargs={"position_ids": pos})
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_latent_keys_need_rope():
    cfg = tf.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    model = tf.GPT2LMHeadModel(cfg).eval()
    with pytest.raises(ValueError, match=r"kv_proj\.keys.*no rotary embedding"):
        effc.kv_cache(model, ratio=0.5, keys="latent")


def test_auto_keys_are_latent_for_rope_models_and_pca_otherwise():
    model, calib = _llama()
    assert {p["keys"] for p in effc.kv_cache(model, calib, ratio=0.5).summary()} == {"latent"}
    cfg = tf.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    gpt2 = tf.GPT2LMHeadModel(cfg).eval()
    calib = effc.calibrate(gpt2, [torch.randint(3, 96, (2, 16))], what=("inputs", "kv"),
                           progress=False)
    assert {p["keys"] for p in effc.kv_cache(gpt2, calib, ratio=0.5).summary()} == {"pca"}


@pytest.mark.parametrize("keys", ["pca", "latent"])
def test_a_static_cache_is_preallocated_r_wide_and_generates_what_the_dynamic_one_does(keys):
    model, calib = _llama()
    ids = torch.randint(3, 96, (2, 7))
    with torch.inference_mode():
        dynamic = model.generate(ids, cache=effc.kv_cache(model, calib, ratio=0.5, keys=keys),
                                 **GEN)
        cache = effc.kv_cache(model, calib, ratio=0.5, keys=keys, max_cache_len=16)
        static = model.generate(ids, cache=cache, **GEN)
    assert torch.equal(static.sequences, dynamic.sequences)
    for a, b in zip(static.scores, dynamic.scores):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    layer = cache.layers[0]
    assert layer.keys.shape == (2, 2, 16, 4) and layer.values.shape == (2, 2, 16, 4)
    positions = 2 * 16 * 8 * 2 if keys == "latent" else 0  # int64 per slot, per layer
    assert cache.nbytes() == 2 * 2 * (2 * 2 * 16 * 4) * 4 + positions


def test_a_static_projected_cache_decodes_compiled_like_eager():
    model, calib = _llama()
    ids = torch.randint(3, 96, (2, 7))
    forward = model.forward
    with torch.inference_mode():
        eager = model.generate(ids, cache=effc.kv_cache(model, calib, ratio=0.5,
                                                        max_cache_len=16), **GEN)
        torch._dynamo.reset()
        effc.reset()
        model.forward = torch.compile(forward, backend="effc", options={"kv_proj": True})
        try:
            compiled = model.generate(ids, cache=effc.kv_cache(model, calib, ratio=0.5,
                                                               max_cache_len=16), **GEN)
        finally:
            model.forward = forward
    assert torch.equal(compiled.sequences, eager.sequences)
    for a, b in zip(compiled.scores, eager.scores):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_a_bad_max_cache_len_raises(bad):
    model, calib = _llama()
    with pytest.raises(ValueError, match="max_cache_len"):
        effc.kv_cache(model, calib, ratio=0.5, max_cache_len=bad)
