"""Part (c) of bench_low_rank: quality vs parameters kept, on trained models.

For each trained model (byte-level Llama on stdlib docstrings: perplexity; ViT on digits:
accuracy) and each parameter fraction, three factorizations at equal parameters:
plain SVD with uniform ranks, whitened (activation-aware) SVD with uniform ranks, and
whitened SVD with ranks allocated across layers by `param_budget` (given the parameter count
the uniform run kept, so the comparison is at equal parameters). Writes a CSV and a PNG plot
per model under benchmarks/results/.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch

import effc
from benchmarks.common import machine, table

RESULTS = Path(__file__).resolve().parent / "results"
RATIOS = (0.4, 0.3, 0.2, 0.15, 0.1, 0.05)   # rank / min(m, n) of the uniform runs


def _llama():
    from benchmarks.models import text_lm

    model, (train_ids, val_ids) = text_lm.get_model("text_llama")
    ctx = 128
    starts = torch.linspace(0, len(train_ids) - ctx - 1, 64).long()
    batches = list(torch.stack([train_ids[s:s + ctx] for s in starts]).split(8))

    def quality(m):
        return text_lm.perplexity(m, val_ids, max_windows=96)

    scope = {"include": ["model.layers.*"]}
    return model, batches, quality, "val perplexity (lower is better)", scope


def _vit():
    from benchmarks.models import digits

    model, (xtr, _, xte, yte) = digits.get_model("digits_vit")
    batches = list(xtr[:512].split(128))

    def quality(m):
        return digits.accuracy(m, xte, yte)

    scope = {"include": ["vit.layers.*"]}
    return model, batches, quality, "test accuracy (higher is better)", scope


def _run(model, quality, options):
    torch._dynamo.reset()
    effc.reset()
    compiled = torch.compile(model, backend="effc", options=options)
    with torch.no_grad():
        q = quality(compiled)
    # the eligible sites: what param_budget is a fraction of (filtered-out sites are listed too)
    sites = [s for s in effc.report().sites if "filters" not in s.reason]
    before = sum(s.params_before for s in sites)
    after = sum(s.params_after for s in sites)
    return q, after / before if before else 1.0


def evaluate(name, loader, quick: bool):
    model, batches, quality, metric, scope = loader()
    torch._dynamo.reset()
    calib = effc.calibrate(model, batches, progress=False)
    with torch.no_grad():
        dense = quality(model)
    rows = [["dense", 1.0, dense]]
    common = {**scope, "min_saving": 0.0}
    for ratio in RATIOS[::2] if quick else RATIOS:
        q, kept = _run(model, quality, {"low_rank": {**common, "rank_ratio": ratio,
                                                     "whiten": False}, "calibration": calib})
        if any(r[0] == "plain uniform" and r[1] == kept for r in rows):
            continue  # rounding to rank_multiple gave the same ranks as a larger ratio
        rows.append(["plain uniform", kept, q])
        q, kept = _run(model, quality, {"low_rank": {**common, "rank_ratio": ratio},
                                        "calibration": calib})
        rows.append(["whitened uniform", kept, q])
        q2, kept2 = _run(model, quality, {"low_rank": {**common, "param_budget": kept},
                                          "calibration": calib})
        rows.append(["whitened allocated", kept2, q2])
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / f"low_rank_quality_{name}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "params_kept_fraction", metric])
        w.writerows(rows)
    _plot(name, rows, dense, metric)
    return rows, metric


def _plot(name, rows, dense, metric):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for variant, style in (("plain uniform", "o--"), ("whitened uniform", "s-"),
                           ("whitened allocated", "^-")):
        pts = sorted((r[1], r[2]) for r in rows if r[0] == variant)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=variant)
    ax.axhline(dense, color="gray", lw=1, label="dense")
    ax.set_xlabel("fraction of the factorized weights' parameters kept")
    ax.set_ylabel(metric)
    if "perplexity" in metric:
        ax.set_yscale("log")
    ax.set_title(f"low_rank on {name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"low_rank_quality_{name}.png", dpi=110)
    plt.close(fig)


def part_c(quick: bool) -> str:
    out = [f"(c) quality vs parameters kept (low_rank on the encoder/decoder layers' linears, "
           f"min_saving 0); {machine()}"]
    for name, loader in (("text_llama", _llama), ("digits_vit", _vit)):
        rows, metric = evaluate(name, loader, quick)
        out += ["", f"{name}: {metric}; plot benchmarks/results/low_rank_quality_{name}.png", "",
                table(["variant", "params kept", metric.split(" (")[0]], rows)]
    return "\n".join(out)
