"""Quality vs parameters kept for low_rank, at equal parameters, on three models:

  mobilenet_v2  torchvision's ImageNet MobileNetV2, real pretrained weights, natural photos
                (calibration crops from the left half of each photo, test crops from the
                right half): top-1 agreement with the dense model, also on the crops the
                dense model is confident about (p > 0.5; a stand-in for top-1 accuracy)
  text_llama    byte-level Llama trained here on stdlib docstrings: validation perplexity
  digits_vit    ViT trained here on scikit-learn's digits: test accuracy

Variants, each at the parameters the uniform run keeps (targets 0.9 ... 0.5 of the eligible
weights' parameters; the uniform rank_ratio is solved for from the site shapes):
  plain uniform         one rank_ratio everywhere, plain SVD
  whitened uniform      one rank_ratio, activation-aware SVD
  proxy allocated       param_budget, sensitivity="layer" (each site's own error): the
                        allocator before end-to-end sensitivity
  e2e allocated         param_budget, sensitivity measured end to end on sample inputs
  e2e + compensation    the same, with the error-compensating refit
and the quality-bounded default {"low_rank": True} with and without calibration. Beside each:
CPU latency of the compiled model relative to eager (median of interleaved repeats).

    python -m benchmarks.low_rank_quality [--models mobilenet_v2,text_llama] [--quick] [--record]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import torch

import effc
from benchmarks.common import machine, main_output, record, table, time_interleaved

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = (0.9, 0.8, 0.7, 0.6, 0.5)
MULTIPLE = 8


@dataclasses.dataclass
class Subject:
    """A model, its calibration batches, how to judge it, and where low_rank may act."""

    name: str
    model: torch.nn.Module
    batches: list
    metrics: Callable[[torch.nn.Module], dict[str, float]]  # first key: the headline
    example: Callable[[], tuple]  # an input of the calibration batches' shapes (compile, latency)
    scope: dict


# Each subject evaluates in batches of its calibration batches' shape, so the graph compiled
# (and allocated) on the first batch is the one judged: no recompile for other shapes.

def _mobilenet(n_test: int) -> Subject:
    from benchmarks.models import mobilenet_v2

    model = mobilenet_v2.pretrained()
    calib_x, test_x = mobilenet_v2.calibration_and_test(n_calib=96, n_test=n_test)
    with torch.no_grad():
        ref = model(test_x)
    confident = ref.softmax(-1).max(-1).values > 0.5

    def metrics(m):
        with torch.no_grad():
            out = torch.cat([m(x) for x in test_x.split(16)])
        same = out.argmax(-1) == ref.argmax(-1)
        return {"top-1 agreement": same.float().mean().item(),
                "agreement (confident)": same[confident].float().mean().item()}

    return Subject("mobilenet_v2", model, list(calib_x.split(16)), metrics,
                   lambda: (test_x[:16],), {})


def _llama(n_test: int) -> Subject:
    import torch.nn.functional as F

    from benchmarks.models import text_lm

    model, (train_ids, val_ids) = text_lm.get_model("text_llama")
    ctx = text_lm.CONTEXT
    starts = torch.linspace(0, len(train_ids) - ctx - 1, 64).long()
    batches = list(torch.stack([train_ids[s:s + ctx] for s in starts]).split(8))
    n_win = min(len(val_ids) // (ctx + 1), n_test // 2) // 8 * 8
    windows = val_ids[: n_win * (ctx + 1)].view(n_win, ctx + 1)

    def metrics(m):
        nll, count = 0.0, 0
        with torch.no_grad():
            for w in windows.split(8):  # contiguous inputs, as in calibration: no recompile
                logits = main_output(m(w[:, :-1].contiguous())).float()
                nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                       w[:, 1:].reshape(-1), reduction="sum").item()
                count += w[:, 1:].numel()
        return {"val perplexity": math.exp(nll / count)}

    return Subject("text_llama", model, batches, metrics, lambda: (batches[0],),
                   {"include": ["model.layers.*"]})


def _vit(n_test: int) -> Subject:
    from benchmarks.models import digits

    model, (xtr, _, xte, yte) = digits.get_model("digits_vit")
    n = len(xte) // 128 * 128
    xte, yte = xte[:n], yte[:n]

    def metrics(m):
        with torch.no_grad():
            pred = torch.cat([main_output(m(x)).argmax(-1) for x in xte.split(128)])
        return {"test accuracy": (pred == yte).float().mean().item()}

    return Subject("digits_vit", model, list(xtr[:512].split(128)), metrics,
                   lambda: (xte[:128],), {"include": ["vit.layers.*"]})


SUBJECTS = {"mobilenet_v2": _mobilenet, "text_llama": _llama, "digits_vit": _vit}


def _compile(subject: Subject, options: dict):
    torch._dynamo.reset()
    effc.reset()
    compiled = torch.compile(subject.model, backend="effc", options=options)
    with torch.no_grad():
        compiled(*subject.example())
    sites = [s for s in effc.report().sites if "filters" not in s.reason]
    before = sum(s.params_before for s in sites)
    kept = sum(s.params_after for s in sites) / before if before else 1.0
    return compiled, kept


def _uniform_ratio(shapes: list[tuple[int, int]], target: float) -> float:
    """The rank_ratio whose uniform ranks keep about `target` of the parameters."""
    def kept(ratio):
        total = sum(m * n for m, n in shapes)
        used = 0
        for m, n in shapes:
            full = min(m, n)
            r = min(full, max(MULTIPLE, math.ceil(math.ceil(ratio * full) / MULTIPLE) * MULTIPLE))
            used += r * (m + n) if r * (m + n) <= m * n else m * n
        return used / total

    lo, hi = 1e-3, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if kept(mid) < target else (lo, mid)
    return lo


def evaluate(subject: Subject, quick: bool) -> tuple[list[list], list[str]]:
    calib = effc.calibrate(subject.model, subject.batches, progress=False, samples=2)
    torch._dynamo.reset()
    effc.reset()
    report = effc.explain(subject.model, *subject.example(), low_rank={
        **subject.scope, "rank": MULTIPLE, "min_saving": 0.0})
    shapes = [tuple(s.details["shape"]) for s in report.sites if s.decision == "rewritten"]
    common = {**subject.scope, "min_saving": 0.0}
    rows, compiled = [], {}

    def run(label, target, options):
        fn, kept = _compile(subject, options)
        with torch.no_grad():
            values = subject.metrics(fn)
        rows.append([label, target, round(kept, 3), *values.values()])
        compiled[len(rows) - 1] = fn
        return kept

    with torch.no_grad():
        dense = subject.metrics(subject.model)
    rows.append(["dense", "-", 1.0, *dense.values()])
    compiled[0] = subject.model
    for target in TARGETS[::2] if quick else TARGETS:
        ratio = _uniform_ratio(shapes, target)
        run("plain uniform", target, {"low_rank": {**common, "rank_ratio": ratio,
                                                   "whiten": False}, "calibration": calib})
        kept = run("whitened uniform", target, {"low_rank": {**common, "rank_ratio": ratio,
                                                             "compensate": False},
                                                "calibration": calib})
        budget = {**common, "param_budget": kept}
        run("proxy allocated", target, {"low_rank": {**budget, "compensate": False,
                                                     "sensitivity": "layer"},
                                        "calibration": calib})
        run("e2e allocated", target, {"low_rank": {**budget, "compensate": False},
                                      "calibration": calib})
        run("e2e + compensation", target, {"low_rank": budget, "calibration": calib})
    run("default, calibrated", "-", {"low_rank": {**subject.scope}, "calibration": calib})
    notes = [n for n in effc.report().graphs[0].notes]
    run("default, no calibration", "-", {"low_rank": {**subject.scope}})
    x = subject.example()
    times = time_interleaved({i: (lambda fn=fn: fn(*x)) for i, fn in compiled.items()},
                             repeats=3 if quick else 5, warmup=1)
    for i, row in enumerate(rows):
        row.append(round(times[i] / times[0], 2))
    return rows, notes


def _plot(name: str, rows: list[list], metric: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for variant, style in (("plain uniform", "o--"), ("whitened uniform", "s-"),
                           ("proxy allocated", "v-"), ("e2e allocated", "^-"),
                           ("e2e + compensation", "D-")):
        pts = sorted((r[2], r[3]) for r in rows if r[0] == variant)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=variant)
    ax.axhline(rows[0][3], color="gray", lw=1, label="dense")
    ax.set_xlabel("fraction of the eligible weights' parameters kept")
    ax.set_ylabel(metric)
    if "perplexity" in metric:
        ax.set_yscale("log")
    ax.set_title(f"low_rank on {name}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"low_rank_quality_{name}.png", dpi=110)
    plt.close(fig)


def run_models(names: list[str], quick: bool) -> str:
    # every variant recompiles the same model code; past Dynamo's default limit of 8 the
    # later ones would silently run eagerly in the latency column
    torch._dynamo.config.recompile_limit = 256
    out = [f"low_rank: quality vs parameters kept, at equal parameters; {machine()}"]
    for name in names:
        subject = SUBJECTS[name](128 if quick else 512)
        rows, notes = evaluate(subject, quick)
        metric_names = list(subject.metrics(subject.model))
        headers = ["variant", "target", "params kept", *metric_names, "CPU time / eager"]
        RESULTS.mkdir(exist_ok=True)
        with open(RESULTS / f"low_rank_quality_{name}.csv", "w", newline="") as f:
            csv.writer(f).writerows([headers, *rows])
        try:
            _plot(name, rows, metric_names[0])
        except ImportError:
            pass
        out += ["", f"### {name}", "", f"plot: benchmarks/results/low_rank_quality_{name}.png",
                "", table(headers, rows), ""]
        out += [f"default, calibrated: {n}" for n in notes]
    return "\n".join(out)


def part_c(quick: bool) -> str:
    """bench_low_rank's part (c): every model."""
    return run_models(list(SUBJECTS), quick)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(SUBJECTS))
    parser.add_argument("--quick", action="store_true", help="every other target, fewer tests")
    parser.add_argument("--record", action="store_true", help="write into BENCHMARKS.md")
    args = parser.parse_args()
    text = run_models([m for m in args.models.split(",") if m], args.quick)
    print(text)
    if args.record:
        record("low_rank_c", "## low_rank: quality vs parameters kept\n\n"
               "`python -m benchmarks.low_rank_quality --record`\n\n" + text)


if __name__ == "__main__":
    main()
