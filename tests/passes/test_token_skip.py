"""token_skip on Hugging Face small configs: exactness at capacity 1, counted tokens, causal
routing, generate() with the cache, the rules, and bad options.

Tolerances: capacity 1 and the routed rewrite are compared bit for bit (the block runs the
same ops on the same rows; measured equal on every config here). Causality is asserted to
1e-5 of the logits' scale: prefixes run as separate compiled graphs whose attention sums
in another order (measured 6e-8).
"""

import math
import re

import pytest
import torch
import transformers as tf
from helpers import AttentionBlock, first_tensor, hf_model
from torch.utils._python_dispatch import TorchDispatchMode

import effc
from effc.compiler.graph_facts import GraphFacts, copy_graph_module
from effc.passes.residual_sites import residual_sites
from effc.passes.token_skip import _Plan, find_sites, route_site
from effc.passes.token_skip_attention import queries_problem
from effc.passes.token_skip_math import Router, marked_rows


class _CountRows(TorchDispatchMode):
    """Rows each effc.token_gather call hands to a block."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.effc.token_gather.default:
            self.rows.append(out.shape[0])
        return out


def _llama(layers=4, seed=0):
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    return tf.LlamaForCausalLM(cfg).eval()


def _decoder(kind):
    """A 3-layer Llama or GPT-2 (so that a middle layer exists)."""
    return _llama(layers=3) if kind == "llama" else tf.GPT2LMHeadModel(tf.GPT2Config(
        vocab_size=96, n_positions=64, n_embd=32, n_layer=3, n_head=4)).eval()


def _prompts(batch, padded):
    """`batch` prompts of 8 tokens; `padded`: the second one left-padded by 3."""
    ids = torch.randint(3, 96, (batch, 8))
    mask = torch.ones_like(ids)
    if padded:
        ids[1, :3], mask[1, :3] = 0, 0
    return ids, mask


GREEDY = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True,
              return_dict_in_generate=True)  # generate()'s arguments in these tests


def _compile(model, options):
    torch._dynamo.reset()
    effc.reset()
    return torch.compile(model, backend="effc", options={**options, "strict": True})


def _rows(kind="rewritten"):
    return [s for g in effc.report().graphs for p in g.passes if p.name == "token_skip"
            for s in p.sites if s.decision == kind]


def _routed_graph(capacity, threshold=None):
    """A backend that checks route_site on every MLP site of the graph it is given."""
    seen = {}

    def backend(gm, example):
        g = copy_graph_module(gm)
        sites = [s for s in residual_sites(g, GraphFacts(g, example)) if s.kind == "mlp"]
        for s in sites:
            route_site(g, s, _Plan(Router(torch.randn(s.features), 0.0, 1.0, 1), capacity,
                                   threshold))
        g.recompile()
        with torch.no_grad(), _CountRows() as count:
            seen["routed"] = first_tensor(g(*example))
        seen["plain"] = first_tensor(gm(*example))
        seen["rows"], seen["sites"] = count.rows, len(sites)
        return gm.forward

    return backend, seen


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert", "vit"])
def test_the_routed_rewrite_at_capacity_1_is_exact(kind):
    model, inputs = hf_model(kind)
    backend, seen = _routed_graph(1.0)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model.eval(), backend=backend)(**inputs)
    assert seen["sites"] == 2
    assert torch.equal(seen["routed"], seen["plain"])


@pytest.mark.parametrize("kind,tokens", [("bert", 9), ("vit", 17), ("llama", 9)])
@pytest.mark.parametrize("capacity", [0.125, 0.3, 0.875])
def test_capacity_c_processes_ceil_c_t_tokens_per_sequence(kind, tokens, capacity):
    model, inputs = hf_model(kind)  # batch 2
    backend, seen = _routed_graph(capacity)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model.eval(), backend=backend)(**inputs)
    assert seen["rows"] == [2 * math.ceil(capacity * tokens)] * 2


def test_capacity_1_through_the_pass_is_bit_identical():
    model, inputs = hf_model("bert")
    with torch.no_grad():
        ref = first_tensor(model.eval()(**inputs))
        out = first_tensor(_compile(model, {"token_skip": {"capacity": 1.0,
                                                           "layers": [0, 1]}})(**inputs))
    assert torch.equal(out, ref)
    assert _rows() == [] and len(_rows("skipped")) == 4


def test_capacity_0_drops_the_block():
    model, inputs = hf_model("vit")
    with torch.no_grad():
        out = first_tensor(_compile(model, {"token_skip": {"capacity": 0.0,
                                                            "layers": [1]}})(**inputs))
    rows = _rows()
    assert [r.site for r in rows] == ["layers.1.mlp"]
    assert "dropped" in rows[0].reason
    # dropping layer 1's MLP equals running the model with that MLP's output zeroed
    fc2 = model.layers[1].mlp.fc2
    torch._dynamo.reset()
    with torch.no_grad():
        fc2.weight.data.zero_()
        fc2.bias.data.zero_()
        ref = first_tensor(model(**inputs))
    assert torch.allclose(out, ref, atol=1e-6, rtol=0)


def test_decoders_route_per_token_and_stay_causal():
    model = _llama(layers=3)
    ids = torch.randint(3, 96, (2, 16))
    compiled = _compile(model, {"token_skip": {"capacity": 0.5}})
    with torch.no_grad():
        full = compiled(ids).logits
        rows = _rows()
        prefix = compiled(ids[:, :10]).logits
    assert [r.site for r in rows] == ["model.layers.1.mlp"]  # first and last layers kept
    assert rows[0].details["routing"] == "threshold"
    assert 0.2 <= rows[0].details["kept_fraction"] <= 0.8
    scale = full.abs().max()
    assert (prefix - full[:, :10]).abs().max() <= 1e-5 * scale
    with torch.no_grad():
        ref = model(ids).logits
    assert not torch.allclose(full, ref, atol=1e-4)  # routing does change the model


@pytest.mark.parametrize("batch", [1, 3])
def test_decoder_attention_routes_its_queries_causally(batch):
    """The first graph has 8 tokens, as many as the head size (8): the rewrite must still
    find the query axis after the attention. In a batch each sequence routes its own number
    of tokens."""
    model = _llama(layers=3)
    ids = torch.randint(3, 96, (batch, 16))
    compiled = _compile(model, {"token_skip": {"capacity": 0.5, "blocks": ["attention"]}})
    with torch.no_grad():
        short = compiled(ids[:, :8]).logits
        full = compiled(ids).logits
    assert (short - full[:, :8]).abs().max() <= 1e-5 * full.abs().max()
    rows = _rows()
    assert {(r.site, r.details["routing"]) for r in rows} == {("model.layers.1.self_attn",
                                                               "threshold")}
    assert len(rows) == 2  # both graphs route it
    assert 0 < rows[0].details["kept_fraction"] < 1
    with torch.no_grad():
        prefix = compiled(ids[:, :10]).logits
        ref = model(ids).logits
    assert (prefix - full[:, :10]).abs().max() <= 1e-5 * full.abs().max()
    assert not torch.allclose(full, ref, atol=1e-4)
    with torch.no_grad():  # one more sequence: a graph with a dynamic batch size
        wider = compiled(torch.cat([ids, torch.randint(3, 96, (1, 16))])).logits
    assert (wider[:batch] - full).abs().max() <= 1e-5 * full.abs().max()
    assert all(r.site != "model.layers.1.self_attn" for r in _rows("skipped"))
    with torch.no_grad(), _CountRows() as count:
        compiled(ids)
    assert count.rows == []  # the queries are selected at the attention, no rows gathered
    with torch.no_grad():
        _compile(model, {"token_skip": {"capacity": 0.5, "blocks": ["attention"],
                                        "keys": "selected"}})(ids)
    assert [r.site for r in _rows()] == ["model.layers.1.self_attn"]  # at any batch


@pytest.mark.slow
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_routing_decoder_attention_matches_generate_without_the_cache(kind, padded):
    """Every token writes its keys and values, so decoding one token at a time with the cache
    computes what whole-sequence forwards compute (attention and MLP blocks, 2 sequences).
    Left-padded: the decode steps' attention gets a padding mask with one row (the query's),
    which is not another per-token tensor; every decode graph routes its attention too."""
    model = _decoder(kind)
    ids, mask = _prompts(2, padded)
    forward = model.forward
    model.forward = _compile(forward, {"token_skip": {"capacity": 0.5,
                                                      "blocks": ["attention", "mlp"]}})
    kwargs = dict(GREEDY, attention_mask=mask)
    with torch.inference_mode():
        cached = model.generate(ids, **kwargs)
        recomputed = model.generate(ids, use_cache=False, **kwargs)
    kinds = {r.details["kind"] for r in _rows()}
    assert kinds == {"attention", "mlp"}
    for g in effc.report().graphs:  # the prefill's and every decode step's graph
        routed = [s.details["kind"] for p in g.passes if p.name == "token_skip"
                  for s in p.sites if s.decision == "rewritten"]
        assert sorted(routed) == ["attention", "mlp"], g
    assert torch.equal(cached.sequences, recomputed.sequences)
    for a, b in zip(cached.scores, recomputed.scores):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()


@pytest.mark.slow
@pytest.mark.parametrize("blocks", ["attention", "layer"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_keys_selected_writes_only_the_routed_tokens_to_the_cache_and_generate_agrees(kind,
                                                                                      blocks):
    """Mixture-of-Depths proper in a decoder (batch 1), on the attention block or the whole
    layer: a skipped token writes no keys and values in the routed layer, whose cache holds
    fewer tokens than the others, and decoding with that cache computes what whole-sequence
    forwards compute."""
    model = _decoder(kind)
    ids = torch.randint(3, 96, (1, 8))
    forward = model.forward
    model.forward = _compile(forward, {"token_skip": {"capacity": 0.5, "blocks": [blocks],
                                                      "keys": "selected"}})
    kwargs = dict(GREEDY)
    with torch.inference_mode():
        cached = model.generate(ids, **kwargs)
        recomputed = model.generate(ids, use_cache=False, **kwargs)
    assert _rows() and {r.details["kind"] for r in _rows()} == {blocks}
    assert torch.equal(cached.sequences, recomputed.sequences)
    for a, b in zip(cached.scores, recomputed.scores):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    lengths = [layer.keys.shape[-2] for layer in cached.past_key_values.layers]
    assert lengths[0] == lengths[2] == 13 and 0 < lengths[1] < 13  # 8 + 6 - 1 tokens


@pytest.mark.slow
@pytest.mark.parametrize("padded", [True, False], ids=["left_padded", "unpadded"])
@pytest.mark.parametrize("blocks", ["attention", "layer"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_keys_selected_with_several_sequences_generates_what_each_does_alone(kind, blocks,
                                                                             padded):
    """Mixture-of-Depths proper at batch 3 (one sequence left-padded, or none: the model then
    gives no mask, and the attention is causal by is_causal), whose sequences route
    different numbers of tokens: the routed layer's cache keeps a row per token, those of
    tokens it skipped marked (a zero key, a marked value) and hidden; every sequence gets
    the tokens and scores it gets alone (batch 1, where skipped tokens write no rows at
    all), generate() without the cache agrees, and each unpadded sequence's unmarked rows
    are the rows its batch-1 cache holds."""
    model = _decoder(kind)
    ids, mask = _prompts(3, padded)
    forward = model.forward
    model.forward = _compile(forward, {"token_skip": {"capacity": 0.5, "blocks": [blocks],
                                                      "keys": "selected"}})
    kwargs = dict(GREEDY, attention_mask=mask) if padded else dict(GREEDY)
    with torch.inference_mode():
        batch = model.generate(ids, **kwargs)
        recomputed = model.generate(ids, use_cache=False, **kwargs)
    kwargs = dict(GREEDY)  # for each sequence alone
    assert {r.details["kind"] for r in _rows()} == {blocks}
    for g in effc.report().graphs:  # the prefill's and every decode step's graph routes it
        assert any(s.decision == "rewritten" for p in g.passes for s in p.sites), g
    assert torch.equal(batch.sequences, recomputed.sequences)
    for a, b in zip(batch.scores, recomputed.scores):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    layers = batch.past_key_values.layers
    assert [layer.keys.shape[-2] for layer in layers] == [13] * 3  # 8 + 6 - 1 tokens
    marked = marked_rows(layers[1].values)
    assert not marked_rows(layers[0].values).any() and not marked_rows(layers[2].values).any()
    assert marked[0].any() and len(set(marked.sum(1).tolist())) > 1
    assert not layers[1].keys.transpose(1, 2)[marked].any()  # marked rows: zero keys
    torch._dynamo.reset()  # the same routing plans (effc keeps them), compiled afresh
    for b in range(3):
        alone = ids[b:b + 1, mask[b].bool()]
        with torch.inference_mode():
            one = model.generate(alone, **kwargs)
        assert torch.equal(one.sequences[0, alone.shape[1]:], batch.sequences[b, 8:])
        for a, c in zip(batch.scores, one.scores):
            assert (a[b] - c[0]).abs().max() <= 1e-4 * c[0].abs().max()
        if b != 1 or not padded:
            rows = one.past_key_values.layers[1].keys
            assert rows.shape[-2] == int((~marked[b]).sum()) < 13
            torch.testing.assert_close(layers[1].keys[b:b + 1, :, ~marked[b]], rows,
                                       rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_with_the_cache_matches_generate_without_it(kind):
    model = _llama(layers=3) if kind == "llama" else hf_model("gpt2")[0].eval()
    if kind == "gpt2":  # a third layer, so that a middle layer exists
        model = tf.GPT2LMHeadModel(tf.GPT2Config(**{**model.config.to_dict(), "n_layer": 3}))
        model.eval()
    ids = torch.randint(3, 96, (2, 8))
    forward = model.forward
    model.forward = _compile(forward, {"token_skip": {"capacity": 0.5}})
    kwargs = dict(GREEDY)
    with torch.inference_mode():
        cached = model.generate(ids, **kwargs)
        recomputed = model.generate(ids, use_cache=False, **kwargs)
    assert _rows() and all(r.details["routing"] == "threshold" for r in _rows())
    graphs = effc.report().graphs
    assert len(graphs) >= 3  # prefill, decode steps, no-cache steps: all routed the same way
    assert torch.equal(cached.sequences, recomputed.sequences)
    for a, b in zip(cached.scores, recomputed.scores):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()


def test_a_decoder_called_without_a_cache_and_with_a_mask_still_routes_causally():
    """No cache, an attention_mask: the causal mask is a tensor, which the graph's structure
    does not tell from an encoder's padding mask; its values on the call do."""
    model = _llama(layers=3)
    ids = torch.randint(3, 96, (2, 16))
    compiled = _compile(model, {"token_skip": {"capacity": 0.5}})
    with torch.no_grad():
        full = compiled(ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        assert [r.details["routing"] for r in _rows()] == ["threshold"]
        prefix = compiled(ids[:, :10], attention_mask=torch.ones_like(ids[:, :10]),
                          use_cache=False).logits
    assert (prefix - full[:, :10]).abs().max() <= 1e-5 * full.abs().max()
    model, inputs = hf_model("bert")  # a padding mask with a row per query: not causal
    inputs["attention_mask"][0, -3:] = 0
    with torch.no_grad():
        _compile(model.eval(), {"token_skip": {"capacity": 0.5, "layers": [0, 1]}})(**inputs)
    assert _rows() and {r.details["routing"] for r in _rows()} == {"top_k"}


def _note_db(text):
    return float(re.search(r"SQNR (-?[\d.]+|inf) dB", text).group(1))


def test_the_default_keeps_the_measured_output_bound():
    model = _llama(layers=4)
    batches = [{"input_ids": torch.randint(3, 96, (2, 16))} for _ in range(3)]
    calib = effc.calibrate(model, batches)
    ids = batches[0]["input_ids"]
    compiled = _compile(model, {"token_skip": True, "calibration": calib})
    with torch.no_grad():
        compiled(ids)
    notes = [n for g in effc.report().graphs for n in g.notes if n.startswith("token_skip")]
    assert notes and "min_sqnr_db 25" in notes[0] and _note_db(notes[0]) >= 25.0


def test_routers_fit_on_the_calibrations_residual_rows_in_every_graph():
    model = _llama(layers=3)
    batches = [{"input_ids": torch.randint(3, 96, (2, 16))} for _ in range(4)]
    calib = effc.calibrate(model, batches, what=("inputs", "residuals"), progress=False)
    compiled = _compile(model, {"token_skip": {"capacity": 0.5}, "calibration": calib})
    with torch.no_grad():
        compiled(torch.randint(3, 96, (1, 5)))   # shapes no calibration sample has
        compiled(torch.randint(3, 96, (3, 11)))
    rows = _rows()
    assert len(rows) == 2 and {r.details["router_data"] for r in rows} == {
        "calibration residual rows"}
    assert rows[0].details["threshold"] == rows[1].details["threshold"]
    assert rows[0].details["router_tokens"] == 4 * 2 * 16  # every calibration token
    assert rows[0].details["kept_fraction"] == 0.5


def test_a_budget_keeps_at_most_that_share_of_the_token_work():
    model = _llama(layers=4)
    ids = torch.randint(3, 96, (2, 16))
    compiled = _compile(model, {"token_skip": {"budget": 0.6}})
    with torch.no_grad():
        compiled(ids)
    caps = {r.site: r.details["capacity"] for r in _rows()}
    eligible = 2  # layers 1 and 2 of 4
    kept = sum(caps.values()) + (eligible - len(caps))
    assert caps and kept <= 0.6 * eligible + 1e-9


def test_max_layers_takes_the_least_sensitive_blocks():
    model = _llama(layers=4)
    ids = torch.randint(3, 96, (2, 16))
    compiled = _compile(model, {"token_skip": {"capacity": 0.5, "max_layers": 1}})
    with torch.no_grad():
        compiled(ids)
    rows, kept = _rows(), [r for r in _rows("skipped") if "max_layers" in r.reason]
    assert len(rows) == 1 and len(kept) == 1
    measured = kept[0].error["graph_sqnr_db_alone"]  # what the block left whole would cost
    assert rows[0].error["graph_sqnr_db_alone"] >= measured


@pytest.mark.parametrize("options,key", [
    ({"capacity": 1.5}, "token_skip.capacity"),
    ({"capacity": -0.1}, "token_skip.capacity"),
    ({"budget": 0.5, "capacity": 0.5}, "token_skip"),
    ({"layers": [-1]}, "token_skip.layers"),
    ({"blocks": ["layers"]}, "token_skip.blocks"),
    ({"keys": "some"}, "token_skip.keys"),
    ({"routing": "random"}, "token_skip.routing"),
    ({"max_layers": -2}, "token_skip.max_layers"),
])
def test_bad_settings_raise_value_error_naming_the_key(options, key):
    with pytest.raises(ValueError, match=re.escape(repr(key))):
        effc.Config.from_options({"token_skip": options})


def _route_the_one(module, x, kind, plan):
    """(the output of `module`'s graph with its one `kind` site routed by `plan`, the sites
    found), with the blocks of every kind listed."""
    out = {}

    def backend(gm, example):
        g = copy_graph_module(gm)
        out["sites"] = find_sites(g, GraphFacts(g, example), ("layer",))
        (site,) = [s for s in out["sites"] if s.kind == kind]
        assert (queries_problem(site, plan.keys) if plan.threshold is not None
                else site.why) == ""
        route_site(g, site, plan)
        g.graph.eliminate_dead_code()
        g.recompile()
        out["all"] = g(*example)
        out["routed"] = first_tensor(out["all"])
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(module, backend=backend)(x)
    return out["routed"], out["sites"]


@pytest.mark.parametrize("keys", ["all", "selected"])
def test_routed_attention_queries_see_all_or_only_the_routed_keys(keys):
    torch.manual_seed(0)
    block, x = AttentionBlock().eval(), torch.randn(3, 11, 16)
    router = Router(torch.randn(16), 0.1, 1.0, 1)
    capacity, k = 0.5, math.ceil(0.5 * 11)
    chosen = (x.reshape(-1, 16) @ router.weight + router.bias).reshape(3, 11).topk(k).indices
    chosen = chosen.sort(dim=1).values
    routed, sites = _route_the_one(block, x, "attention", _Plan(router, capacity, None, keys))
    assert len(sites) == 1
    with torch.no_grad():
        full = block(x)
        for b in range(3):
            rows, rest = chosen[b], torch.tensor([t for t in range(11) if t not in chosen[b]])
            got = routed[b]
            assert torch.equal(got[rest], x[b, rest])  # skipped tokens keep their input
            want = full[b, rows] if keys == "all" else block(x[b:b + 1, rows])[0]
            torch.testing.assert_close(got[rows], want, rtol=1e-5, atol=1e-6)


def test_encoder_attention_blocks_route_through_the_pass():
    model, inputs = hf_model("vit")
    with torch.no_grad():
        ref = first_tensor(model.eval()(**inputs))
        out = first_tensor(_compile(model, {"token_skip": {
            "capacity": 0.5, "layers": [0, 1], "blocks": ["attention", "mlp"]}})(**inputs))
    rows = _rows()
    assert sorted(r.details["kind"] for r in rows) == ["attention", "attention", "mlp", "mlp"]
    assert not torch.equal(out, ref)
    model, inputs = hf_model("bert")  # a padding mask: the queries are selected at the SDPA
    inputs["attention_mask"][0, -3:] = 0
    with torch.no_grad():
        _compile(model.eval(), {"token_skip": {"capacity": 0.5, "layers": [0, 1],
                                               "blocks": ["attention"]}})(**inputs)
    assert {(r.details["kind"], r.details["routing"]) for r in _rows()} == {
        ("attention", "top_k")} and len(_rows()) == 2
    with torch.no_grad():  # Mixture-of-Depths proper: the routed tokens' part of the mask
        selected = first_tensor(_compile(model, {"token_skip": {
            "capacity": 0.5, "layers": [0, 1], "blocks": ["attention"],
            "keys": "selected"}})(**inputs))
    assert len(_rows()) == 2 and torch.isfinite(selected).all()
    model, inputs = hf_model("llama")  # a decoder's attention: per-token thresholds
    with torch.no_grad():
        _compile(model, {"token_skip": {"capacity": 0.5, "layers": [0, 1],
                                        "blocks": ["attention"]}})(**inputs)
    assert {(r.details["kind"], r.details["routing"]) for r in _rows()} == {
        ("attention", "threshold")}


def test_arank_picks_the_layer_whose_heads_attend_in_the_fewest_patterns():
    model = _llama(layers=4)
    batches = [{"input_ids": torch.randint(3, 96, (2, 16))} for _ in range(2)]
    calib = effc.calibrate(model, batches, what=("inputs", "attention"), progress=False)
    compiled = _compile(model, {"token_skip": {"capacity": 0.5, "max_layers": 1,
                                               "layer_choice": "arank"},
                                "calibration": calib})
    with torch.no_grad():
        compiled(batches[0]["input_ids"])
    chosen = _rows()
    kept = [r for r in _rows("skipped") if "max_layers" in r.reason]
    assert len(chosen) == 1 and len(kept) == 1
    assert chosen[0].details["arank"] <= kept[0].details["arank"]


class _Layer(torch.nn.Module):
    """A pre-norm transformer layer: h = x + attention(x); out = h + mlp(h)."""

    def __init__(self, d=16):
        super().__init__()
        self.attention = AttentionBlock(d)
        self.ln = torch.nn.LayerNorm(d)
        self.up, self.down = torch.nn.Linear(d, 32), torch.nn.Linear(32, d)

    def forward(self, x):
        h = self.attention(x)
        return h + self.down(torch.relu(self.up(self.ln(h))))


def test_a_routed_layer_runs_attention_and_mlp_on_the_routed_tokens_only():
    torch.manual_seed(0)
    layer, x = _Layer().eval(), torch.randn(3, 11, 16)
    router = Router(torch.randn(16), 0.0, 1.0, 1)
    k = math.ceil(0.5 * 11)
    chosen = (x.reshape(-1, 16) @ router.weight).reshape(3, 11).topk(k).indices.sort(1).values
    routed, sites = _route_the_one(layer, x, "layer", _Plan(router, 0.5, None, "selected"))
    assert len(sites) == 3  # attention, mlp, and the layer of both
    with torch.no_grad():
        for b in range(3):
            rows = chosen[b]
            rest = torch.tensor([t for t in range(11) if t not in rows])
            got = routed[b]
            assert torch.equal(got[rest], x[b, rest])
            torch.testing.assert_close(got[rows], layer(x[b:b + 1, rows])[0], rtol=1e-5,
                                       atol=1e-6)


def test_layers_route_through_the_pass_in_encoders_and_decoders():
    model, inputs = hf_model("vit")
    with torch.no_grad():
        _compile(model, {"token_skip": {"capacity": 0.5, "layers": [0, 1],
                                        "blocks": ["layer"]}})(**inputs)
    rows, skipped = _rows(), _rows("skipped")
    assert [r.details["kind"] for r in rows] == ["layer", "layer"]
    assert sum("part of the routed layer" in r.reason for r in skipped) == 4
    model, inputs = hf_model("llama")
    for ids in (inputs["input_ids"], inputs["input_ids"][:1]):  # batch 2 and batch 1
        with torch.no_grad():
            _compile(model, {"token_skip": {"capacity": 0.5, "layers": [0, 1],
                                            "blocks": ["layer"]}})(ids)
        assert [(r.details["kind"], r.details["routing"]) for r in _rows()] == [
            ("layer", "threshold")] * 2


class _PreNormStack(torch.nn.Module):
    """Three blocks x + mlp(ln(x)): sites layers.0.mlp .. layers.2.mlp."""

    def __init__(self, d=16):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.ModuleDict(
            {"ln": torch.nn.LayerNorm(d), "mlp": torch.nn.Sequential(
                torch.nn.Linear(d, 32), torch.nn.GELU(), torch.nn.Linear(32, d))})
            for _ in range(3))

    def forward(self, x):
        for block in self.layers:
            x = x + block["mlp"](block["ln"](x))
        return x


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "sigmoid"])
def test_a_trained_router_file_routes_as_mixture_of_depths(tmp_path, weighted):
    """Layer 1's router from a file: its top half of tokens by x . w + b go through the MLP,
    their update scaled by sigmoid(score) when asked; the output equals that computed by
    hand. Layer 0's router in the file is used too, since layers are named."""
    torch.manual_seed(0)
    model, x = _PreNormStack().eval(), torch.randn(2, 10, 16)
    routers = {f"layers.{i}.mlp": {"weight": torch.randn(16), "bias": 0.3} for i in (0, 1)}
    path = tmp_path / "routers.pt"
    torch.save(routers, path)
    options = {"capacity": 0.5, "layers": [0, 1, 2], "router": str(path),
               "residual_weight": "sigmoid" if weighted else "none"}
    with torch.no_grad():
        out = _compile(model, {"token_skip": options})(x)
        ref = x
        for i, block in enumerate(model.layers):
            update = block["mlp"](block["ln"](ref))
            if i < 2:
                r = routers[f"layers.{i}.mlp"]
                score = ref @ r["weight"] + r["bias"]                      # [2, 10]
                keep = torch.zeros_like(score, dtype=torch.bool)
                keep.scatter_(1, score.topk(5, dim=1).indices, True)       # ceil(0.5 * 10)
                gate = torch.sigmoid(score) if weighted else torch.ones_like(score)
                update = torch.where(keep[..., None], update * gate[..., None], 0.0)
            ref = ref + update
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    rows = {r.site: r for g in effc.report().graphs for p in g.passes if p.name == "token_skip"
            for r in p.sites}
    assert rows["layers.0.mlp"].decision == rows["layers.1.mlp"].decision == "rewritten"
    assert "trained router" in rows["layers.1.mlp"].reason
    assert ("sigmoid" in rows["layers.1.mlp"].reason) == weighted
    assert rows["layers.1.mlp"].details["router_data"] == f"trained, from {path}"
    assert rows["layers.2.mlp"].decision == "skipped"
    assert "no trained router" in rows["layers.2.mlp"].reason


@pytest.mark.parametrize("content,match", [
    (None, "No such file"),
    ({"layers.1.mlp": torch.randn(16)}, "not a router"),
    ({"layers.1.mlp": {"weight": torch.randn(4, 4)}}, "not a router"),
    ([1, 2], "holds list"),
])
def test_a_bad_router_file_is_a_value_error_naming_the_key(tmp_path, content, match):
    path = tmp_path / "routers.pt"
    if content is not None:
        torch.save(content, path)
    with pytest.raises(ValueError, match=re.escape("'token_skip.router'") + ".*" + match):
        effc.Config.from_options({"token_skip": {"router": str(path)}})


def test_a_router_of_the_wrong_width_keeps_its_block_whole_with_a_warning(tmp_path, caplog):
    torch.manual_seed(0)
    model, x = _PreNormStack().eval(), torch.randn(2, 10, 16)
    path = tmp_path / "routers.pt"
    torch.save({"layers.1.mlp": {"weight": torch.randn(8), "bias": 0.0}}, path)
    with torch.no_grad(), caplog.at_level("WARNING", logger="effc"):
        out = _compile(model, {"token_skip": {"capacity": 0.5, "router": str(path)}})(x)
        assert torch.equal(out, model(x))
    assert "has 8 weights, the block's input 16 features" in caplog.text
    assert _rows() == []


def test_a_trained_router_routes_decoders_per_token_and_stays_causal(tmp_path):
    """In a decoder the trained router's scores get a per-token threshold set on the
    calibration scores, so a prefix's logits are those of the whole sequence."""
    model = _llama(layers=3)
    path = tmp_path / "routers.pt"
    torch.save({"model.layers.1.mlp": {"weight": torch.randn(32), "bias": 0.0}}, path)
    ids = torch.randint(3, 96, (2, 16))
    compiled = _compile(model, {"token_skip": {"capacity": 0.5, "router": str(path),
                                               "residual_weight": "sigmoid"}})
    with torch.no_grad():
        full = compiled(ids).logits
        (row,) = _rows()
        prefix = compiled(ids[:, :10]).logits
    assert row.site == "model.layers.1.mlp" and row.details["routing"] == "threshold"
    assert "trained router" in row.reason and 0.2 <= row.details["kept_fraction"] <= 0.8
    assert (prefix - full[:, :10]).abs().max() <= 1e-5 * full.abs().max()


@pytest.mark.parametrize("kind,knobs,batch,extra", [
    ("llama", {"blocks": ["mlp"]}, 2, {}),
    ("llama", {"blocks": ["attention"]}, 2, {}),                      # queries on routed rows
    ("llama", {"blocks": ["layer"]}, 1, {}),                          # Mixture-of-Depths proper
    ("llama", {"blocks": ["layer"]}, 2, {}),                          # ... at batch > 1
    ("bert", {"blocks": ["attention"], "keys": "selected"}, 2, {}),  # the mask's routed part
    ("vit", {"blocks": ["layer"]}, 2, {}),
    ("llama", {"blocks": ["mlp"]}, 2, {"low_rank": {"rank_ratio": 0.5}}),  # a later pass's op
    ("llama", {"blocks": ["attention"]}, 2, {"hypercomplex": {"max_error": 1.0}})])
def test_routed_graphs_lower_to_triton_with_the_routed_nodes_left_to_eager(kind, knobs, batch,
                                                                         extra):
    """The routed nodes compute on a data-dependent number of rows that their shape metadata
    (the unrouted graph's) does not state: marked ROWS_VARY, the Triton lowering leaves them
    to eager instead of generating kernels for the wrong sizes (which strict mode turns
    into errors), and so do the ops later passes put in their place (low_rank_linear,
    phm_linear). Lowered, the routed model equals the eager-lowered one."""
    from lowering_helpers import DEVICE

    model, inputs = hf_model(kind)
    model = model.eval().to(DEVICE)
    inputs = {k: v[:batch].to(DEVICE) for k, v in inputs.items()}
    if kind == "bert":
        inputs["attention_mask"][-1, 6:] = 0
    outs = {}
    for lowering in ("eager", "triton"):
        with torch.no_grad():
            outs[lowering] = first_tensor(_compile(model, {
                "lowering": lowering, "strict": True, **extra,
                "token_skip": {"capacity": 0.5, "layers": [0, 1], **knobs}})(**inputs))
        graphs = effc.report().graphs
        assert len(_rows()) == 2
        assert all(any(s.decision == "rewritten" for g in graphs for p in g.passes
                       if p.name == name for s in p.sites) for name in extra)
    assert all(not g.fallbacks for g in graphs) and any(g.kernels for g in graphs)
    torch.testing.assert_close(outs["triton"], outs["eager"], rtol=1e-5, atol=1e-5)


def test_graphs_traced_dynamic_route_and_generate_consistently():
    """torch.compile(dynamic=True): the graph takes its sizes as SymInt arguments, which the
    router fit, the rewrite check and the causality check read as the call's own sizes (they
    used to find no input to run on and routed nothing); generate() with the cache equals
    generate() without it."""
    model = _llama(layers=3)
    ids = torch.randint(3, 96, (2, 8))
    forward = model.forward
    torch._dynamo.reset()
    effc.reset()
    model.forward = torch.compile(forward, backend="effc", dynamic=True, options={
        "strict": True, "token_skip": {"capacity": 0.5, "blocks": ["attention", "mlp"]}})
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    try:
        with torch.inference_mode():
            cached = model.generate(ids, **kwargs)
            recomputed = model.generate(ids, use_cache=False, **kwargs)
    finally:
        model.forward = forward
    graphs = effc.report().graphs
    assert graphs and all(sorted(s.details["kind"] for p in g.passes if p.name == "token_skip"
                                 for s in p.sites if s.decision == "rewritten")
                          == ["attention", "mlp"] for g in graphs)
    assert torch.equal(cached, recomputed)
