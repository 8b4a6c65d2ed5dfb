"""low_rank benchmarks (CPU): kernel ratios, a BERT-base-shaped model end to end, and
accuracy vs parameters on a trained model.

    .venv/bin/python benchmarks/bench_low_rank.py              # all parts, prints tables
    .venv/bin/python benchmarks/bench_low_rank.py --part a --record   # also write BENCHMARKS.md

(a) one 4096x4096 linear at batch 64, ranks 64..1024: time ratio vs dense next to the FLOP
    ratio, and how much of the FLOP saving the time realises;
(b) a BERT-base-shaped model from config: eager, inductor, effc (passes off), effc low_rank at
    rank_ratio 0.25 on the MLPs (eager and inductor lowering): latency ratios and output error;
(c) accuracy/perplexity vs parameters kept: plain SVD, whitened uniform, whitened allocated;
(d) factorization time of one 7B-sized weight at rank_ratio 0.25: full float64 SVD vs the
    randomized top-r SVD that `svd="auto"` picks there, and the weight error of each.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import effc  # noqa: E402
import effc.kernels.low_rank  # noqa: E402,F401
from benchmarks.common import machine, record, table, time_interleaved  # noqa: E402
from effc.compiler.metrics import error_stats  # noqa: E402


def part_a(quick: bool) -> str:
    m = n = 4096
    batch = 64
    torch.manual_seed(0)
    x, w = torch.randn(batch, n), torch.randn(m, n) / n ** 0.5
    ranks = [64, 256, 1024] if quick else [64, 128, 256, 512, 1024]
    cands = {"dense": lambda: F.linear(x, w)}
    factors = {}
    for r in ranks:
        factors[r] = (torch.randn(m, r) / r ** 0.5, torch.randn(r, n) / n ** 0.5)
        u, v = factors[r]
        cands[f"r={r}"] = lambda u=u, v=v: torch.ops.effc.low_rank_linear(x, v, u, None)
    times = time_interleaved(cands, repeats=5 if quick else 21, warmup=2)
    rows = []
    for r in ranks:
        flop_ratio = r * (m + n) / (m * n)
        time_ratio = times[f"r={r}"] / times["dense"]
        rows.append([r, flop_ratio, time_ratio, 1 / time_ratio, 1 / flop_ratio,
                     f"{flop_ratio / time_ratio:.0%}"])
    head = (f"(a) 4096x4096 linear, batch 64, fp32, CPU; dense median {times['dense'] * 1e3:.2f} ms; "
            f"{machine()}\n\n")
    return head + table(["rank", "FLOP ratio", "time ratio", "speedup", "ideal speedup",
                         "FLOP ratio realised"], rows)


def _bert_base():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=3072, vocab_size=30522, max_position_embeddings=512,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return BertModel(cfg).eval()


def part_b(quick: bool) -> str:
    model = _bert_base()
    if quick:
        model.encoder.layer = model.encoder.layer[:2]
    ids = torch.randint(0, 30522, (1, 128))
    mlp = {"rank_ratio": 0.25, "include": ["encoder.layer.*.intermediate.dense",
                                            "encoder.layer.*.output.dense"],
           "exclude": ["*.attention.*"]}
    variants = {
        "eager": lambda: model,
        "inductor": lambda: torch.compile(copy.deepcopy(model)),
        "effc (passes off)": lambda: torch.compile(copy.deepcopy(model), backend="effc"),
        "effc low_rank 0.25 MLP": lambda: torch.compile(copy.deepcopy(model), backend="effc",
                                                        options={"low_rank": mlp}),
        "effc low_rank 0.25 MLP + inductor": lambda: torch.compile(
            copy.deepcopy(model), backend="effc", options={"low_rank": mlp, "lowering": "inductor"}),
    }
    with torch.inference_mode():
        ref = model(input_ids=ids).last_hidden_state
    fns, quality, params = {}, {}, {}
    for name, make in variants.items():
        effc.reset()
        compiled = make()
        with torch.inference_mode():
            out = compiled(input_ids=ids).last_hidden_state  # compiles here
        fns[name] = lambda c=compiled: c(input_ids=ids)
        quality[name] = error_stats(ref, out)["cosine"]
        sites = effc.report().sites
        params[name] = sum(s.params_after - s.params_before for s in sites)
    times = time_interleaved(fns, repeats=5 if quick else 15, warmup=1)
    total = sum(p.numel() for p in model.parameters())
    rows = [[name, times[name] * 1e3, times["eager"] / times[name], times["inductor"] / times[name],
             f"{(total + params[name]) / 1e6:.1f}M", quality[name]] for name in variants]
    layers = len(model.encoder.layer)
    head = (f"(b) BERT-base-shaped model ({layers} layers, random init), batch 1 x 128 tokens, "
            f"CPU; {machine()}\n\n")
    return head + table(["variant", "ms", "speedup vs eager", "speedup vs inductor", "params",
                         "output cosine vs eager"], rows)


def _decaying(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """A weight with a power-law spectrum (s_i ~ i^-0.5), like trained transformer weights."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    scale = torch.arange(1, k + 1, dtype=torch.float32).pow(-0.5)
    return (torch.randn(m, k, generator=g) * scale) @ torch.randn(k, n, generator=g) / k ** 0.5


def part_d(quick: bool) -> str:
    from effc.passes.low_rank_math import factorize, weight_error

    shapes = [(1024, 1024), (1024, 2752)] if quick else [(4096, 4096), (4096, 11008)]
    rows = []
    for m, n in shapes:
        w = _decaying(m, n)
        r = min(m, n) // 4
        times = time_interleaved({meth: lambda meth=meth: factorize(w, rank=r, method=meth)
                                  for meth in ("full", "randomized")},
                                 repeats=1 if quick else 3, warmup=0)
        err = {meth: weight_error(w, *factorize(w, rank=r, method=meth).factors(r))["weight_rel_fro"]
               for meth in ("full", "randomized")}
        rows.append([f"{m}x{n}", r, times["full"], times["randomized"],
                     times["full"] / times["randomized"], f"{err['full']:.5f}",
                     f"{err['randomized']:.5f}", f"{err['randomized'] / err['full']:.4f}"])
    head = (f"(d) factorization time, plain SVD at rank_ratio 0.25, power-law spectrum, fp32 weight "
            f"(median of {1 if quick else 3}); {machine()}\n\n")
    return head + table(["weight", "rank", "full s", "randomized s", "speedup", "full rel err",
                         "randomized rel err", "err ratio"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="a,b,c,d", help="comma list of parts: a, b, c, d")
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats (smoke run)")
    parser.add_argument("--record", action="store_true", help="write the tables to BENCHMARKS.md")
    args = parser.parse_args()
    parts = {"a": part_a, "b": part_b, "d": part_d}
    try:
        from benchmarks.low_rank_quality import part_c
        parts["c"] = part_c
    except ImportError as exc:
        print(f"part c unavailable: {exc}")
    for key in args.part.split(","):
        text = parts[key.strip()](args.quick)
        print(text, "\n", flush=True)
        if args.record and not args.quick:
            record(f"low_rank_{key.strip()}", text)


if __name__ == "__main__":
    main()
