"""The kv_proj pass: attention over an effc.kv_cache runs in the projected dimensions.

Tolerance: the fold reassociates (q P_k) L_k^T and (A L_v) P_v^T, so scores differ from the
rebuilding path by fp32 rounding: measured 6e-8; asserted within 1e-5 of the scores' scale.
"""

import operator

import pytest
import torch
import transformers as tf

import effc
from effc.passes.attention_sites import SDPA
from effc.passes.kv_proj import rebuild


def _llama(kv_heads=2, bias=False):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads,
                         max_position_embeddings=64, attention_bias=bias)
    model = tf.LlamaForCausalLM(cfg).eval()
    calib = effc.calibrate(model, [torch.randint(3, 96, (2, 16)) for _ in range(2)],
                           what=("inputs", "kv"), progress=False)
    return model, calib


GEN = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True,
           return_dict_in_generate=True)


def _generate_both(model, ids, cache, instruments=(), **kwargs):
    """generate() with the rebuilding cache (eager) and compiled with kv_proj (strict); the
    tokens must be the same and the scores within 1e-5 of their scale. Returns the cache the
    compiled run filled."""
    forward = model.forward
    with torch.inference_mode():
        ref = model.generate(ids, cache=cache.fresh(), **GEN, **kwargs)
        torch._dynamo.reset()
        effc.reset()
        model.forward = torch.compile(forward, backend="effc", options={
            "kv_proj": True, "strict": True, "instruments": list(instruments)})
        try:
            filled = cache.fresh()
            out = model.generate(ids, cache=filled, **GEN, **kwargs)
        finally:
            model.forward = forward
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    return filled


class _Rebuilds(effc.compiler.pass_manager.Instrument):
    """Counts the cache rebuilds (L @ P^T) feeding attention before and after each pass."""

    def __init__(self):
        self.counts, self.narrow = [], []

    def after_pass(self, name, gm, ctx, record):
        if name == "kv_proj":
            from effc.passes.kv_proj import unequal_attention

            self.narrow.append(sum(n.target is unequal_attention for n in gm.graph.nodes))
            self.counts.append(sum(rebuild(n) is not None and any(u.target in SDPA
                                                                  for u in n.users)
                                   for n in gm.graph.nodes))


@pytest.mark.parametrize("kv_heads,knobs", [(2, {}), (4, {}), (2, {"keys": "none"}),
                                            (2, {"values": False, "keys": "pairs"}),
                                            (2, {"keys": "latent"}), (2, {"center": False}),
                                            (2, {"bias": True})],
                         ids=["gqa", "mha", "values-only", "rope-planes-only", "latent-keys",
                              "uncentered", "attention-bias"])
def test_folded_attention_generates_what_the_rebuilding_cache_does(kv_heads, knobs):
    """Generation with the folds equals generation with the rebuilding cache: the attention
    fold at every step, and in the prefill (14 tokens) the value bases folded into v_proj and
    o_proj as well; decode steps (2 tokens) keep v_proj and o_proj as they are."""
    knobs = dict(knobs)
    model, calib = _llama(kv_heads, bias=knobs.pop("bias", False))
    ids = torch.randint(3, 96, (2, 7))
    cache = effc.kv_cache(model, calib, ratio=0.5, **{"keys": "pca", **knobs})
    seen = _Rebuilds()
    folded = _generate_both(model, ids, cache, [seen])
    rows = [s for s in effc.report().sites if s.pass_name == "kv_proj"]
    prefill, rows = rows[:2], rows[2:]  # the first graph is the prefill's (2 layers)
    assert rows and all(r.decision == "rewritten" for r in rows)
    assert {r.site for r in rows} == {"cache.layers.0", "cache.layers.1"}
    assert seen.counts[1:] and all(c == 0 for c in seen.counts[1:])  # no full-width rebuild
    # a prefill folds where its keys and values end up equally wide (SDPA's fused kernels);
    # otherwise it rebuilds the cache to full width, and says why
    equal = knobs.get("keys", "pca") == "pca" and knobs.get("values", True)
    # decode steps whose keys and values differ in width attend without SDPA's kernels
    assert seen.narrow[0] == 0 and all(c == (0 if equal else 2) for c in seen.narrow[1:])
    if equal:
        assert all(r.decision == "rewritten" for r in prefill) and seen.counts[0] == 0
    else:
        assert all(r.decision == "skipped" and "equal widths" in r.reason for r in prefill)
        assert seen.counts[0] == 2
    # centered (the default) wherever the bases are PCA: the keys' mean drops out of the
    # softmax, the values' comes back as a bias
    centered = [] if knobs.get("center") is False else [
        w for w, on in (("keys", knobs.get("keys", "pca") == "pca"),
                        ("values", knobs.get("values", True))) if on]
    assert cache.plan[0]["centered"] == centered
    layer = folded.layers[0]  # the cache itself still stores r dims where it projects
    assert layer.keys.shape[-1] == (8 if knobs.get("keys") == "none" else 4)
    assert layer.values.shape[-1] == (8 if knobs.get("values") is False else 4)
    if equal:  # the prefill folds the value bases into v_proj and o_proj as well
        assert all(r.details["folded"] == ["v_proj", "o_proj"] for r in prefill)
    assert all(r.details.get("folded", []) == [] for r in rows)  # decode steps do not
    assert all("decode steps" in r.details["not_folded"] for r in rows if r.details["values"])
    folds = {(r.details["keys"], r.details["values"]) for r in rows}
    # latent keys are rotated after their rebuild: only the values fold
    assert folds == {(knobs.get("keys") not in ("none", "latent"), knobs.get("values", True))}


def test_without_a_projected_cache_the_graph_is_left_as_is_and_said_so(caplog):
    """Nothing to do (a transformers cache, no calibration): the model is unchanged, each
    row says why, and a warning says how kv_proj is meant to be used."""
    model, _ = _llama()
    ids = torch.randint(3, 96, (2, 7))
    torch._dynamo.reset()
    effc.reset()
    with torch.inference_mode(), caplog.at_level("WARNING", logger="effc"):
        ref = model(ids).logits
        out = torch.compile(model, backend="effc", options={"kv_proj": True})(ids).logits
    assert torch.equal(out, ref)
    rows = [s for s in effc.report().sites if s.pass_name == "kv_proj"]
    assert len(rows) == 2 and all("no projected cache" in r.reason for r in rows)
    assert any("rewrote none of the 2 attentions" in r.getMessage() and
               "effc.kv_cache(model, calibration" in r.getMessage() for r in caplog.records)


def test_compression_knobs_as_a_compile_option_warn_that_they_belong_to_kv_cache(caplog):
    model, _ = _llama()
    torch._dynamo.reset()
    effc.reset()
    with torch.inference_mode(), caplog.at_level("WARNING", logger="effc"):
        torch.compile(model, backend="effc", options={"kv_proj": {"budget": 0.5}})(
            torch.randint(3, 96, (1, 5)))
    assert any("effc.kv_cache" in r.getMessage() and "budget" in r.getMessage()
               for r in caplog.records)


def _generate(model, ids, options=None, cache=None):
    forward = model.forward
    torch._dynamo.reset()
    effc.reset()
    try:
        if options is not None:
            model.forward = torch.compile(forward, backend="effc", options=options)
        with torch.inference_mode():
            return model.generate(ids, **GEN, **({} if cache is None else {"cache": cache}))
    finally:
        model.forward = forward


def test_select_as_a_compile_option_selects_like_the_eager_switch():
    (model, _), ids = _llama(), torch.randint(3, 96, (2, 40))
    dense = _generate(model, ids)
    compiled = _generate(model, ids, {"kv_proj": {"select": {"top_k": 8, "initial": 2,
                                                             "recent": 4}}})
    rows = [r for r in effc.report().sites if r.site.startswith("select:")]
    effc.use_select_attention(model, top_k=8, initial=2, recent=4)
    try:
        eager = _generate(model, ids)
    finally:
        effc.restore_attention(model)
    assert torch.equal(compiled.sequences, eager.sequences)
    for a, b in zip(compiled.scores, eager.scores):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    # it did select: the decode steps' logits differ from full attention's
    assert max((a - b).abs().max().item() for a, b in zip(compiled.scores, dense.scores)) > 1e-3
    rewritten = [r for r in rows if r.decision == "rewritten"]
    prefill = [r for r in rows if r.decision == "skipped"]
    assert rewritten and all("at most 14 cached tokens" in r.reason for r in rewritten)
    assert len(rewritten) % 2 == 0  # two layers per decode graph
    assert prefill and all("a query of 40 tokens (a prefill)" in r.reason for r in prefill)


@pytest.mark.parametrize("reuse", [-1.0, 0.5])
def test_selection_reuse_as_a_compile_option_reuses_like_the_eager_switch(reuse):
    """TokenSelect's selection cache in compiled graphs: the op keeps each attention's last
    selection. reuse -1 always reuses (one selection per layer, then 4 reuses); 0.5 reuses
    where the queries agree. Generation, logits and the counts match the eager switch; a
    second generate() (a new sequence) starts afresh."""
    from effc.token_select import reuse_counts

    (model, _), ids = _llama(), torch.randint(3, 96, (2, 40))
    settings = {"top_k": 8, "initial": 2, "recent": 4, "reuse": reuse}
    compiled = _generate(model, ids, {"kv_proj": {"select": settings}})
    counts = reuse_counts(model)
    rows = [r for r in effc.report().sites if r.decision == "rewritten"]
    again = _generate(model, ids, {"kv_proj": {"select": settings}})
    assert reuse_counts(model) == counts  # the new prompt did not reuse the old selections
    effc.use_select_attention(model, **settings)
    try:
        eager = _generate(model, ids)
        eager_counts = reuse_counts(model)
    finally:
        effc.restore_attention(model)
    assert torch.equal(compiled.sequences, eager.sequences)
    assert torch.equal(again.sequences, eager.sequences)
    for a, b in zip(compiled.scores, eager.scores):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    assert counts == eager_counts
    if reuse == -1.0:
        assert counts == (2, 8)  # 5 decode steps x 2 layers: one selection each
    assert rows and all(f"cosine >= {reuse}" in r.reason for r in rows)


@pytest.mark.parametrize("keys", ["pca", "latent"])
def test_select_over_a_projected_cache_scores_the_projected_keys(keys):
    """Both rewrites in one graph: the fold hands attention q P_k and the r-wide cache, and
    select scores those, which equals scoring the rebuilt keys (q P_k . L_k = q . L_k P_k^T):
    the compiled generation is the eager switch's over the same projected cache."""
    model, calib = _llama()
    ids = torch.randint(3, 96, (2, 40))
    cache = effc.kv_cache(model, calib, ratio=0.5, keys=keys)
    select = {"top_k": 8, "initial": 2, "recent": 4}
    compiled = _generate(model, ids, {"kv_proj": {"select": select}, "strict": True},
                         cache=cache.fresh())
    rows = effc.report().sites
    assert any(r.site.startswith("cache.layers.") and r.decision == "rewritten" for r in rows)
    assert any(r.site.startswith("select:") and r.decision == "rewritten" for r in rows)
    effc.use_select_attention(model, **select)
    try:
        eager = _generate(model, ids, cache=cache.fresh())
    finally:
        effc.restore_attention(model)
    assert torch.equal(compiled.sequences, eager.sequences)
    for a, b in zip(compiled.scores, eager.scores):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_select_covering_the_cache_keeps_the_model():
    (model, _), ids = _llama(), torch.randint(3, 96, (2, 40))
    dense = _generate(model, ids, {})
    selected = _generate(model, ids, {"kv_proj": {"select": True}})  # 324 >= 46 tokens
    assert any(r.decision == "rewritten" for r in effc.report().sites)
    assert torch.equal(selected.sequences, dense.sequences)
    for a, b in zip(selected.scores, dense.scores):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


@pytest.mark.parametrize("select,key", [({"top_k": -1}, "kv_proj.select.top_k"),
                                        ({"topk": 3}, "kv_proj.select"),
                                        ({"reuse": 1.5}, "kv_proj.select.reuse"),
                                        ("yes", "kv_proj.select")])
def test_bad_select_settings_name_the_key(select, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        effc.Config.from_options({"kv_proj": {"select": select}}, env={})



class _FusedProjections(effc.compiler.pass_manager.Instrument):
    """Counts the addmms reading GPT-2's c_attn weights whole after kv_proj, per graph."""

    def __init__(self):
        self.counts = []

    def after_pass(self, name, gm, ctx, record):
        if name == "kv_proj":
            self.counts.append(sum(n.target is torch.addmm and "c_attn" in n.args[2].name
                                   for n in gm.graph.nodes))


@pytest.mark.parametrize("center", [True, False])
def test_gpt2s_prefill_folds_every_basis_into_its_projections_and_generates_the_same(center):
    """Without RoPE, a prefill folds the key bases too: W_q and W_k's columns of the fused
    c_attn become P_k^T W per head, and the values' P_v^T W_v; c_proj reads the r-wide heads.
    Decode steps keep c_attn whole; generation equals the rebuilding cache's."""
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=1, eos_token_id=2)
    model = tf.GPT2LMHeadModel(cfg).eval()
    calib = effc.calibrate(model, [torch.randint(3, 96, (2, 16)) for _ in range(2)],
                           what=("inputs", "kv"), progress=False)
    cache = effc.kv_cache(model, calib, ratio=0.5, center=center)
    seen = _FusedProjections()
    _generate_both(model, torch.randint(3, 96, (2, 9)), cache, [seen])
    rows = [s for s in effc.report().sites if s.pass_name == "kv_proj"]
    assert [r.details["folded"] for r in rows[:2]] == [["q_proj", "k_proj", "v_proj",
                                                         "o_proj"]] * 2
    assert all(r.details["folded"] == [] for r in rows[2:])
    assert seen.counts[0] == 0 and seen.counts[1:] and all(c == 2 for c in seen.counts[1:])


def test_a_padded_batch_folds_through_repeat_kv_and_generates_what_the_cache_does():
    """With a padding mask, transformers' SDPA attention repeats the KV heads for grouped
    queries itself (repeat_kv) instead of passing enable_gqa: the fold looks through it and
    repeats the r-wide cache the same way."""
    model, calib = _llama(kv_heads=2)
    ids = torch.randint(3, 96, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # the first sequence is left-padded
    ids[0, :3] = 0
    _generate_both(model, ids, effc.kv_cache(model, calib, ratio=0.5, keys="pca"),
                   attention_mask=mask)
    rows = [s for s in effc.report().sites if s.pass_name == "kv_proj"]
    assert len(rows) >= 4 and all(r.decision == "rewritten" for r in rows)


@pytest.mark.parametrize("groups,mask", [(4, None), (2, None), (2, "bool"), (2, "float"),
                                         (1, "bool")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unequal_attention_is_sdpa_for_keys_and_values_of_different_widths(groups, mask, dtype):
    """The decode-step attention the fold uses where keys and values differ in width equals
    SDPA (enable_gqa; masks as SDPA takes them), with fresh ragged sizes."""
    from effc.passes.kv_proj import unequal_attention

    g = torch.Generator().manual_seed(groups)
    q = torch.randn(3, 4, 1, 6, generator=g).to(dtype)
    k = torch.randn(3, groups, 37, 6, generator=g).to(dtype)
    v = torch.randn(3, groups, 37, 10, generator=g).to(dtype)
    m = None
    if mask == "bool":
        m = torch.rand(3, 1, 1, 37, generator=g) > 0.3
        m[..., 0] = True  # no row fully masked
    elif mask == "float":
        m = torch.randn(3, 4, 1, 37, generator=g).to(dtype)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=m if m is None or m.dtype == torch.bool
        else m.float(), scale=0.3, enable_gqa=groups != 4)
    out = unequal_attention(q, k, v, attn_mask=m, scale=0.3)
    assert out.shape == (3, 4, 1, 10) and out.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


def _encoder(kind):
    """(model, calibration batches, forward) of a small model built from config whose
    attention has no cache: ViT, BERT with padding, GPT-2 without a cache."""
    torch.manual_seed(0)
    if kind == "vit":
        model = tf.ViTForImageClassification(tf.ViTConfig(
            image_size=8, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=64, num_labels=10)).eval()
        x = torch.randn(4, 1, 8, 8)
        return model, [x], lambda m: m(x).logits
    if kind == "bert":
        model = tf.BertModel(tf.BertConfig(
            vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64)).eval()
        ids = torch.randint(3, 96, (2, 12))
        mask = torch.ones_like(ids)
        mask[0, 8:] = 0
        batch = {"input_ids": ids, "attention_mask": mask}
        return model, [batch], lambda m: m(**batch).last_hidden_state
    if kind == "opt":  # its queries are scaled after q_proj
        model = tf.OPTForCausalLM(tf.OPTConfig(
            vocab_size=96, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
            num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)).eval()
    else:
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4,
                                                 n_positions=64, bos_token_id=1,
                                                 eos_token_id=2)).eval()
    ids = torch.randint(3, 96, (2, 12))
    return model, [ids], lambda m: m(ids, use_cache=False).logits


class _WeightMath(effc.compiler.pass_manager.Instrument):
    """Counts, after kv_proj, the products left in each graph that read only weights and
    constants: folded weights computed at every call."""

    def __init__(self):
        self.counts = []

    def after_pass(self, name, gm, ctx, record):
        if name == "kv_proj":
            static = set()  # computed from weights and constants alone
            for n in gm.graph.nodes:
                if n.op == "get_attr" or ctx.facts.weight_name(n) or (
                        n.op in ("call_function", "call_method") and n.all_input_nodes
                        and all(i in static for i in n.all_input_nodes)):
                    static.add(n)
            self.counts.append(sum(n.target in (torch.matmul, torch.einsum, operator.matmul)
                                   for n in static))


def _direct(kind, dynamic=False, seen=None, **knobs):
    """The forward compiled with kv_proj and a K/V calibration, strict: (eager output,
    compiled output, kv_proj's report rows, the calibration)."""
    model, batches, forward = _encoder(kind)
    calib = effc.calibrate(model, batches, what=("inputs", "kv"), progress=False)
    torch._dynamo.reset()
    effc.reset()
    compiled = torch.compile(model, backend="effc", dynamic=dynamic, options={
        "kv_proj": knobs, "calibration": calib, "strict": True,
        "instruments": [seen] if seen else []})
    with torch.no_grad():
        ref, out = forward(model), forward(compiled)
    return ref, out, [s for s in effc.report().sites if s.pass_name == "kv_proj"], calib


@pytest.mark.parametrize("kind,dynamic", [("vit", False), ("bert", False), ("gpt2", False),
                                          ("gpt2", True), ("opt", False)])
def test_attention_without_a_cache_runs_in_fewer_dimensions_folded_into_its_projections(
        kind, dynamic):
    """ViT, BERT (padding mask) and GPT-2 without a cache: at ratio 0.5 each attention reads
    (K - mu_k) P_k and (V - mu_v) P_v from the calibration's PCA, with the bases folded into
    q, k, v (GPT-2: its fused c_attn) and the output projection. The fold equals projecting
    explicitly (fold_weights=False) to fp32 rounding, and each row states the energy error
    of its rank, which pca_errors gives from the same moments. The bases being constants
    here, the folded weights are computed at compile time: no einsum is left in the graph."""
    from effc.passes.kv_proj_math import pca_error

    seen = _WeightMath()
    ref, folded, rows, calib = _direct(kind, dynamic, seen, ratio=0.5)
    _, explicit, plain_rows, _ = _direct(kind, dynamic, ratio=0.5, fold_weights=False)
    assert seen.counts == [0]
    assert [r.decision for r in rows] == ["rewritten"] * 2
    # OPT scales its queries after q_proj: they are multiplied by P_k in the graph instead
    want = ["q_proj", "k_proj", "v_proj", "o_proj"][kind == "opt":]
    assert all(r.details["folded"] == want for r in rows)
    assert all(r.details["rank"] == 4 and r.details["head_dim"] == 8 for r in rows)
    # half of every head: q, k, v and o's weights and the attention's FLOPs halve exactly
    # (GPT-2's c_attn counts its three parts; biases are not counted)
    width = 32 * 32
    assert all(r.params_before == len(want) * width and r.params_after * 2 == r.params_before
               for r in rows)
    assert all(r.flops_after * 2 == r.flops_before > 0 for r in rows)
    assert all("folded" not in r.details for r in plain_rows)
    assert (folded - explicit).abs().max() <= 1e-5 * explicit.abs().max()
    for r in rows:
        module = r.site.split(":", 1)[1]
        assert module in calib.keys
        for role, stats in (("keys", calib.keys[module]), ("values", calib.values[module])):
            want = pca_error(stats.sum_outer / stats.count, 4, stats.mean())
            assert r.error[f"{role}_rel_error"] == pytest.approx(want, abs=1e-6)
    # lossy, and by about what the errors say: not a no-op, not broken
    rel = ((folded - ref).norm() / ref.norm()).item()
    assert 1e-5 < rel < 0.2


def test_attention_kept_whole_at_ratio_one_and_the_default_bound_on_flat_spectra():
    """Ratio 1.0 keeps every dimension: the sites are skipped and the model's output is
    eager's to fp32 tolerance. The default (99% of the energy) on random weights, whose
    spectra are flat, keeps every dimension too: a lossy default bounded by quality."""
    for knobs in ({"ratio": 1.0}, {}):
        ref, out, rows, _ = _direct("vit", **knobs)
        assert rows and all(r.decision == "skipped" and "keeps all 8" in r.reason
                            for r in rows)
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_a_budget_of_kv_dimensions_is_kept_across_the_sites():
    """budget 0.5: the ranks chosen over all sites keep at most half the K/V dimensions."""
    _, _, rows, _ = _direct("bert", budget=0.5)
    kept = sum(r.details.get("rank", 8) for r in rows) / (8 * len(rows))
    assert rows and kept <= 0.5 and any(r.decision == "rewritten" for r in rows)


def test_attention_without_moments_or_with_rope_is_skipped_with_the_reason():
    """No K/V calibration: said so. RoPE between the projections and the attention
    (Llama without a cache): the queries and keys cannot be projected by a fold."""
    model, batches, forward = _encoder("vit")
    torch._dynamo.reset()
    effc.reset()
    with torch.no_grad():
        forward(torch.compile(model, backend="effc", options={"kv_proj": {"ratio": 0.5}}))
    rows = [s for s in effc.report().sites if s.pass_name == "kv_proj"]
    assert rows and all("what=('inputs', 'kv')" in r.reason for r in rows)
    llama, calib = _llama()
    torch._dynamo.reset()
    effc.reset()
    ids = torch.randint(3, 96, (2, 12))
    with torch.no_grad():
        torch.compile(llama, backend="effc", options={
            "kv_proj": {"ratio": 0.5}, "calibration": calib})(ids, use_cache=False)
    rows = [s for s in effc.report().sites if s.pass_name == "kv_proj"]
    assert rows and all(r.decision == "skipped" and "RoPE" in r.reason for r in rows)


def test_the_projections_kv_proj_folds_are_not_taken_by_low_rank():
    """kv_proj runs first and claims q, k, v and the output projection of each attention it
    projects; low_rank then factorizes the MLPs only, and the model still runs strict."""
    model, batches, forward = _encoder("bert")
    calib = effc.calibrate(model, batches, what=("inputs", "kv"), progress=False)
    torch._dynamo.reset()
    effc.reset()
    with torch.no_grad():
        forward(torch.compile(model, backend="effc", options={
            "kv_proj": {"ratio": 0.5}, "low_rank": {"rank_ratio": 0.5},
            "calibration": calib, "strict": True}))
    sites = effc.report().sites
    assert sum(s.pass_name == "kv_proj" and s.decision == "rewritten" for s in sites) == 2
    low = [s.site for s in sites if s.pass_name == "low_rank" and s.decision == "rewritten"]
    assert low and not any(".attention." in name for name in low)
