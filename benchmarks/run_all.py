"""The benchmark suite: every pass at a few settings, side by side with eager, inductor and
torchao's weight-only int8, on the trained evaluation models (CPU).

    .venv/bin/python benchmarks/run_all.py            # prints tables, writes CSV + PNG
    .venv/bin/python benchmarks/run_all.py --record   # and the tables into BENCHMARKS.md

Per model and variant: parameters, weight bytes, KV-cache bytes per token, FLOPs of one
forward on the timing input, CPU latency as a ratio to eager (medians of interleaved runs in
one process), and quality (accuracy, perplexity, next-token agreement with eager, output
cosine vs eager). Results: benchmarks/results/run_all.csv and run_all_<model>.png.
"""

from __future__ import annotations

import argparse
import copy
import csv
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import effc  # noqa: E402
from benchmarks.common import machine, record, table, time_interleaved  # noqa: E402
from effc.compiler.metrics import error_stats  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PASS_SETTINGS = {  # pass -> [(label, pass options)]; whitened with calibration when given
    "low_rank": [("rank_ratio 0.5", {"rank_ratio": 0.5, "min_saving": 0.0}),
                 ("rank_ratio 0.25", {"rank_ratio": 0.25}),
                 ("param_budget 0.35", {"param_budget": 0.35})],
}


def _text_llama():
    from benchmarks.models import text_lm

    model, (train_ids, val_ids) = text_lm.get_model("text_llama")
    ctx = 128
    starts = torch.linspace(0, len(train_ids) - ctx - 1, 64).long()
    calib = list(torch.stack([train_ids[s:s + ctx] for s in starts]).split(8))
    windows = val_ids[: 64 * (ctx + 1)].view(64, ctx + 1)[:, :-1]
    ref_next = model(windows).logits.argmax(-1)

    def quality(m):
        agree = (m(windows).logits.argmax(-1) == ref_next).float().mean().item()
        return {"perplexity": text_lm.perplexity(m, val_ids, max_windows=64),
                "next-token agreement": agree}

    cfg = model.config
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (
        cfg.hidden_size // cfg.num_attention_heads) * 4
    return model, windows[:4], calib, quality, {"include": ["model.layers.*"]}, kv_per_token


def _digits(name):
    def load():
        from benchmarks.models import digits

        model, (xtr, _, xte, yte) = digits.get_model(name)

        def quality(m):
            return {"accuracy": digits.accuracy(m, xte, yte)}

        scope = {"include": ["vit.layers.*"]} if name == "digits_vit" else {}
        return model, xte[:64], list(xtr[:512].split(128)), quality, scope, 0
    return load


MODELS = {"text_llama": _text_llama, "digits_vit": _digits("digits_vit"),
          "digits_cnn": _digits("digits_cnn")}


def _call(model, x):
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def _weight_bytes(model) -> int:
    total = 0
    for p in model.parameters():
        if hasattr(p, "__tensor_flatten__"):  # torchao's quantized tensor subclasses
            names, _ = p.__tensor_flatten__()
            total += sum(getattr(p, n).numel() * getattr(p, n).element_size() for n in names)
        else:
            total += p.numel() * p.element_size()
    return total


def _flops(model, x) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        _call(model, x)
    return counter.get_total_flops()


def _variants(model, calib, scope):
    """name -> (builder, pass name or None)."""
    out = {"eager": (lambda: model, None),
           "inductor": (lambda: torch.compile(copy.deepcopy(model)), None),
           "effc (passes off)": (lambda: torch.compile(copy.deepcopy(model), backend="effc"), None)}
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        def int8():
            m = copy.deepcopy(model)
            quantize_(m, Int8WeightOnlyConfig())
            return m
        out["torchao int8 weight-only"] = (int8, None)
    except ImportError:
        pass
    for pass_name, settings in PASS_SETTINGS.items():
        for label, knobs in settings:
            options = {pass_name: {**scope, **knobs}, "calibration": calib}
            out[f"effc {pass_name} {label}"] = (
                lambda o=options: torch.compile(copy.deepcopy(model), backend="effc", options=o),
                pass_name)
    return out


def run_model(name, quick):
    model, x, batches, quality, scope, kv_per_token = MODELS[name]()
    calib = effc.calibrate(model, batches, progress=False)
    base_params = sum(p.numel() for p in model.parameters())
    base_flops = _flops(model, x)
    with torch.no_grad():
        ref = _call(model, x)
    rows, fns = [], {}
    for vname, (build, pass_name) in _variants(model, calib, scope).items():
        effc.reset()
        start = time.perf_counter()
        m = build()
        with torch.no_grad():
            out = _call(m, x)  # compiles for the timing input
        setup = time.perf_counter() - start
        sites = [s for s in effc.report().sites if s.decision == "rewritten"]
        d_params = sum(s.params_after - s.params_before for s in sites)
        d_flops = sum(s.flops_after - s.flops_before for s in sites)
        with torch.no_grad():
            q = quality(m)
        fns[vname] = lambda m=m: _call(m, x)
        rows.append({"model": name, "variant": vname, "pass": pass_name or "",
                     "params": base_params + d_params,
                     "weight MB": (_weight_bytes(m) if pass_name is None else
                                   _weight_bytes(model) + 4 * d_params) / 2**20,
                     "KV bytes/token": kv_per_token or "n/a", "GFLOPs": (base_flops + d_flops) / 1e9,
                     "setup s": setup, "cosine vs eager": error_stats(ref, out)["cosine"], **q})
    times = time_interleaved(fns, repeats=5 if quick else 21, warmup=2)
    for row in rows:
        row["latency ms"] = times[row["variant"]] * 1e3
        row["speedup vs eager"] = times["eager"] / times[row["variant"]]
    return rows


def _plot(name, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "perplexity" if "perplexity" in rows[0] else "accuracy"
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, cost in zip(axes, ("weight MB", "speedup vs eager")):
        for r in rows:
            ax.scatter(r[cost], r[metric], label=r["variant"])
            ax.annotate(r["variant"], (r[cost], r[metric]), fontsize=7)
        ax.set_xlabel(cost)
        ax.set_ylabel(metric)
    axes[0].set_title(f"{name}: quality vs weight bytes")
    axes[1].set_title(f"{name}: quality vs CPU speedup")
    fig.tight_layout()
    fig.savefig(RESULTS / f"run_all_{name}.png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--quick", action="store_true", help="few timing repeats")
    parser.add_argument("--record", action="store_true", help="write tables into BENCHMARKS.md")
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = 64  # many variants of one model class in one process
    RESULTS.mkdir(exist_ok=True)
    start, all_rows, sections = time.perf_counter(), [], []
    for name in args.models.split(","):
        rows = run_model(name, args.quick)
        all_rows += rows
        _plot(name, rows)
        keys = [k for k in rows[0] if k not in ("model", "pass")]
        text = f"### {name}\n\n" + table(keys, [[r[k] for k in keys] for r in rows])
        print(text, "\n", flush=True)
        sections.append(text)
    with open(RESULTS / "run_all.csv", "w", newline="") as f:
        fields = sorted({k for r in all_rows for k in r}, key=lambda k: list(all_rows[0]).index(k)
                        if k in all_rows[0] else 99)
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(all_rows)
    took = time.perf_counter() - start
    body = (f"Suite: `benchmarks/run_all.py` ({took / 60:.1f} min); {machine()}. Latency is one "
            f"forward of the timing input (text_llama: 4 x 128 tokens; digits: 64 images), "
            f"median of interleaved runs, as a ratio to eager measured in the same run.\n\n"
            + "\n\n".join(sections))
    print(f"suite took {took:.0f} s")
    if args.record and not args.quick:
        record("run_all", body)


if __name__ == "__main__":
    main()
