"""kv_proj benchmarks: KV-cache bytes kept vs quality, and decode-step time with the cache.

    .venv/bin/python benchmarks/bench_kv_proj.py                 # both parts, prints tables
    .venv/bin/python benchmarks/bench_kv_proj.py --part a --record   # also BENCHMARKS.md

(a) Quality, training-free, on the byte-level Llama (RoPE) and GPT-2 trained here: held-out
    windows run teacher-forced through `effc.kv_cache(...)` (prefill attention reads the
    projected cache, as decoding does), next-token agreement with the unmodified model and
    perplexity, against the cache bytes measured after the run. Values only, keys only (PCA
    after RoPE, whole RoPE planes, or latent before RoPE), both uniform, budgets through the
    allocator, and data-free bases from the weights.
(b) CPU time of one decode step (batch 1) at 256..2048 cached tokens: the plain DynamicCache
    vs the projected cache at budget 0.5 (half the bytes), eagerly (K and V rebuilt to full
    width every step) and compiled by effc with the kv_proj pass (attention in r dims).
(c) Token selection (TokenSelect) at 1k..16k cached tokens: decode-step time and
    agreement against full attention, and one layer's attention alone (SDPA vs
    effc.select_attention).
(d) CUDA only: effc.select_attention's Triton kernels vs SDPA at 4k..64k cached tokens.
(e) CPU time of a prefill (batch 1, 128..1024 tokens) into a projected cache: compiled with
    kv_proj, with and without the bases folded into the projections (Llama, GPT-2).
(f) Attention without a cache (the digits ViT): the compile option with a calibration runs
    each attention in fewer dimensions per head, folded into q, k, v and the output
    projection: dimensions kept vs agreement and test accuracy, and CPU time against effc
    without kv_proj.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import effc  # noqa: E402
from benchmarks.common import machine, run_parts, table, time_interleaved  # noqa: E402

VARIANTS = [  # keys "pca" is after RoPE; "auto" (the default) is "latent" on RoPE models
    ("values only, ratio 0.5", {"ratio": 0.5, "keys": "none"}),
    ("values only, ratio 0.25", {"ratio": 0.25, "keys": "none"}),
    ("keys only, PCA after RoPE, ratio 0.5", {"ratio": 0.5, "keys": "pca", "values": False}),
    ("keys only, RoPE planes, ratio 0.5", {"ratio": 0.5, "keys": "pairs", "values": False}),
    ("keys only, latent before RoPE, ratio 0.5", {"ratio": 0.5, "keys": "latent",
                                                  "values": False}),
    ("keys and values, ratio 0.75", {"ratio": 0.75, "keys": "pca"}),
    ("keys and values, ratio 0.5", {"ratio": 0.5, "keys": "pca"}),
    ("keys and values, latent keys, ratio 0.5", {"ratio": 0.5, "keys": "latent"}),
    ("budget 0.75", {"budget": 0.75, "keys": "pca"}),
    ("budget 0.5", {"budget": 0.5, "keys": "pca"}),
    ("budget 0.375", {"budget": 0.375, "keys": "pca"}),
    ("budget 0.5, latent keys", {"budget": 0.5, "keys": "latent"}),
    ("budget 0.375, latent keys", {"budget": 0.375, "keys": "latent"}),
    ("budget 0.5, effect measured on 2 calibration batches", {"budget": 0.5, "keys": "pca",
                                                              "measure": 2}),
    ("budget 0.375, effect measured on 2 calibration batches", {"budget": 0.375, "keys": "pca",
                                                                "measure": 2}),
    ("budget 0.375, latent keys, effect measured on 2 calibration batches",
     {"budget": 0.375, "keys": "latent", "measure": 2}),
    ("default (min_energy 0.99; latent keys on RoPE models)", {}),
    # centering (the default where calibrated: PCA keys and values) against none
    ("values only, ratio 0.25, uncentered", {"ratio": 0.25, "keys": "none", "center": False}),
    ("keys only, PCA after RoPE, ratio 0.5, uncentered", {"ratio": 0.5, "keys": "pca",
                                                          "values": False, "center": False}),
    ("keys and values, ratio 0.5, uncentered", {"ratio": 0.5, "keys": "pca", "center": False}),
    ("budget 0.5, latent keys, uncentered", {"budget": 0.5, "keys": "latent",
                                             "center": False}),
    ("default, uncentered", {"center": False}),
    ("data-free bases (weights), ratio 0.5", {"ratio": 0.5, "keys": "pca", "bases": "weights"}),
    ("data-free bases (weights), budget 0.5", {"budget": 0.5, "keys": "pca",
                                               "bases": "weights"}),
    ("data-free latent keys (weights), budget 0.5", {"budget": 0.5, "keys": "latent",
                                                     "bases": "weights"}),
]


def _subject(name: str, quick: bool):
    from benchmarks.models import text_lm

    model, (train_ids, val_ids) = text_lm.get_model(name)
    ctx = text_lm.CONTEXT
    starts = torch.linspace(0, len(train_ids) - ctx - 1, 32 if quick else 64).long()
    batches = list(torch.stack([train_ids[s:s + ctx] for s in starts]).split(8))
    n_win = min(len(val_ids) // (ctx + 1), 32 if quick else 256) // 16 * 16
    windows = val_ids[: n_win * (ctx + 1)].view(n_win, ctx + 1)
    return model, batches, windows


def _evaluate(model, windows, make_cache):
    agree = count = 0
    nll, kept = 0.0, []
    with torch.no_grad():
        for w in windows.split(16):
            ref = model(w[:, :-1]).logits
            cache = make_cache()
            out = model(w[:, :-1], cache=cache, use_cache=True).logits if cache is not None \
                else ref
            agree += (out.argmax(-1) == ref.argmax(-1)).sum().item()
            count += ref[..., 0].numel()
            nll += F.cross_entropy(out.reshape(-1, out.shape[-1]), w[:, 1:].reshape(-1),
                                   reduction="sum").item()
            kept.append(1.0 if cache is None else cache.nbytes() / cache.dense_nbytes())
    return sum(kept) / len(kept), agree / count, math.exp(nll / count)


def part_a(quick: bool) -> str:
    out = []
    for name in ("text_llama", "text_gpt2"):
        model, batches, windows = _subject(name, quick)
        calib = effc.calibrate(model, batches, what=("inputs", "kv"), progress=False)
        rows = [["unmodified", *_evaluate(model, windows, lambda: None)]]
        for label, knobs in VARIANTS:
            if name == "text_gpt2" and (knobs.get("keys") in ("pairs", "latent")
                                        or "bases" in knobs):
                continue  # no RoPE; a fused c_attn (data-free bases read k_proj/v_proj)
            knobs = dict(knobs)
            measure = knobs.pop("measure", 0)
            cache = effc.kv_cache(model, calib, batches=batches[:measure] or None, **knobs)
            rows.append([label, *_evaluate(model, windows, cache.fresh)])
        out.append(f"### {name} ({len(windows)} held-out windows of 128 bytes)\n\n" +
                   table(["cache", "KV bytes kept", "agreement", "perplexity"], rows))
    return (f"(a) KV-cache bytes vs quality, training-free, {machine()}\n\n"
            "KV bytes kept: the projected cache's tensors after the run over the dense "
            "cache's, measured.\n\n" + "\n\n".join(out))


def part_b(quick: bool) -> str:
    model, batches, _ = _subject("text_llama", True)
    calib = effc.calibrate(model, batches, what=("inputs", "kv"), progress=False)
    from transformers import DynamicCache

    rows, fused = [], []
    for ctx in ((256, 512) if quick else (256, 512, 1024, 2048)):
        ids = torch.randint(0, 256, (1, ctx))
        nxt = torch.randint(0, 256, (1, 1))
        caches = {}
        with torch.no_grad():
            for label, make in (("dense", lambda: DynamicCache()),
                                ("projected, budget 0.5",
                                 lambda: effc.kv_cache(model, calib, budget=0.5,
                                                       keys="pca")),
                                ("default", lambda: effc.kv_cache(model, calib))):
                cache = make()
                model(ids, cache=cache, use_cache=True)
                caches[label] = cache

        def step(fn, cache):
            def run():
                fn(nxt, cache=cache, use_cache=True)
                for layer in cache.layers:  # drop the token again: every step sees ctx
                    layer.keys, layer.values = layer.keys[..., :ctx, :], layer.values[..., :ctx, :]
                    if getattr(layer, "positions", None) is not None:  # latent keys' ids
                        layer.positions = layer.positions[..., :ctx]
            return run

        torch._dynamo.reset()
        effc.reset()
        plain = torch.compile(model, backend="effc")
        folded = torch.compile(model, backend="effc", options={"kv_proj": True})
        dense, proj = caches["dense"], caches["projected, budget 0.5"]
        times = time_interleaved({
            "eager dense": step(model, dense), "eager projected": step(model, proj),
            "effc dense": step(plain, dense), "effc kv_proj projected": step(folded, proj),
            "effc kv_proj default": step(folded, caches["default"])},
            repeats=5 if quick else 15)
        size = lambda c: sum(t.numel() * t.element_size() for layer in c.layers  # noqa: E731
                             for t in (layer.keys, layer.values))
        rows.append([ctx, size(dense) / 1e6, size(proj) / 1e6,
                     *(times[k] * 1e3 for k in times),
                     times["effc kv_proj projected"] / times["effc dense"],
                     caches["default"].nbytes() / caches["default"].dense_nbytes(),
                     times["effc kv_proj default"] / times["effc dense"]])
        # the same steps with effc's graphs handed to inductor (`lowering="inductor"`)
        torch._dynamo.reset()
        effc.reset()
        plain = torch.compile(model, backend="effc", options={"lowering": "inductor"})
        folded = torch.compile(model, backend="effc", options={"kv_proj": True,
                                                               "lowering": "inductor"})
        times = time_interleaved({
            "dense": step(plain, dense), "projected": step(folded, proj),
            "default": step(folded, caches["default"])}, repeats=5 if quick else 15)
        fused.append([ctx, *(times[k] * 1e3 for k in times),
                      times["projected"] / times["dense"], times["default"] / times["dense"]])
    return (f"(b) one decode step (batch 1), text_llama, {machine()}\n\n"
            "The projected cache is budget 0.5 with PCA keys (after RoPE). Eager, it rebuilds "
            "K and V to full width at every step; compiled by effc with `kv_proj`, attention "
            "reads the projected cache directly. The default cache (latent keys, before RoPE) "
            "rebuilds and rotates every cached key at every step, compiled too.\n\n"
            + table(["cached tokens", "dense cache MB", "projected cache MB",
                     "eager dense ms", "eager projected ms", "effc dense ms",
                     "effc kv_proj projected ms", "effc kv_proj default ms",
                     "kv_proj / effc dense", "default: bytes kept",
                     "default kv_proj / effc dense"], rows)
            + "\n\nThe same decode steps with `lowering=\"inductor\"` (effc's rewritten graphs "
            "compiled by inductor: C++ kernels on the CPU):\n\n"
            + table(["cached tokens", "effc+inductor dense ms",
                     "kv_proj projected (budget 0.5) ms", "kv_proj default ms",
                     "projected / dense", "default / dense"], fused))


def part_c(quick: bool) -> str:
    """Token selection (TokenSelect) at long contexts: decode-step time and agreement."""
    from transformers import DynamicCache

    from benchmarks.models import text_lm
    from effc.token_select import reuse_counts

    model, (_, val_ids) = text_lm.get_model("text_llama")
    select = {"top_k": 256, "initial": 4, "recent": 64}
    chosen, reusing = copy.deepcopy(model), copy.deepcopy(model)
    effc.use_select_attention(chosen, **select)
    effc.use_select_attention(reusing, **select, reuse=0.8)
    models = {"full": model, "select": chosen, "select, reuse 0.8": reusing}
    steps = 8 if quick else 32
    rows = []
    for ctx in ((1024, 2048) if quick else (1024, 2048, 4096, 8192, 16384)):
        text = val_ids[: ctx + steps + 1].unsqueeze(0)
        caches = {k: DynamicCache() for k in models}
        preds = {k: [] for k in models}
        with torch.no_grad():
            for label, m in models.items():
                m(text[:, :ctx], cache=caches[label], use_cache=True)  # prefill: full attention
                for t in range(steps):  # teacher-forced decode steps over the next bytes
                    logits = m(text[:, ctx + t: ctx + t + 1], cache=caches[label],
                               use_cache=True).logits
                    preds[label].append(int(logits[0, -1].argmax()))
        agree = {k: sum(a == b for a, b in zip(preds["full"], preds[k])) / steps
                 for k in ("select", "select, reuse 0.8")}
        made, reused = reuse_counts(reusing)

        def step(label):
            cache, m = caches[label], models[label]
            nxt = text[:, ctx: ctx + 1]
            length = cache.layers[0].keys.shape[-2]

            def run():
                m(nxt, cache=cache, use_cache=True)
                for layer in cache.layers:
                    layer.keys = layer.keys[..., :length, :]
                    layer.values = layer.values[..., :length, :]
            return run

        times = time_interleaved({k: step(k) for k in ("full", "select")},
                                 repeats=3 if quick else 9)
        attention = _attention_times(caches["full"], model.config, select, 3 if quick else 9)
        rows.append([ctx, times["full"] * 1e3, times["select"] * 1e3,
                     times["full"] / times["select"], attention["sdpa"] * 1e6,
                     attention["select"] * 1e6, attention["sdpa"] / attention["select"],
                     agree["select"], agree["select, reuse 0.8"],
                     reused / max(made + reused, 1)])
    budget = select["top_k"] + select["initial"] + select["recent"]
    return (f"(c) token selection at long contexts (top_k {select['top_k']}, initial "
            f"{select['initial']}, recent {select['recent']}: {budget} tokens per step), "
            f"text_llama (trained on 128-byte windows, so long contexts only time and compare "
            f"it), batch 1, eager, {machine()}\n\n"
            f"agreement: next-byte argmax of select vs full attention over {steps} "
            "teacher-forced decode steps after the context.\n\n"
            "reuse rate: the share of decode steps (per layer) that reused the previous "
            "selection; reuse steps are not in the timing.\n\n"
            "attention alone: one layer's attention of one query over the full cache, "
            "scaled_dot_product_attention vs `effc.select_attention` (scores, vote, top-k, "
            "attention over the chosen tokens), on layer 0's cached keys and values.\n\n"
            + table(["context", "full step ms", "select step ms", "speedup",
                     "attention alone, SDPA us", "attention alone, select us",
                     "attention speedup", "agreement", "agreement with reuse 0.8",
                     "reuse rate"], rows))


def _attention_times(cache, cfg, select: dict, repeats: int) -> dict[str, float]:
    """Seconds of one query's attention over layer 0 of `cache`: SDPA (GQA by repeated
    heads) vs effc.select_attention with `select`'s budget."""
    from effc.kernels.select_attention import select_attention

    k, v = cache.layers[0].keys, cache.layers[0].values
    heads, dim = cfg.num_attention_heads, k.shape[-1]
    q = torch.randn(k.shape[0], heads, 1, dim)
    scale = dim ** -0.5
    rep = heads // k.shape[1]
    kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    fns = {"sdpa": lambda: F.scaled_dot_product_attention(q, kr, vr, scale=scale),
           "select": lambda: select_attention(q, k, v, scale, select["top_k"],
                                              select["initial"], select["recent"])}
    return time_interleaved(fns, repeats=repeats, inner=20)


def part_d(quick: bool) -> str:
    """CUDA only: one decode step's attention at 4k..64k cached tokens (B=1, 32 query heads,
    8 KV heads, head_dim 128): SDPA over the whole cache vs effc.select_attention (Triton),
    and select_attention's steps timed alone (the score kernel, the head vote, the top-k,
    the gather kernel) with the host time of one call, so a gap between the op and its steps
    shows as launch and dispatch overhead."""
    if not torch.cuda.is_available():
        return "(d) skipped: no CUDA device"
    import time

    from triton.testing import do_bench

    import effc.kernels.select_attention  # noqa: F401
    from effc.kernels.select_attention import select_from_votes, soft_votes
    from effc.kernels.select_attention_triton import gather_attention_triton, score_logits_triton

    top_k, initial, recent, scale = 256, 4, 64, 128 ** -0.5
    rows, steps = [], []
    for t in (4096, 16384, 65536):
        for dtype in (torch.float16, torch.bfloat16):
            q = torch.randn(1, 32, 1, 128, device="cuda", dtype=dtype)
            k, v = (torch.randn(1, 8, t, 128, device="cuda", dtype=dtype) for _ in range(2))
            full = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
            op = lambda: torch.ops.effc.select_attention(q, k, v, scale, top_k,  # noqa: E731
                                                         initial, recent)
            sel = do_bench(op)
            rows.append([t, str(dtype).removeprefix("torch."), full, sel, full / sel])
            if dtype is not torch.float16:
                continue
            logits = score_logits_triton(q, k, scale)
            votes = soft_votes(logits)
            index = select_from_votes(votes, top_k, initial, recent)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(20):
                op()
            host = (time.perf_counter() - start) / 20 * 1e3  # includes any sync inside
            torch.cuda.synchronize()
            steps.append([t, do_bench(lambda: score_logits_triton(q, k, scale)),
                          do_bench(lambda: soft_votes(logits)),
                          do_bench(lambda: select_from_votes(votes, top_k, initial, recent)),
                          do_bench(lambda: gather_attention_triton(q, k, v, index, scale)),
                          sel, host])
    return (f"(d) decode-step attention, {torch.cuda.get_device_name()}\n\n"
            + table(["cached tokens", "dtype", "SDPA ms", "select_attention ms", "speedup"],
                    rows)
            + "\n\nselect_attention's steps alone, float16, ms (host: wall time of one call "
              "issued back to back, no sync after it)\n\n"
            + table(["cached tokens", "score kernel", "head vote", "top-k", "gather kernel",
                     "whole op", "host per call"], steps))


def part_e(quick: bool) -> str:
    """Prefill into a projected cache: the attention fold, and the bases folded into the
    projections (values on the Llama, whose RoPE keeps the keys out; everything on GPT-2),
    against effc without kv_proj."""
    rows = []
    for name in ("text_llama", "text_gpt2"):
        model, batches, _ = _subject(name, True)
        calib = effc.calibrate(model, batches, what=("inputs", "kv"), progress=False)
        caches = {"ratio 0.5": effc.kv_cache(model, calib, ratio=0.5, keys="pca")}
        if name == "text_llama":
            caches["budget 0.5"] = effc.kv_cache(model, calib, budget=0.5, keys="pca")
        for label, proj in caches.items():
            # GPT-2's learned positions end at 256
            lengths = (128, 256) if quick or name == "text_gpt2" else (128, 512, 1024)
            for ctx in lengths:
                rows.append([name, label, ctx, *_prefill_times(model, proj, ctx, quick)])
    return (f"(e) prefill (batch 1) into a projected cache (PCA keys), {machine()}"
            f"\n\nkv_proj folds a prefill's attention only in layers whose keys and values "
            f"end up equally wide (SDPA's fused kernels need that), and there also folds the "
            f"bases into the projections: the values' into v_proj and o_proj, and without RoPE "
            f"(GPT-2) the keys' into the keys' and queries' columns of c_attn; `attention fold "
            f"only` is `fold_weights=False`.\n\n"
            + table(["model", "cache", "tokens", "effc dense ms", "attention fold only ms",
                     "kv_proj ms", "kv_proj / effc dense", "kv_proj / attention fold only",
                     "layers folded", "projections folded per layer",
                     "max rel diff of the logits"], rows))


def _prefill_times(model, proj, ctx: int, quick: bool) -> list:
    """Part (e)'s timings and report counts for one cache and prompt length."""
    from transformers import DynamicCache

    ids = torch.randint(0, 256, (1, ctx))
    torch._dynamo.reset()  # each setting compiled afresh: its own report rows
    effc.reset()
    plain = torch.compile(model, backend="effc")
    attention_only = torch.compile(model, backend="effc",
                                   options={"kv_proj": {"fold_weights": False}})
    folded = torch.compile(model, backend="effc", options={"kv_proj": True})

    def call(fn, make):
        return lambda: fn(ids, cache=make(), use_cache=True).logits

    runs = {"effc dense": call(plain, DynamicCache),
            "attention fold only": call(attention_only, proj.fresh),
            "kv_proj": call(folded, proj.fresh)}
    with torch.no_grad():
        ref, out = runs["attention fold only"](), runs["kv_proj"]()
        sites = [s for s in effc.report().sites if s.pass_name == "kv_proj"]
        times = time_interleaved(runs, repeats=5 if quick else 11)
    layers = len(sites) // 2  # the two compiled graphs with kv_proj report every layer
    projections = {", ".join(s.details.get("folded") or ["none"]) for s in sites[layers:]}
    return [*(times[k] * 1e3 for k in runs), times["kv_proj"] / times["effc dense"],
            times["kv_proj"] / times["attention fold only"],
            f"{sum(s.decision == 'rewritten' for s in sites) // 2}/{layers}",
            " / ".join(sorted(projections)), ((out - ref).abs().max() / ref.abs().max()).item()]


DIRECT = [("ratio 0.75", {"ratio": 0.75}), ("ratio 0.5", {"ratio": 0.5}),
          ("ratio 0.25", {"ratio": 0.25}), ("budget 0.5", {"budget": 0.5}),
          ("min_energy 0.95", {"min_energy": 0.95}), ("default (min_energy 0.99)", {})]


def part_f(quick: bool) -> str:
    """Attention without a cache: the digits ViT's attention in fewer dimensions per head."""
    from benchmarks.models import digits

    model, (xtr, _, xte, yte) = digits.get_model("digits_vit")
    n = (len(xte) if not quick else 300) // 100 * 100
    xte, yte = xte[:n], yte[:n]
    calib = effc.calibrate(model, list(xtr[:400].split(100)), what=("inputs", "kv"),
                           progress=False)
    batch = xte[:100]
    with torch.no_grad():
        ref = torch.cat([model(x).logits.argmax(-1) for x in xte.split(100)])
        torch._dynamo.reset()
        effc.reset()
        plain = torch.compile(model, backend="effc")
        plain(batch)
        rows = [["unmodified", 1.0, 1.0, (ref == yte).float().mean().item(), "-", 1.0]]
        for label, knobs in DIRECT[:3] if quick else DIRECT:
            torch._dynamo.reset()
            effc.reset()
            compiled = torch.compile(model, backend="effc", options={
                "kv_proj": knobs, "calibration": calib})
            pred = torch.cat([compiled(x).logits.argmax(-1) for x in xte.split(100)])
            sites = [s for s in effc.report().sites if s.pass_name == "kv_proj"]
            kept = sum(s.details.get("rank", s.details.get("head_dim", 16)) /
                       s.details.get("head_dim", 16) for s in sites) / len(sites)
            times = time_interleaved({"effc": lambda: plain(batch),
                                      "kv_proj": lambda: compiled(batch)},
                                     repeats=5 if quick else 21)
            rows.append([label, kept, (pred == ref).float().mean().item(),
                         (pred == yte).float().mean().item(),
                         f"{sum(s.decision == 'rewritten' for s in sites)}/{len(sites)}",
                         times["kv_proj"] / times["effc"]])
    return (f"(f) attention without a cache, digits_vit (3 layers, 4 heads of 16 dims, 17 "
            f"tokens; {n} test images), training-free, {machine()}\n\n"
            f"K/V dims kept: the mean over the attentions of rank / head_dim (queries and "
            f"keys share the keys' basis; values have their own, of the same rank). Time: one "
            f"forward of 100 images, median of interleaved runs, against effc without "
            f"kv_proj.\n\n"
            + table(["setting", "K/V dims kept", "agreement", "test accuracy",
                     "attentions projected", "time vs effc"], rows))


def main() -> None:
    run_parts(__doc__, {"a": part_a, "b": part_b, "c": part_c, "d": part_d, "e": part_e,
                         "f": part_f},
              "kv_proj")


if __name__ == "__main__":
    main()
