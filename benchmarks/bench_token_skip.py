"""token_skip benchmarks: quality vs MLP token work, and CPU time vs sequence length.

    .venv/bin/python benchmarks/bench_token_skip.py                 # all parts, prints tables
    .venv/bin/python benchmarks/bench_token_skip.py --part a --record   # also BENCHMARKS.md

(a) Quality, training-free, on the byte-level Llama trained here (held-out text: next-token
    agreement with the unmodified model, perplexity) and the digits ViT (test accuracy,
    agreement): capacity x layers, the allocator's budget, the default, and dropping whole
    MLP blocks (capacity 0) at equal work. Routers and thresholds come from calibration on
    training data; every number is measured on held-out data.
(b) CPU time of one forward at 128..2048 tokens (batch 1) vs eager, with the FLOP ratio of
    the whole model and how much of the FLOP saving the time realizes. Timed with top-k
    routing (exactly ceil(c T) tokens per routed block, so the FLOP ratio is exact).
(c) CUDA only: the gather/scatter Triton kernels vs torch, and a routed MLP block vs a whole
    one, with triton.testing.do_bench.
(d) As (b), on a Llama of width 512 built from config (random weights, time only): how much
    of the saving the routing realizes once the MLP is not tiny next to its fixed cost.
(e) On that Llama at 1024 tokens: the MLPs, the attention blocks (keys all and selected)
    and whole layers of layers 1 and 2 routed at capacity 0.5, per-token thresholds.
(f) On that Llama, batches of 4 sequences: generate()'s prefill and decode step with the
    blocks of (e) routed, where each sequence routes its own number of tokens
    (Mixture-of-Depths proper pads each to the most any routes, and its layer's cache
    keeps marked rows of the skipped tokens).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import effc  # noqa: E402
from benchmarks.common import (machine, main_output, run_parts, table,  # noqa: E402
                               time_interleaved)


def _compiled(model, options):
    torch._dynamo.reset()
    effc.reset()
    return torch.compile(model, backend="effc", options=options)


def _routed(kind: str):
    """{layer: capacity} of the `kind` blocks the last compile routed (threshold: the
    fraction of calibration tokens above it)."""
    out = {}
    for s in effc.report().sites:
        if s.pass_name == "token_skip" and s.decision == "rewritten" and \
                s.details["kind"] == kind:
            d = s.details
            out[d["layer"]] = d.get("kept_fraction", d["capacity"])
    return out


def _llama(quick: bool):
    from benchmarks.models import text_lm

    model, (train_ids, val_ids) = text_lm.get_model("text_llama")
    ctx = text_lm.CONTEXT
    starts = torch.linspace(0, len(train_ids) - ctx - 1, 32 if quick else 64).long()
    batches = list(torch.stack([train_ids[s:s + ctx] for s in starts]).split(8))
    n_win = min(len(val_ids) // (ctx + 1), 32 if quick else 256) // 8 * 8
    windows = val_ids[: n_win * (ctx + 1)].view(n_win, ctx + 1)
    with torch.no_grad():
        ref = [main_output(model(w[:, :-1].contiguous())).argmax(-1) for w in windows.split(8)]
    ref = torch.cat(ref)

    def metrics(m, batch: int = 8):
        nll, count, agree = 0.0, 0, 0
        with torch.no_grad():
            for w, r in zip(windows.split(batch), ref.split(batch)):
                logits = main_output(m(w[:, :-1].contiguous())).float()
                nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                       w[:, 1:].reshape(-1), reduction="sum").item()
                agree += (logits.argmax(-1) == r).sum().item()
                count += w[:, 1:].numel()
        return {"agreement": agree / count, "val perplexity": math.exp(nll / count)}

    return "text_llama (4 layers)", model, batches, metrics, 4, False


def _vit(quick: bool):
    from benchmarks.models import digits

    model, (xtr, _, xte, yte) = digits.get_model("digits_vit")
    n = len(xte) // 100 * 100
    xte, yte = xte[:n], yte[:n]
    with torch.no_grad():
        ref = torch.cat([main_output(model(x)).argmax(-1) for x in xte.split(100)])

    def metrics(m):
        with torch.no_grad():
            pred = torch.cat([main_output(m(x)).argmax(-1) for x in xte.split(100)])
        return {"agreement": (pred == ref).float().mean().item(),
                "test accuracy": (pred == yte).float().mean().item()}

    return "digits_vit (3 layers)", model, list(xtr[:400].split(100)), metrics, 3, True


def _variants(layers: int, encoder: bool) -> list[tuple[str, dict]]:
    middle = list(range(1, layers - 1))
    every = list(range(layers))
    out = []
    for c in (0.875, 0.75, 0.5):
        out.append((f"capacity {c}, layers {middle}", {"capacity": c}))
    for c in (0.875, 0.75):
        out.append((f"capacity {c}, layers {every}", {"capacity": c, "layers": every}))
    for k in middle:
        out.append((f"drop MLP of layer {k} (capacity 0)", {"capacity": 0.0, "layers": [k]}))
    if not encoder:  # a decoder's attention: keys all (the work column counts MLP work only)
        out.append((f"capacity 0.75, layers {middle}, attention only",
                    {"capacity": 0.75, "blocks": ["attention"]}))
        out.append((f"capacity 0.75, layers {middle}, attention and MLP",
                    {"capacity": 0.75, "blocks": ["attention", "mlp"]}))
        out.append((f"capacity 0.75, layers {middle}, attention only, keys selected",
                    {"capacity": 0.75, "blocks": ["attention"], "keys": "selected"}))
        out.append((f"capacity 0.75, layers {middle}, whole layers",
                    {"capacity": 0.75, "blocks": ["layer"]}))
    if encoder:  # attention blocks too (the work column counts MLP work only)
        for keys in ("all", "selected"):
            out.append((f"capacity 0.75, layers {middle}, attention and MLP, keys {keys}",
                        {"capacity": 0.75, "blocks": ["attention", "mlp"], "keys": keys}))
        out.append((f"capacity 0.75, layers {middle}, whole layers (attention then MLP)",
                    {"capacity": 0.75, "blocks": ["layer"]}))
    out.append(("budget 0.5 of the eligible blocks' work", {"budget": 0.5}))
    out.append(("default (min_sqnr_db 25)", {}))
    return out


def part_a(quick: bool) -> str:
    out = []
    for make in (_llama, _vit):
        name, model, batches, metrics, layers, encoder = make(quick)
        calib = effc.calibrate(model, batches, progress=False, samples=4)
        rows = [["unmodified", 1.0, *metrics(model).values()]]
        for label, knobs in _variants(layers, encoder):
            compiled = _compiled(model, {"token_skip": knobs, "calibration": calib})
            with torch.no_grad():
                compiled(batches[0])
            result = metrics(compiled)
            if "attention" in knobs.get("blocks", ()):
                assert _routed("attention"), "no attention block was routed"
            routed = {**_routed("mlp"), **_routed("layer")}
            work = (layers - len(routed) + sum(routed.values())) / layers
            rows.append([label, work, *result.values()])
        headers = ["setting", "MLP token work kept", *metrics(model).keys()]
        out.append(f"### {name}\n\n" + table(headers, rows))
    return (f"(a) quality vs MLP token work, training-free, {machine()}\n\n"
            "MLP token work kept: the fraction of the model's MLP block-token work that runs "
            "(threshold routing: the fraction of calibration tokens above the threshold).\n\n"
            + "\n\n".join(out))


SETTINGS = [("capacity 0.5, layers [1, 2]", {"capacity": 0.5}, 2),  # (label, knobs, routed
            ("capacity 0.5, all 4 layers", {"capacity": 0.5, "layers": [0, 1, 2, 3]}, 4)]  # MLPs)
TIME_HEADERS = ["tokens", "setting", "FLOP ratio", "time ratio vs eager",
                "share of the FLOP saving realized", "time ratio vs effc", "share realized vs effc",
                "share realizable vs effc, routing free"]


def _time_rows(model, ids_of, lengths, repeats: int) -> list[list]:
    """Per length: eager, effc with no pass, each of SETTINGS (top-k routing), and the model
    without its MLPs (capacity 0 everywhere: what the MLPs cost), timed interleaved; rows of
    TIME_HEADERS. The last column is the share a routing that cost nothing would realize:
    the MLPs' share of the time, times the share of MLP work skipped, over the FLOP saving."""
    layers = model.config.num_hidden_layers
    rows = []
    for tokens in lengths:
        ids = ids_of(tokens)
        fns = {"eager": lambda: model(ids)}
        plain = _compiled(model, {})  # effc without passes: what the routing alone changes
        with torch.no_grad():
            plain(ids)
        fns["effc"] = lambda: plain(ids)
        no_mlp = _compiled(model, {"token_skip": {"capacity": 0.0,
                                                  "layers": list(range(layers))}})
        with torch.no_grad():
            no_mlp(ids)
        fns["no MLP"] = lambda: no_mlp(ids)
        for label, knobs, _ in SETTINGS:
            compiled = _compiled(model, {"token_skip": {**knobs, "routing": "top_k"}})
            with torch.no_grad():
                compiled(ids)
            fns[label] = (lambda c: lambda: c(ids))(compiled)
        times = time_interleaved(fns, repeats=repeats)
        full = _routed_flops(model.config, tokens, "mlp", 1.0, 0)
        for label, _, routed in SETTINGS:  # (capacity 0.5)
            flop = _routed_flops(model.config, tokens, "mlp", 0.5, routed) / full
            ratio = times[label] / times["eager"]
            own = times[label] / times["effc"]
            realized = (1 - ratio) / (1 - flop) if flop < 1 else float("nan")
            mlp_share = 1 - times["no MLP"] / times["effc"]
            rows.append([tokens, label, flop, ratio, realized, own,
                         (1 - own) / (1 - flop) if flop < 1 else float("nan"),
                         mlp_share * 0.5 * routed / layers / (1 - flop)])
    return rows


def part_b(quick: bool) -> str:
    from benchmarks.models import text_lm

    model, (train_ids, _) = text_lm.get_model("text_llama")
    rows = _time_rows(model, lambda t: train_ids[:t].unsqueeze(0),
                      (128, 512) if quick else (128, 512, 1024, 2048), 5 if quick else 41)
    return (f"(b) CPU time of one forward vs eager (batch 1, top-k routing), {machine()}\n\n"
            "Medians of 41 interleaved runs; a 1 % timing change moves a realized share by "
            "0.05-0.1 here, so read it to +-0.15. \"vs effc\": against effc with no pass, "
            "which isolates what the routing changes. \"Routing free\": the MLPs' share of "
            "effc's time (measured by dropping them all) times the share of MLP work the "
            "setting skips, over its FLOP saving: what a routing that cost nothing would "
            "realize.\n\n" + table(TIME_HEADERS, rows))


def part_d(quick: bool) -> str:
    """The text Llama is 128 wide, so the routing's fixed cost per token (score, gather,
    scatter) weighs against an MLP of only 3 x 128 x 256 multiply-adds per token. The same
    timing on a Llama of a more usual width, built from config (random weights: time only)."""
    import transformers as tf

    torch.manual_seed(0)
    d = 256 if quick else 512
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=d, intermediate_size=d * 11 // 4,
                         num_hidden_layers=4, num_attention_heads=d // 64,
                         num_key_value_heads=d // 64, max_position_embeddings=4096)
    model = tf.LlamaForCausalLM(cfg).eval()
    repeats = 3 if quick else 11
    rows = _time_rows(model, lambda t: torch.randint(0, 256, (1, t)),
                      (512,) if quick else (512, 1024, 2048), repeats)
    return (f"(d) CPU time of one forward vs eager at width {d} (Llama from config, FFN "
            f"{cfg.intermediate_size}, 4 layers, random weights, batch 1, top-k routing), "
            f"{machine()}\n\nMedians of {repeats} interleaved runs; \"vs effc\" as in (b).\n\n"
            + table(TIME_HEADERS, rows))


def _routed_flops(cfg, tokens: int, kind: str, capacity: float, routed: int) -> float:
    """Multiply-adds of one forward (batch 1) with `routed` layers' `kind` block routed at
    `capacity`: "mlp"; "attention_all" (every token's k and v; the routed tokens' queries,
    attention rows and output projection); "attention_selected" (the block on the routed
    tokens alone: its projections on c T tokens, attention among them); "layer" (both parts
    that way)."""
    d, ff, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)

    def attention(t: float, routed_queries: float = 1.0) -> tuple[float, float]:
        return (2 * d * d + 2 * d * kv) * t, d * t * (t + 1) * routed_queries

    def layer(block: str | None) -> float:
        c, t = capacity, tokens
        proj, scores = attention(t)
        mlp = 3 * d * ff * t
        if block == "mlp":
            mlp *= c
        elif block == "attention_all":
            proj, scores = proj - d * d * t * (1 - c), scores * c
        elif block in ("attention_selected", "layer"):
            proj, scores = attention(c * t)
            mlp = mlp * c if block == "layer" else mlp
        return proj + scores + mlp

    return routed * layer(kind) + (n - routed) * layer(None) + d * cfg.vocab_size * tokens


ATTENTION_SETTINGS = [("MLP", {"blocks": ["mlp"]}, "mlp"),
                      ("attention, keys all", {"blocks": ["attention"]}, "attention_all"),
                      ("attention, keys selected", {"blocks": ["attention"], "keys": "selected"},
                       "attention_selected"),
                      ("whole layers", {"blocks": ["layer"]}, "layer")]


def part_e(quick: bool) -> str:
    """A decoder's attention blocks and whole layers routed (per-token thresholds, capacity
    0.5, layers 1 and 2) against its MLPs, at width 512 (the Llama of (d), random weights:
    time only), 1024 tokens: does the routing realize its FLOP saving?"""
    import transformers as tf

    torch.manual_seed(0)
    d, tokens = (256, 256) if quick else (512, 1024)
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=d, intermediate_size=d * 11 // 4,
                         num_hidden_layers=4, num_attention_heads=d // 64,
                         num_key_value_heads=d // 64, max_position_embeddings=4096)
    model = tf.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (1, tokens))
    plain = _compiled(model, {})
    with torch.no_grad():
        plain(ids)
    fns = {"eager": lambda: model(ids), "effc": lambda: plain(ids)}
    for label, knobs, _ in ATTENTION_SETTINGS:
        compiled = _compiled(model, {"token_skip": {"capacity": 0.5, **knobs}})
        with torch.no_grad():
            compiled(ids)
        assert sorted(_routed(knobs["blocks"][0])) == [1, 2], f"{label}: not routed"
        fns[label] = (lambda c: lambda: c(ids))(compiled)
    times = time_interleaved(fns, repeats=3 if quick else 11)
    full = _routed_flops(cfg, tokens, "mlp", 1.0, 0)
    rows = []
    for label, _, kind in ATTENTION_SETTINGS:
        flop = _routed_flops(cfg, tokens, kind, 0.5, 2) / full
        ratio, own = times[label] / times["eager"], times[label] / times["effc"]
        rows.append([label, flop, ratio, (1 - ratio) / (1 - flop), own,
                     (1 - own) / (1 - flop)])
    return (f"(e) CPU time of one forward vs eager, blocks of layers 1 and 2 routed at "
            f"capacity 0.5 (per-token thresholds), width {d} (Llama from config, 4 layers, "
            f"random weights), batch 1, {tokens} tokens, {machine()}\n\nMedians of "
            f"{3 if quick else 11} interleaved runs. FLOP ratio: multiply-adds of what runs "
            f"(keys all: every token's keys and values are still computed).\n\n" +
            table(["routed blocks", "FLOP ratio", "time ratio vs eager",
                   "share of the FLOP saving realized", "time ratio vs effc",
                   "share realized vs effc"], rows))


def part_f(quick: bool) -> str:
    """generate() at batch 4 on the Llama of (e) (width 512, random weights: time only), the
    blocks of layers 1 and 2 routed at capacity 0.5: the prefill's time, and a decode
    step's, (generate of 17 tokens - generate of 1) / 16, each against effc with no pass."""
    import transformers as tf

    torch.manual_seed(0)
    d, tokens, batch, new = (256, 128, 4, 9) if quick else (512, 512, 4, 17)
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=d, intermediate_size=d * 11 // 4,
                         num_hidden_layers=4, num_attention_heads=d // 64,
                         num_key_value_heads=d // 64, max_position_embeddings=4096)
    model = tf.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (batch, tokens))
    plain_forward = model.forward
    torch._dynamo.reset()
    effc.reset()
    torch._dynamo.config.recompile_limit = 64  # every setting's graphs share model.forward
    settings = [("effc, no pass", {}, None)] + ATTENTION_SETTINGS
    forwards, fns = {}, {}
    kwargs = dict(do_sample=False, pad_token_id=0)
    for label, knobs, _ in settings:
        forwards[label] = torch.compile(plain_forward, backend="effc", options=(
            {"token_skip": {"capacity": 0.5, **knobs}} if knobs else {}))

        def run(n, label=label):
            model.forward = forwards[label]
            return model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)

        with torch.inference_mode():
            out = run(new)
        if knobs:
            assert sorted(_routed(knobs["blocks"][0])) == [1, 2], f"{label}: not routed"
            assert out.shape == (batch, tokens + new)
        fns[f"{label}:1"] = (lambda r: lambda: r(1))(run)
        fns[f"{label}:n"] = (lambda r: lambda: r(new))(run)
    times = time_interleaved(fns, repeats=3 if quick else 9)
    model.forward = plain_forward
    base_pre, base_step = times["effc, no pass:1"], (
        times["effc, no pass:n"] - times["effc, no pass:1"]) / (new - 1)
    full = _routed_flops(cfg, tokens, "mlp", 1.0, 0)
    rows = [["effc, no pass", 1.0, base_pre * 1e3, 1.0, base_step * 1e3, 1.0]]
    for label, _, kind in ATTENTION_SETTINGS:
        pre = times[f"{label}:1"]
        step = (times[f"{label}:n"] - pre) / (new - 1)
        rows.append([label, _routed_flops(cfg, tokens, kind, 0.5, 2) / full, pre * 1e3,
                     pre / base_pre, step * 1e3, step / base_step])
    return (f"(f) generate() at batch {batch}, {tokens}-token prompts, blocks of layers 1 and "
            f"2 routed at capacity 0.5 (per-token thresholds, each sequence its own count), "
            f"width {d} (Llama from config, 4 layers, random weights), {machine()}\n\n"
            f"Medians of {3 if quick else 9} interleaved runs. Prefill: generate() of one "
            f"token; decode step: (generate() of {new} tokens - of one) / {new - 1}. FLOP "
            f"ratio: the prefill's, one sequence routing exactly half its tokens (the batch "
            f"runs each sequence on as many rows as the one routing the most).\n\n" +
            table(["routed blocks", "prefill FLOP ratio", "prefill ms", "prefill vs effc",
                   "decode step ms", "decode step vs effc"], rows))


def part_c(quick: bool) -> str:
    """CUDA only: the gather/scatter kernels vs torch's, and a routed MLP block vs a whole one
    (T=4096 tokens, d=4096, SwiGLU 11008, capacity 0.5), timed with triton.testing.do_bench."""
    if not torch.cuda.is_available():
        return "(c) skipped: no CUDA device"
    from triton.testing import do_bench

    from effc.kernels.token_gather_triton import token_gather_triton, token_scatter_add_triton

    rows = []
    t, d, ff = 4096, 4096, 11008
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(t, d, device="cuda", dtype=dtype)
        w1, w3 = (torch.randn(ff, d, device="cuda", dtype=dtype) / d ** 0.5 for _ in range(2))
        w2 = torch.randn(d, ff, device="cuda", dtype=dtype) / ff ** 0.5
        scores = torch.randn(1, t, device="cuda")
        index = torch.ops.effc.token_route(scores, 0.5, None)
        rows_ = x.index_select(0, index)
        upd = torch.randn_like(rows_)

        def mlp(h):
            return F.linear(F.silu(F.linear(h, w1)) * F.linear(h, w3), w2)

        def routed():
            idx = torch.ops.effc.token_route(scores, 0.5, None)
            h = token_gather_triton(x, idx)
            return token_scatter_add_triton(x, idx, mlp(h))

        cands = {"index_select": lambda: x.index_select(0, index),
                 "token_gather (Triton)": lambda: token_gather_triton(x, index),
                 "index_add": lambda: x.index_add(0, index, upd),
                 "token_scatter_add (Triton)": lambda: token_scatter_add_triton(x, index, upd),
                 "whole MLP block": lambda: x + mlp(x),
                 "routed MLP block, capacity 0.5": routed}
        for name, fn in cands.items():
            rows.append([str(dtype).removeprefix("torch."), name, do_bench(fn)])
    return (f"(c) CUDA kernels, {torch.cuda.get_device_name()}, {t} tokens, d={d}\n\n"
            + table(["dtype", "op", "ms"], rows))


def main() -> None:
    run_parts(__doc__, {"a": part_a, "b": part_b, "c": part_c, "d": part_d, "e": part_e,
                        "f": part_f}, "token_skip")


if __name__ == "__main__":
    main()
