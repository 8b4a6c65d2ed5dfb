"""low_rank on a real pretrained model: ImageNet MobileNetV2 on natural photos.

Top-1 agreement with the dense model on test crops (photos disjoint from the calibration
crops), and on the crops the dense model is confident about (p > 0.5, a stand-in for top-1
accuracy on labels), at equal parameters, for:
  plain uniform      rank_ratio r, plain SVD
  whitened uniform   rank_ratio r, activation-aware SVD
  proxy allocated    param_budget = what the uniform run kept; data-free sensitivity
                     (a calibration without sample inputs): the allocator before this change
  e2e allocated      the same budget; sensitivity measured end to end on sample inputs
and the quality-bounded default {"low_rank": True} with and without calibration. BatchNorm is
folded into the convs for every variant. CPU latency: compiled / eager, median of repeats.

    python -m benchmarks.low_rank_mobilenet [--record] [--quick]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

import effc
from benchmarks.common import machine, record, table, time_interleaved
from benchmarks.models import mobilenet_v2

RESULTS = Path(__file__).resolve().parent / "results"
RATIOS = (0.5, 0.4, 0.3, 0.25, 0.2)


def _compile(model, x, options):
    torch._dynamo.reset()
    effc.reset()
    compiled = torch.compile(model, backend="effc", options=options)
    with torch.no_grad():
        out = compiled(x)
    sites = effc.report().sites
    before = sum(s.params_before for s in sites)
    kept = sum(s.params_after for s in sites) / before
    return compiled, out, kept, list(effc.report().graphs[0].notes)


def _agreement(ref, out, confident):
    same = ref.argmax(-1) == out.argmax(-1)
    return same.float().mean().item(), same[confident].float().mean().item()


def evaluate(quick: bool) -> tuple[list[list], str]:
    model = mobilenet_v2.pretrained()
    calib_x, test_x = mobilenet_v2.calibration_and_test()
    batches = list(calib_x.split(16))
    calib = effc.calibrate(model, batches, progress=False, samples=2)
    no_samples = effc.calibrate(model, batches, progress=False, samples=0)
    with torch.no_grad():
        ref = model(test_x)
    confident = ref.softmax(-1).max(-1).values > 0.5
    common = {"min_saving": 0.0}
    rows, timing = [], {}

    def run(label, options, ratio=None):
        compiled, out, kept, notes = _compile(model, test_x, options)
        agree, agree_conf = _agreement(ref, out, confident)
        rows.append([label, ratio if ratio is not None else "-", round(kept, 3), agree,
                     agree_conf])
        timing[f"{label} {ratio}"] = compiled
        return kept, notes

    for ratio in RATIOS[::2] if quick else RATIOS:
        run("plain uniform", {"low_rank": {**common, "rank_ratio": ratio, "whiten": False},
                              "calibration": calib}, ratio)
        kept, _ = run("whitened uniform", {"low_rank": {**common, "rank_ratio": ratio},
                                           "calibration": calib}, ratio)
        run("proxy allocated", {"low_rank": {**common, "param_budget": kept},
                                "calibration": no_samples}, ratio)
        run("e2e allocated", {"low_rank": {**common, "param_budget": kept},
                              "calibration": calib}, ratio)
    _, notes = run("default, calibrated", {"low_rank": True, "calibration": calib})
    run("default, no calibration", {"low_rank": True})
    x = test_x[:16]
    pick = {"eager": lambda: model(x)}
    for key in ("default, calibrated None", f"e2e allocated {RATIOS[2]}"):
        if key in timing:
            fn = timing[key]
            pick[key] = lambda fn=fn: fn(x)
    times = time_interleaved(pick, repeats=5)
    speed = ", ".join(f"{k}: {times[k] / times['eager']:.2f}x eager's time" for k in pick
                      if k != "eager")
    summary = (f"{len(test_x)} test crops ({int(confident.sum())} confident), "
               f"{len(calib_x)} calibration crops, 160 x 160; CPU latency (batch 16): {speed}; "
               f"default's note: {notes[0] if notes else '-'}")
    return rows, summary


def _plot(rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for variant, style in (("plain uniform", "o--"), ("whitened uniform", "s-"),
                           ("proxy allocated", "v-"), ("e2e allocated", "^-")):
        pts = sorted((r[2], r[3]) for r in rows if r[0] == variant)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=variant)
    ax.set_xlabel("fraction of the factorized weights' parameters kept")
    ax.set_ylabel("top-1 agreement with the dense model")
    ax.set_title("low_rank on ImageNet MobileNetV2 (pretrained)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "low_rank_mobilenet.png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help="write into BENCHMARKS.md")
    parser.add_argument("--quick", action="store_true", help="every other ratio")
    args = parser.parse_args()
    rows, summary = evaluate(args.quick)
    RESULTS.mkdir(exist_ok=True)
    headers = ["variant", "rank_ratio", "params kept", "top-1 agreement",
               "agreement (confident)"]
    with open(RESULTS / "low_rank_mobilenet.csv", "w", newline="") as f:
        csv.writer(f).writerows([headers, *rows])
    try:
        _plot(rows)
    except ImportError:
        pass
    text = (f"low_rank on ImageNet MobileNetV2 (real pretrained weights), {machine()}\n\n"
            f"{summary}\n\n{table(headers, rows)}\n")
    print(text)
    if args.record:
        record("low_rank_mobilenet", "## low_rank on a real pretrained model: MobileNetV2\n\n"
               "`python -m benchmarks.low_rank_mobilenet --record`; plot "
               "benchmarks/results/low_rank_mobilenet.png\n\n" + text)


if __name__ == "__main__":
    main()
