"""hypercomplex on a real pretrained model: torchvision's ImageNet MobileNetV2 on photos.

Dense pretrained weights are far from Kronecker sums (at n = 2, three of four terms leave
about half of a 1x1 conv's weight), so the quality-bounded default must rewrite nothing
here and say why, and an asked-for budget must report the loss it costs.
"""

import pytest
import torch
from helpers import mobilenet_crops, run_in_batches

import effc
from effc.compiler.metrics import error_stats


@pytest.fixture(scope="module")
def mobilenet():
    model, calib_x, test_x = mobilenet_crops(32, 32, 96)
    calib = effc.calibrate(model, list(calib_x.split(16)), progress=False, samples=1)
    return model, calib, test_x


@pytest.mark.slow
@pytest.mark.parametrize("calibrated", [False, True])
def test_the_default_stays_within_its_bound_and_says_why(mobilenet, calibrated):
    model, calib, x = mobilenet
    with torch.no_grad():
        ref = model(x)
    options = {"hypercomplex": True, **({"calibration": calib} if calibrated else {})}
    out, rep = run_in_batches(model, x, options)
    sites = rep.sites
    assert len(sites) == 53 and all(s.decision == "skipped" for s in sites)
    assert error_stats(ref, out)["sqnr_db"] > 60
    notes = " ".join(rep.graphs[0].notes)
    if calibrated:
        dense = [s for s in sites if "kept dense by the min_sqnr_db allocator" in s.reason]
        assert len(dense) >= 30 and all("relative error" in s.reason for s in dense)
        assert "(bound 25 dB)" in notes and "quality-bounded default" in notes
    else:
        over = [s for s in sites if "over the default bound max_error=0.05" in s.reason]
        assert len(over) >= 30 and "no calibration" in notes


@pytest.mark.slow
def test_an_asked_for_budget_reports_what_it_costs(mobilenet):
    model, calib, x = mobilenet
    with torch.no_grad():
        ref = model(x)
    out, rep = run_in_batches(model, x, {"hypercomplex": {"param_budget": 0.9},
                                         "calibration": calib})
    sites = [s for s in rep.sites if "grouped" not in s.reason]
    assert sum(s.params_after for s in sites) <= 0.9 * sum(s.params_before for s in sites)
    note = next(n for n in rep.graphs[0].notes if n.startswith("hypercomplex param_budget"))
    reported = float(note.split("output SQNR ")[1].split(" dB")[0])
    measured = error_stats(ref, out)["sqnr_db"]
    assert reported < 25 and measured < 25   # the loss is real, and reported
    assert abs(reported - measured) < 6       # calibration photos vs held-out photos
