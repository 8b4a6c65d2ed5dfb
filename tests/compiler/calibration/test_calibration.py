"""effc.calibrate: statistics equal a direct computation on the same batches, keyed by the
names passes see; save/load; foreign and stale calibrations are reported per site."""

import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import LINEAR, MLP, BrokenMLP, SmallCNN, first_tensor, hf_model

import effc
from effc.compiler.calibration import observer
from effc.compiler.calibration import CALIBRATION_VERSION, Calibration
from effc.compiler.graph_facts import GraphFacts

TIGHT = dict(rtol=1e-12, atol=1e-12)


def _param_names(model):
    names = {}
    for name, p in model.named_parameters():
        names.setdefault(id(p), name)
    return names


def _call(model, batch):
    if isinstance(batch, torch.Tensor):
        return model(batch)
    return model(**batch) if isinstance(batch, dict) else model(*batch)


def direct_moments(model, batches):
    """weight name -> (sum x x^T in float64, rows), from forward pre-hooks in eager mode."""
    from transformers.pytorch_utils import Conv1D

    names, out, handles = _param_names(model), {}, []

    def rows_of(module, x):
        if isinstance(module, nn.Conv2d):
            p = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
            return p.transpose(1, 2).reshape(-1, p.shape[1])
        k = module.weight.shape[0 if isinstance(module, Conv1D) else 1]
        return x.reshape(-1, k)

    def hook(module, args):
        x = rows_of(module, args[0]).double()
        key = names[id(module.weight)]
        s, n = out.get(key, (0, 0))
        out[key] = (s + x.T @ x, n + x.shape[0])

    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, Conv1D)):
            handles.append(m.register_forward_pre_hook(hook))
    model.eval()
    with torch.no_grad():
        for b in batches:
            _call(model, b)
    for h in handles:
        h.remove()
    return out


def assert_moments_equal(calib, direct):
    assert set(calib.inputs) == set(direct)
    for name, (s, rows) in direct.items():
        assert calib.inputs[name].rows == rows, name
        torch.testing.assert_close(calib.inputs[name].sum_xxt, s, **TIGHT, msg=name)
        assert calib.inputs[name].sum_xxt.dtype == torch.float64


def test_mlp_moments_equal_hooks_for_tensor_tuple_and_dict_batches():
    torch.manual_seed(0)
    model = MLP()
    xs = [torch.randn(2, 5, 16), torch.randn(3, 16), torch.randn(4, 2, 16)]
    batches = [xs[0], (xs[1],), {"x": xs[2]}]
    calib = effc.calibrate(model, batches, progress=False)
    assert_moments_equal(calib, direct_moments(model, xs))
    assert calib.inputs["fc1.weight"].rows == 10 + 3 + 8 and calib.batches == 3
    assert calib.weight_shapes == {n: tuple(p.shape) for n, p in model.named_parameters()}
    torch.testing.assert_close(calib.input_moment("fc1.weight"),
                               sum(x.reshape(-1, 16).double().T @ x.reshape(-1, 16).double()
                                   for x in xs) / 21, **TIGHT)


def test_cnn_moments_equal_unfolded_patches_and_training_flags_restored():
    torch.manual_seed(0)
    model = SmallCNN()
    batches = [torch.randn(2, 1, 9, 9), torch.randn(3, 1, 9, 9)]
    calib = effc.calibrate(model, batches, progress=False)
    assert model.training and model.bn.training  # calibrate ran in eval, restored afterwards
    direct = direct_moments(model, batches)
    assert_moments_equal(calib, direct)
    assert calib.inputs["conv1.weight"].rows == 5 * 9 * 9           # padding 1: one row a pixel
    assert calib.inputs["conv2.weight"].sum_xxt.shape == (8 * 9, 8 * 9)
    assert calib.inputs["conv2.weight"].rows == 5 * 4 * 4           # 3x3, stride 2, no padding


class ConvZoo(nn.Module):
    """Conv padding strings, dilation, a 1-d conv, and a grouped conv (not recorded)."""

    def __init__(self):
        super().__init__()
        self.same1d = nn.Conv1d(3, 4, 4, padding="same", dilation=2)
        self.valid2d = nn.Conv2d(4, 5, (2, 3), padding="valid", stride=(2, 1))
        self.same2d = nn.Conv2d(5, 6, 2, padding="same")
        self.grouped = nn.Conv2d(6, 6, 3, groups=2)

    def forward(self, x):  # x: [B, 3, 40]
        h = self.same1d(x).reshape(x.shape[0], 4, 8, 5)
        return self.grouped(self.same2d(self.valid2d(h)))


def _patches_by_jacobian(conv, x):
    """Independent oracle: the conv's output is linear in its weight, so d out / d W = patches."""
    f = (F.conv1d if isinstance(conv, nn.Conv1d) else F.conv2d)
    out = lambda w: f(x, w, None, conv.stride, conv.padding, conv.dilation)  # noqa: E731
    jac = torch.func.jacrev(out)(conv.weight.detach())  # [B, C_out, *pos, C_out, C_in, *k]
    positions = jac[:, 0].flatten(1, -1 - conv.weight.dim())[:, :, 0]  # [B, positions, C_in, *k]
    return positions.reshape(-1, conv.weight[0].numel()).double()


@pytest.mark.filterwarnings("ignore:Using padding='same'")  # torch's note on even kernels
def test_conv_padding_strings_dilation_and_conv1d_match_the_jacobian_oracle():
    torch.manual_seed(0)
    model = ConvZoo().eval()
    x = torch.randn(2, 3, 40)
    calib = effc.calibrate(model, [x], progress=False)
    with torch.no_grad():
        h1 = model.same1d(x).reshape(2, 4, 8, 5)
        h2 = model.valid2d(h1)
    for name, conv, inp in [("same1d", model.same1d, x), ("valid2d", model.valid2d, h1),
                            ("same2d", model.same2d, h2)]:
        rows = _patches_by_jacobian(conv, inp)
        m = calib.inputs[f"{name}.weight"]
        assert m.rows == rows.shape[0], name
        torch.testing.assert_close(m.sum_xxt, rows.T @ rows, **TIGHT, msg=name)
    assert "grouped.weight" not in calib.inputs
    assert any("grouped.weight" in n and "groups=2" in n for n in calib.notes)


def test_streaming_blocks_give_the_same_sums(monkeypatch):
    torch.manual_seed(0)
    model, batches = SmallCNN(), [torch.randn(3, 1, 8, 8)]
    whole = effc.calibrate(model, batches, progress=False)
    monkeypatch.setattr(observer, "_BLOCK", 50)  # a few rows at a time: memory does not grow
    blocks = effc.calibrate(model, batches, progress=False)
    for name, m in whole.inputs.items():
        assert blocks.inputs[name].rows == m.rows
        torch.testing.assert_close(blocks.inputs[name].sum_xxt, m.sum_xxt, **TIGHT)


def _names_passes_see(model, inputs):
    """Weight names at linear/addmm sites, from GraphFacts on the graphs Dynamo gives effc."""
    seen = set()

    def backend(gm, example_inputs):
        facts = GraphFacts(gm, example_inputs)
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target in (LINEAR, torch.addmm):
                name = facts.weight_name(n.args[1 if n.target is LINEAR else 2])
                if name is not None:
                    seen.add(name)
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend)(**inputs)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt2", "llama", "vit"])
def test_hf_moments_equal_hooks_and_every_site_name_is_present(kind):
    model, inputs = hf_model(kind)
    model.eval()
    if kind == "vit":
        batches = [inputs, {"pixel_values": torch.randn(2, 3, 16, 16)}]
    elif kind == "gpt2":  # another length and batch size: the second graph has SymInt sizes
        batches = [inputs, {"input_ids": torch.randint(0, 96, (3, 6))}]
    else:
        batches = [inputs, {"input_ids": torch.randint(0, 96, (2, 9))}]
    calib = effc.calibrate(model, batches, progress=False)
    direct = direct_moments(model, batches)
    assert_moments_equal(calib, direct)
    assert _names_passes_see(model, inputs) <= set(calib.inputs)
    tokens = {"gpt2": 2 * 9 + 3 * 6, "llama": 2 * 2 * 9, "vit": 4 * 17}[kind]
    # the last layer's MLP output projection (ViT's is named differently across versions)
    last_mlp = next(n for n in reversed(list(dict(model.named_parameters())))
                    if n.endswith(("mlp.c_proj.weight", "down_proj.weight", "fc2.weight",
                                   "layer.1.output.dense.weight")))
    assert calib.inputs[last_mlp].rows == tokens


def test_kv_moments_equal_the_tensors_sdpa_receives(monkeypatch):
    model, inputs = hf_model("llama")
    calib = effc.calibrate(model, [inputs], what=("kv",), progress=False)
    assert not calib.inputs  # only what was asked for
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((k.double(), v.double()))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        model.eval()(**inputs)
    names = [f"model.layers.{i}.self_attn" for i in range(2)]
    assert list(calib.keys) == names == list(calib.values)
    for (k, v), name in zip(seen, calib.keys):
        for stats, t in ((calib.keys[name], k), (calib.values[name], v)):
            assert stats.count == 2 * 9 and stats.sum.shape == (2, 8)  # 2 key/value heads (GQA)
            torch.testing.assert_close(stats.mean(), t.mean(dim=(0, 2)), **TIGHT)
            flat = t.permute(1, 0, 2, 3).reshape(2, -1, 8)
            centered = flat - flat.mean(dim=1, keepdim=True)
            torch.testing.assert_close(stats.covariance(), centered.transpose(1, 2) @ centered / 18,
                                       rtol=1e-10, atol=1e-12)


def test_residual_norms_equal_hooks():
    model, inputs = hf_model("llama")
    calib = effc.calibrate(model, [inputs], what=("residuals",), progress=False)
    layer = model.model.layers[0]
    got = {}

    def keep(key):
        return lambda module, args, out: got.__setitem__(key, out)

    def keep_input(module, args, kwargs):
        got["in"] = args[0] if args else kwargs["hidden_states"]

    hooks = [layer.register_forward_pre_hook(keep_input, with_kwargs=True),
             layer.self_attn.o_proj.register_forward_hook(keep("attn")),
             layer.mlp.down_proj.register_forward_hook(keep("mlp"))]
    with torch.no_grad():
        model.eval()(**inputs)
    for h in hooks:
        h.remove()
    mid = got["in"] + got["attn"]
    for name, stream, update in [("self_attn.o_proj", got["in"], got["attn"]),
                                 ("mlp.down_proj", mid, got["mlp"])]:
        r = calib.residuals[f"model.layers.0.{name}.weight"]
        ratio = update.double().norm(dim=-1) / stream.double().norm(dim=-1)
        assert r.tokens == 18
        assert r.mean_ratio() == pytest.approx(ratio.mean().item(), rel=1e-6)
        assert r.sum_sq_update == pytest.approx(update.double().square().sum().item(), rel=1e-6)
        # token_skip's router data: every token's stream row and update norm (18 < ROUTER_ROWS)
        torch.testing.assert_close(r.rows, stream.reshape(-1, stream.shape[-1]).float())
        torch.testing.assert_close(r.update_norms, update.double().norm(dim=-1).flatten().float())
    assert len(calib.residuals) == 4  # two residual adds per layer, nothing else (GELU-like adds)


def test_residual_rows_stop_at_the_limit_and_survive_save_and_load(monkeypatch, tmp_path):
    from effc.compiler.calibration import statistics

    monkeypatch.setattr(statistics, "ROUTER_ROWS", 25)
    model, inputs = hf_model("llama")  # 18 tokens per batch
    calib = effc.calibrate(model, [inputs, inputs], what=("residuals",), progress=False)
    r = calib.residuals["model.layers.0.mlp.down_proj.weight"]
    assert r.tokens == 36 and r.rows.shape == (25, 32) and r.update_norms.shape == (25,)
    torch.testing.assert_close(r.rows[18:], r.rows[:7])  # the second batch's first 7 tokens
    calib.save(tmp_path / "c.pt")
    back = effc.Calibration.load(tmp_path / "c.pt").residuals["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(back.rows, r.rows) and torch.equal(back.update_norms, r.update_norms)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_attention_maps_at_sdpa_equal_eager_softmax(kind):
    model, inputs = hf_model(kind)
    if kind == "bert":  # padding: the last 3 tokens of the first sample are masked out
        inputs["attention_mask"][0, -3:] = 0
    what = ("attention", "residuals")
    sdpa = effc.calibrate(model, [inputs, inputs], what=what, attention_maps=1, progress=False)
    model.config._attn_implementation = "eager"
    eager = effc.calibrate(model, [inputs], what=("attention",), progress=False)
    layers = ["transformer.h.0.attn", "transformer.h.1.attn"] if kind == "gpt2" else \
        ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"]
    assert list(sdpa.attention) == list(eager.attention) == layers
    for name, maps in sdpa.attention.items():
        assert len(maps) == 1 and maps[0].shape == (4, 9, 9)
        torch.testing.assert_close(maps[0], eager.attention[name][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(maps[0].sum(-1), torch.ones(4, 9))
        if kind == "gpt2":
            assert maps[0].triu(1).abs().max() == 0  # causal
        else:
            assert maps[0][:, :, -3:].abs().max() == 0  # padded keys get no attention
    if kind == "gpt2":  # the residual adds only, not gelu_new's `x + 0.044715 * x**3`
        assert sorted(sdpa.residuals) == [f"transformer.h.{i}.{m}.c_proj.weight"
                                          for i in range(2) for m in ("attn", "mlp")]


def test_model_unchanged_and_later_effc_compile_bit_identical():
    torch.manual_seed(0)
    model = BrokenMLP().eval()
    x = torch.randn(4, 16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(x)
    for n in (3, 5, 7):  # graph breaks, recompiles for new shapes
        calib = effc.calibrate(model, [torch.randn(n, 16), torch.randn(2, n, 16)], progress=False)
        assert calib.inputs["fc2.weight"].rows == 3 * n and calib.batches == 2
    for _ in range(9):  # more calls than Dynamo's recompile limit: every batch still recorded
        assert effc.calibrate(model, [x], progress=False).inputs["head.weight"].rows == 4
    wrapped = torch.compile(model, backend="effc")  # observed as the module it wraps
    assert set(effc.calibrate(wrapped, [x], progress=False).inputs) == {
        "fc1.weight", "fc2.weight", "head.weight"}
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), before)
        assert torch.equal(torch.compile(model, backend="effc")(x), before)


def test_hf_outputs_bit_identical_after_calibrating_and_under_effc():
    model, inputs = hf_model("bert")
    model.eval()
    with torch.no_grad():
        ref = first_tensor(model(**inputs))
    calib = effc.calibrate(model, [inputs], what=("inputs", "kv", "residuals", "attention"),
                           progress=False)
    assert calib.inputs and calib.keys and calib.residuals and calib.attention
    compiled = torch.compile(model, backend="effc", options={"calibration": calib})
    with torch.no_grad():
        assert torch.equal(first_tensor(model(**inputs)), ref)
        assert torch.equal(first_tensor(compiled(**inputs)), ref)


def test_sample_inputs_are_the_first_calls_of_each_graph_and_survive_save_load(tmp_path):
    model = MLP().eval()
    batches = [torch.randn(3, 16) for _ in range(5)]
    calib = effc.calibrate(model, batches, progress=False, samples=2)
    (key, kept), = calib.samples.items()
    assert len(kept) == 2 and all(torch.equal(k[0], b) for k, b in zip(kept, batches))
    calib.save(tmp_path / "c.pt")
    loaded = Calibration.load(tmp_path / "c.pt")
    assert torch.equal(loaded.sample_inputs(key)[1][0], batches[1])
    assert effc.calibrate(model, batches, progress=False, samples=0).samples == {}
    with pytest.raises(ValueError, match="samples must be an int >= 0"):
        effc.calibrate(model, batches, samples=-1)


def test_repr_is_a_one_screen_summary():
    model, inputs = hf_model("llama")
    calib = effc.calibrate(model, [inputs, inputs], what=("inputs", "kv", "residuals",
                                                          "attention"), progress=False)
    text = repr(calib)
    assert len(text.splitlines()) <= 8 and len(text) < 600, text
    assert "source=LlamaForCausalLM, batches=2" in text and "tensor(" not in text
    assert f"inputs: {len(calib.inputs)} sites" in text and "keys: 2 attention sites" in text


def test_save_load_round_trip_is_exact(tmp_path):
    model, inputs = hf_model("llama")
    calib = effc.calibrate(model, [inputs], what=("inputs", "kv", "residuals", "attention"),
                           progress=False)
    path = tmp_path / "calib.pt"
    calib.save(path)
    loaded = Calibration.load(path)
    assert loaded.weight_shapes == calib.weight_shapes and loaded.notes == calib.notes
    assert (loaded.batches, loaded.source, loaded.version) == (1, "LlamaForCausalLM",
                                                               CALIBRATION_VERSION)
    assert loaded.inputs.keys() == calib.inputs.keys()
    for name, m in calib.inputs.items():
        assert torch.equal(loaded.inputs[name].sum_xxt, m.sum_xxt)
        assert loaded.inputs[name].rows == m.rows
    for table in ("keys", "values"):
        for name, m in getattr(calib, table).items():
            got = getattr(loaded, table)[name]
            assert torch.equal(got.sum, m.sum) and torch.equal(got.sum_outer, m.sum_outer)
            assert got.count == m.count
    assert loaded.residuals.keys() == calib.residuals.keys()
    for name, r in calib.residuals.items():
        got = loaded.residuals[name]
        assert (got.sum_ratio, got.sum_sq_update, got.sum_sq_stream, got.tokens) == (
            r.sum_ratio, r.sum_sq_update, r.sum_sq_stream, r.tokens)
        assert torch.equal(got.rows, r.rows) and torch.equal(got.update_norms, r.update_norms)
    assert all(torch.equal(a, b) for name in calib.attention
               for a, b in zip(loaded.attention[name], calib.attention[name]))
    buf = io.BytesIO()
    loaded.save(buf)
    buf.seek(0)
    assert Calibration.load(buf).inputs.keys() == calib.inputs.keys()


def test_unknown_version_and_foreign_file_are_rejected(tmp_path):
    calib = effc.calibrate(MLP(), [torch.randn(3, 16)], progress=False)
    calib.version = 99
    calib.save(tmp_path / "future.pt")
    with pytest.raises(ValueError, match="version 99"):
        Calibration.load(tmp_path / "future.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an effc calibration"):
        Calibration.load(tmp_path / "other.pt")


def test_foreign_model_and_missing_sites_are_reported_per_weight():
    calib = effc.calibrate(MLP(d_hidden=32), [torch.randn(4, 16)], progress=False)
    other = MLP(d_hidden=48)
    site_weights = {n: p for n, p in other.named_parameters() if n.endswith("weight")}
    problems = calib.check(site_weights)
    assert set(problems) == set(site_weights)  # every layer's shape differs
    assert "fc1.weight" in problems["fc1.weight"] and "(32, 16)" in problems["fc1.weight"]
    assert "(48, 16)" in problems["fc1.weight"] and "MLP" in problems["fc1.weight"]
    moment, why = calib.lookup("fc1.weight", (48, 16))
    assert moment is None and why == problems["fc1.weight"]
    assert calib.check({n: p for n, p in MLP().named_parameters() if n.endswith("weight")}) == {}
    moment, why = calib.lookup("fc1.weight", (32, 16))
    assert why == "" and moment.shape == (16, 16)
    missing = calib.check({"decoder.out.weight": (5, 32), "fc1.bias": (32,)})
    assert "decoder.out.weight" in missing["decoder.out.weight"]
    assert "no weight of that name" in missing["decoder.out.weight"]
    assert "never reached a linear/conv site" in missing["fc1.bias"]
    bare = Calibration.from_moments({"fc1.weight": torch.eye(16)})  # no shapes recorded
    assert bare.check({"fc1.weight": (32, 16)}) == {}
    assert "fits no input dimension" in bare.check({"fc1.weight": (32, 8)})["fc1.weight"]


def test_bad_arguments_and_progress_bar(capsys):
    model = MLP()
    with pytest.raises(ValueError, match="what="):
        effc.calibrate(model, [torch.randn(2, 16)], what=("inputs", "kv_cache"))
    with pytest.raises(TypeError, match="a batch must be"):
        effc.calibrate(model, ["text"], progress=False)
    with pytest.raises(ValueError, match="no batches"):
        effc.calibrate(model, [], progress=False)
    calib = effc.calibrate(model, (torch.randn(2, 16) for _ in range(5)), max_batches=3)
    assert calib.batches == 3 and calib.inputs["fc1.weight"].rows == 6
    assert "effc calibrate" in capsys.readouterr().err


# --- padding: token_mask ------------------------------------------------------------------
# Padded and one-at-a-time runs do the same float32 math in other shapes and reduction orders:
# activations agree to a few float32 ulps (observed <= 2e-7 relative), sums in float64 add
# nothing. 1e-5 leaves 50x margin; counting padding moves the moments by > 1e-3.
PADDED_RTOL = 1e-5


def _rel(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).norm() / b.norm()).item()


def _padded_and_singles(kind, lengths=(9, 6, 3)):
    """An HF model, one right-padded batch of sequences of `lengths`, and the same sequences
    as unpadded batches of one (no attention_mask). Token 0 is the padding."""
    model, _ = hf_model(kind)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(1, 96, (n,), generator=g) for n in lengths]
    ids = torch.zeros(len(seqs), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    return model, {"input_ids": ids, "attention_mask": mask}, [{"input_ids": s[None]} for s in seqs]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "bert"])  # causal (GQA), bidirectional
def test_padded_batch_records_what_its_sequences_record_one_at_a_time(kind):
    model, padded, singles = _padded_and_singles(kind)
    what, real = ("inputs", "kv", "residuals"), 9 + 6 + 3
    got = effc.calibrate(model, [padded], what=what, progress=False)  # token_mask="auto"
    want = effc.calibrate(model, singles, what=what, progress=False)
    counted = effc.calibrate(model, [padded], what=what, progress=False, token_mask=None)
    pooled = {"pooler.dense.weight"}  # BERT's pooler reads one row a sequence: nothing to mask
    assert set(got.inputs) == set(want.inputs) == set(counted.inputs)
    for name, m in want.inputs.items():
        assert got.inputs[name].rows == m.rows == (3 if name in pooled else real), name
        assert _rel(got.inputs[name].sum_xxt, m.sum_xxt) < PADDED_RTOL, name
        if name not in pooled:
            assert counted.inputs[name].rows == 3 * 9
            assert _rel(counted.inputs[name].mean(), m.mean()) > 1e-3, name
    assert list(got.keys) == list(want.keys) and len(got.keys) == 2
    for table in ("keys", "values"):
        for name, m in getattr(want, table).items():
            g, c = getattr(got, table)[name], getattr(counted, table)[name]
            assert g.count == m.count == real and c.count == 3 * 9
            assert g.sum.shape == m.sum.shape == ((2, 8) if kind == "llama" else (4, 8))
            assert _rel(g.sum, m.sum) < PADDED_RTOL and _rel(g.sum_outer, m.sum_outer) < PADDED_RTOL
            assert _rel(c.covariance(), m.covariance()) > 1e-3
    assert set(got.residuals) == set(want.residuals) and len(want.residuals) == 4
    for name, r in want.residuals.items():
        g, c = got.residuals[name], counted.residuals[name]
        assert g.tokens == r.tokens == real and c.tokens == 3 * 9
        for field in ("sum_ratio", "sum_sq_update", "sum_sq_stream"):
            assert _rel(getattr(g, field), getattr(r, field)) < PADDED_RTOL, (name, field)
        # BERT's stream is layer-normed (||stream||^2 = D): the update's size shows the padding
        assert _rel(c.sum_sq_update / c.tokens, r.sum_sq_update / r.tokens) > 1e-3
    assert got.notes == [n for n in got.notes if n.startswith("pooler.dense.weight: token mask")]
    assert len(got.notes) == (kind == "bert") and not counted.notes


class TokenSites(nn.Module):
    """Linear inputs in four layouts: [B, T, K]; [B*T, K] flattened from it (token-major);
    [T*B, K] flattened from a transpose (not token-major); a conv over the tokens."""

    def __init__(self):
        super().__init__()
        self.fc, self.flat, self.seq_first = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)

    def forward(self, x, attention_mask=None, keep=None):
        h = torch.relu(self.fc(x))
        f = self.flat(h.reshape(-1, 8)).view(h.shape)
        return self.seq_first(f.transpose(0, 1).reshape(-1, 8)).sum() + self.conv(
            x.transpose(1, 2)).sum()


def test_mask_applies_where_rows_are_token_major_and_notes_the_rest():
    torch.manual_seed(0)
    model = TokenSites().eval()
    x, mask = torch.randn(2, 5, 8), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    calib = effc.calibrate(model, [{"x": x, "keep": mask}], token_mask="keep", progress=False)
    with torch.no_grad():
        h = torch.relu(model.fc(x))
        f = model.flat(h)
    real = mask.bool()
    for name, rows in [("fc", x[real]), ("flat", h[real]),
                       ("seq_first", f.transpose(0, 1).reshape(-1, 8))]:
        m, rows = calib.inputs[f"{name}.weight"], rows.double()
        assert m.rows == rows.shape[0], name
        torch.testing.assert_close(m.sum_xxt, rows.T @ rows, rtol=1e-6, atol=1e-6, msg=name)
    assert calib.inputs["conv.weight"].rows == 2 * 5  # every position: one row a token
    assert sorted(n.split(":")[0] for n in calib.notes) == ["conv.weight", "seq_first.weight"]
    auto = effc.calibrate(model, [{"x": x, "attention_mask": mask}], progress=False)
    assert auto.inputs["fc.weight"].rows == 7 and auto.notes == calib.notes
    unpadded = effc.calibrate(model, [{"x": x, "attention_mask": torch.ones(2, 5)}],
                              progress=False)
    assert unpadded.inputs["fc.weight"].rows == 10 and not unpadded.notes  # nothing to drop


def test_masked_and_unmasked_batches_mix_and_gqa_heads_stay_key_value_heads():
    """HF repeats K/V heads to the query heads when it passes SDPA a mask; the observer
    records the key/value heads either way, so padded and unpadded batches add up."""
    model, padded, singles = _padded_and_singles("llama")
    calib = effc.calibrate(model, [padded, singles[0]], what=("kv",), progress=False)
    for m in calib.keys.values():
        assert m.sum.shape == (2, 8) and m.count == 18 + 9


def test_bad_token_mask_is_a_value_error_naming_the_argument():
    model, padded, _ = _padded_and_singles("llama")
    ids, mask = padded["input_ids"], padded["attention_mask"]
    bad = [
        ("pad_mask", [padded], "has no 'pad_mask'"),                       # unknown key
        ("attention_mask", [{"input_ids": ids}], "has no 'attention_mask'"),
        ("attention_mask", [ids], "not a dict"),
        ("attention_mask", [{"input_ids": ids, "attention_mask": mask[:, :-1]}], "shape"),
        ("attention_mask", [{"input_ids": ids, "attention_mask": mask[:, None]}], "not a 2-D"),
        ("attention_mask", [{"input_ids": ids, "attention_mask": mask * 2}], "0 and 1"),
        (3, [padded], "expected the key"),
    ]
    for token_mask, batches, why in bad:
        with pytest.raises(ValueError, match=f"token_mask={token_mask!r}.*{why}"):
            effc.calibrate(model, batches, token_mask=token_mask, progress=False)
    # "auto" never refuses a batch the model takes: it notes why padding is counted instead
    tiny = TokenSites().eval()
    calib = effc.calibrate(tiny, [{"x": torch.randn(2, 5, 8),
                                   "attention_mask": torch.ones(2, 1, 5, 5)}], progress=False)
    assert calib.inputs["fc.weight"].rows == 10
    assert calib.notes == ["token mask: batch['attention_mask'] is (2, 1, 5, 5), not a 2-D "
                           "[batch, tokens] mask; padding positions counted (token_mask='auto')"]
