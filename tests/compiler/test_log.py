"""effc's logger: a warning, once per compiled graph, for everything that does less than asked."""

import logging

import pytest
import torch
from helpers import MLP, SmallCNN

import effc
from effc.compiler.log import configure_from_env, logger


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "effc" and r.levelno == logging.WARNING]


def _run(model, options, *inputs, grad=False, calls=1):
    compiled = torch.compile(model, backend="effc", options=options)
    with torch.set_grad_enabled(grad):
        for _ in range(calls):
            compiled(*inputs)


def test_a_filter_that_matches_nothing_warns_once_per_graph(caplog):
    model = MLP().eval()
    _run(model, {"low_rank": {"include": ["model.layers.*"], "rank": 8}}, torch.randn(4, 16),
         calls=3)
    found = [w for w in _warnings(caplog) if "'low_rank.include'" in w]
    assert len(found) == 1 and "'model.layers.*' matches no weight" in found[0]
    assert "rewrote none of the 3 sites" in " ".join(_warnings(caplog))
    (graph,) = effc.report().graphs  # the report holds the same warnings
    assert any(w in found[0] for w in graph.warnings) and "warning: " in str(effc.report())


def test_a_global_exclude_that_matches_nothing_warns(caplog):
    _run(MLP().eval(), {"low_rank": {"rank": 8}, "exclude": ["lm_head"]}, torch.randn(4, 16))
    assert any("option 'exclude': pattern 'lm_head' matches no weight" in w
               for w in _warnings(caplog))


def test_grad_mode_on_warns_that_weight_passes_did_not_run(caplog):
    _run(MLP(), {"low_rank": {"rank": 8}}, torch.randn(4, 16), grad=True)
    (w,) = _warnings(caplog)
    assert "low_rank did not run: grad mode is on" in w


def test_every_site_skipped_warns_with_the_reasons(caplog):
    _run(MLP().eval(), {"low_rank": {"rank_ratio": 0.9}}, torch.randn(4, 16))
    (w,) = _warnings(caplog)
    assert "low_rank rewrote none of the 3 sites it found" in w and "not profitable" in w


def test_a_calibration_from_another_model_warns(caplog):
    calib = effc.calibrate(SmallCNN().eval(), [torch.randn(2, 1, 8, 8)], progress=False)
    torch._dynamo.reset()
    _run(MLP().eval(), {"low_rank": {"rank": 8}, "calibration": calib}, torch.randn(4, 16))
    (w,) = _warnings(caplog)
    assert "the calibration serves 0 of 3 sites" in w and "different model" in w


def test_good_use_and_passes_off_log_no_warning(caplog):
    model = MLP().eval()
    calib = effc.calibrate(model, [torch.randn(8, 16)], progress=False)
    torch._dynamo.reset()
    _run(model, {"low_rank": {"rank": 8, "min_saving": 0.0}, "calibration": calib},
         torch.randn(4, 16))
    torch._dynamo.reset()
    _run(model, {}, torch.randn(4, 16))
    assert _warnings(caplog) == []
    assert effc.report().counters()["low_rank"]["rewritten"] == 2  # the 32 x 5 head: too small


def test_info_lines_say_what_each_pass_did(caplog):
    caplog.set_level(logging.INFO, logger="effc")
    _run(MLP().eval(), {"low_rank": {"rank": 8, "min_saving": 0.0}}, torch.randn(4, 16))
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("low_rank rewrote 2 of 3 sites" in line for line in info)


def test_effc_log_level_sets_the_level_and_rejects_unknown_levels():
    before = logger.level
    try:
        configure_from_env({"EFFC_LOG_LEVEL": "debug"})
        assert logger.level == logging.DEBUG
        with pytest.raises(ValueError, match="EFFC_LOG_LEVEL: expected one of DEBUG, INFO"):
            configure_from_env({"EFFC_LOG_LEVEL": "loud"})
    finally:
        logger.setLevel(before)
        for h in list(logger.handlers):
            logger.removeHandler(h)


def test_no_compiled_graph_says_how_to_compile_for_generate():
    text = str(effc.report())
    assert "compiled no graph" in text and "model.forward = torch.compile(model.forward" in text
