"""shift_add on a real pretrained model: torchvision's ImageNet MobileNetV2 on photos.

Naive rounding of 2 terms (8 bits) keeps about three quarters of MobileNetV2's answers;
output-aware rounding on calibration data is the lever, and the default must keep its bound.
"""

import pytest
import torch
from helpers import mobilenet_crops, run_in_batches

import effc
from effc.compiler.metrics import error_stats


@pytest.fixture(scope="module")
def mobilenet():
    model, calib_x, test_x = mobilenet_crops(48, 48, 112)
    calib = effc.calibrate(model, list(calib_x.split(16)), progress=False, samples=1)
    with torch.no_grad():
        ref = model(test_x)
    return model, calib, test_x, ref


@pytest.mark.slow
def test_output_aware_rounding_beats_naive_rounding_at_eight_bits(mobilenet):
    model, calib, x, ref = mobilenet
    naive, _ = run_in_batches(model, x, {"shift_add": {"terms": 2}})
    aware, rep = run_in_batches(model, x, {"shift_add": {"terms": 2}, "calibration": calib})
    assert sum(s.decision == "rewritten" for s in rep.sites) == 36
    sqnr = {k: error_stats(ref, out)["sqnr_db"] for k, out in (("naive", naive), ("aware", aware))}
    assert sqnr["aware"] > sqnr["naive"] + 6, sqnr   # measured: about 10 dB -> 20 dB


@pytest.mark.slow
def test_the_calibrated_default_keeps_its_bound_on_held_out_photos(mobilenet):
    model, calib, x, ref = mobilenet
    out, rep = run_in_batches(model, x, {"shift_add": True, "calibration": calib})
    note = next(n for n in rep.graphs[0].notes if n.startswith("shift_add min_sqnr_db"))
    assert "(bound 25 dB)" in note and "were not fitted to" in note
    # the bound holds on the calibration's sample call; these are other photos (3 dB slack)
    assert error_stats(ref, out)["sqnr_db"] >= 22
    rewritten = [s for s in rep.sites if s.decision == "rewritten"]
    kept = sum(s.details["bytes_after"] for s in rewritten) / sum(
        s.details["bytes_before"] for s in rewritten)
    assert len(rewritten) >= 25 and kept <= 0.4
