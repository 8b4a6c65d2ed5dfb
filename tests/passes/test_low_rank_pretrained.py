"""low_rank on a real pretrained model: torchvision's ImageNet MobileNetV2 on natural photos.

Tiny models trained in seconds forgive everything; this one does not (uniform ranks at 80 %
of the weights keep about half of its top-1 answers). Small crops keep the test quick; the
full measurement is benchmarks/low_rank_quality.py.
"""

import re

import pytest
import torch
from helpers import mobilenet_crops, run_in_batches

import effc
from effc.compiler.metrics import error_stats


@pytest.fixture(scope="module")
def mobilenet():
    """The pretrained model, its calibration (96 crops, 2 sample calls) and 64 test crops."""
    model, calib_x, test_x = mobilenet_crops(96, 64, 112)
    return model, effc.calibrate(model, list(calib_x.split(16)), progress=False, samples=2), test_x


@pytest.mark.slow
def test_end_to_end_allocation_beats_uniform_ranks_on_the_pretrained_model(mobilenet):
    model, calib, test_x = mobilenet
    with torch.no_grad():
        ref = model(test_x).argmax(-1)
    agreement = {}
    uniform, rep = run_in_batches(model, test_x, {
        "low_rank": {"rank_ratio": 0.45, "min_saving": 0.0, "compensate": False},
        "calibration": calib})
    kept = sum(s.params_after for s in rep.sites) / sum(s.params_before for s in rep.sites)
    folded = [s for s in rep.sites if "batch_norm_folded" in s.details]
    assert len(folded) >= 30  # the stem and the 1x1 convs, each with its BatchNorm folded
    allocated, rep = run_in_batches(model, test_x, {
        "low_rank": {"param_budget": kept, "min_saving": 0.0}, "calibration": calib})
    for name, out in (("uniform", uniform), ("allocated", allocated)):
        agreement[name] = (out.argmax(-1) == ref).float().mean().item()
    assert 0.5 < kept < 0.9
    # measured at 66 % of the weights: 0.09 uniform, 0.66 allocated (0.67 on 256 test crops)
    assert agreement["allocated"] >= agreement["uniform"] + 0.4, agreement
    assert agreement["allocated"] >= 0.6, agreement


@pytest.mark.slow
def test_the_default_keeps_the_pretrained_model_within_its_bound(mobilenet):
    model, calib, test_x = mobilenet
    with torch.no_grad():
        ref = model(test_x)
    out, rep = run_in_batches(model, test_x, {"low_rank": True, "calibration": calib})
    note = next(n for n in rep.graphs[0].notes if "output SQNR" in n)
    assert "(bound 25 dB)" in note
    measured = float(re.search(r"output SQNR ([\d.]+) dB", note).group(1))
    assert measured >= 25.0  # on the sample calls, with fits from the other calibration calls
    # on photos' other halves: measured 24.5 dB (27.1 on the samples); the bound is stated on
    # calibration data, and crops of unseen image halves move the inputs further
    assert error_stats(ref, out)["sqnr_db"] >= 25.0 - 3.0


@pytest.mark.slow
def test_the_classifier_fitted_for_kl_keeps_the_predicted_distribution_closer(mobilenet):
    model, calib, test_x = mobilenet
    with torch.no_grad():
        ref = model(test_x).log_softmax(-1)
    kl, reasons = {}, {}
    for fit in ("mse", "kl"):
        out, rep = run_in_batches(model, test_x, {"calibration": calib, "low_rank": {
            "rank": 384, "include": ["classifier*"], "output_fit": fit, "compensate": False}})
        kl[fit] = (ref.exp() * (ref - out.log_softmax(-1))).sum(-1).mean().item()  # held out
        (row,) = [s for s in rep.sites if s.decision == "rewritten"]
        reasons[fit] = row.reason
    assert "output layer fitted for the KL of its softmax (Fisher information of 32 " \
           "sample output rows" in reasons["kl"]
    assert "KL" not in reasons["mse"]
    # measured on 512 crops: 0.0038 vs 0.0051 at rank 384 (and top-1 agreement 0.959 vs
    # 0.945; at rank 256: 0.906 vs 0.883)
    assert kl["kl"] < 0.9 * kl["mse"], kl
