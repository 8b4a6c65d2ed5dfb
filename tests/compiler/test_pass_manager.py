"""Pass manager: order, counters, claims, filters, grad-mode rule, rollback, strict, instruments."""

import pytest
import torch
from helpers import MLP, CopyWeightPass, RaisingPass, SecondWeightPass

import effc
from effc.compiler.pass_manager import Instrument
from effc.passes import extra_passes

WEIGHTS = ["fc1.weight", "fc2.weight", "head.weight"]


@pytest.fixture
def toys():
    with extra_passes(CopyWeightPass, SecondWeightPass, RaisingPass):
        yield


def _run(options, grad=False, model=None):
    torch.manual_seed(0)
    model = (model or MLP()).eval()
    x = torch.randn(6, 16)
    with torch.set_grad_enabled(grad):
        ref = model(x)
        compiled = torch.compile(model, backend="effc", options=options)
        out = compiled(x)
    return ref, out


def _last_graph():
    return effc.report().graphs[-1]


def test_weight_pass_rewrites_every_linear_and_counts_it(toys):
    ref, out = _run({"toy_copy": True})
    assert torch.equal(ref, out)
    g = _last_graph()
    assert g.passes[0].counters == {"seen": 3, "rewritten": 3, "skipped": 0}
    assert [s.site for s in g.sites] == WEIGHTS
    assert sum(s.params_before for s in g.sites) == sum(
        p.numel() for n, p in MLP().named_parameters() if n.endswith("weight"))


def test_a_weight_taken_by_one_pass_is_not_taken_by_another(toys):
    ref, out = _run({"toy_copy": {"include": ["fc*"]}, "toy_second": True})
    assert torch.equal(ref, out)
    first, second = _last_graph().passes
    assert first.counters["rewritten"] == 2 and first.counters["skipped"] == 1
    assert second.counters["rewritten"] == 1  # only head was left
    reasons = {s.site: s.reason for s in second.sites if s.decision == "skipped"}
    assert reasons == {"fc1.weight": "weight fc1.weight already rewritten by toy_copy",
                       "fc2.weight": "weight fc2.weight already rewritten by toy_copy"}


def test_global_and_pass_filters_combine(toys):
    _run({"toy_copy": {"exclude": ["head"]}, "exclude": ["fc1*"]})
    rows = {s.site: s.decision for s in _last_graph().sites}
    assert rows == {"fc1.weight": "skipped", "fc2.weight": "rewritten", "head.weight": "skipped"}


def test_max_rewrites_bisects_sites(toys):
    _run({"toy_copy": True, "toy_second": True, "max_rewrites": 2})
    g = _last_graph()
    assert sum(p.counters["rewritten"] for p in g.passes) == 2
    assert "max_rewrites=2 reached" in [s.reason for s in g.sites]


def test_disable_switches_a_pass_off(toys):
    _run({"toy_copy": True, "toy_second": True, "disable": ["toy_copy"]})
    first, second = _last_graph().passes
    assert first.status == "skipped" and "disabled" in first.reason
    assert second.counters["rewritten"] == 3


def test_weight_passes_leave_grad_mode_graphs_alone(toys):
    ref, out = _run({"toy_copy": True}, grad=True)
    assert torch.equal(ref, out)
    rec = _last_graph().passes[0]
    assert rec.status == "skipped" and "inference only" in rec.reason and rec.sites == []
    with pytest.raises(Exception, match="inference only"):
        _run({"toy_copy": True, "strict": True}, grad=True)


def test_a_raising_pass_is_rolled_back(toys):
    ref, out = _run({"toy_raise": True, "toy_copy": True})
    assert torch.equal(ref, out)  # the negation RaisingPass inserted is gone
    g = _last_graph()
    by_name = {p.name: p for p in g.passes}
    assert by_name["toy_raise"].status == "rolled back"
    assert "RuntimeError: toy failure after editing the graph" in by_name["toy_raise"].reason
    assert by_name["toy_copy"].counters["rewritten"] == 3  # later passes still run
    assert g.nodes_after == g.nodes_before + 3  # three constants, no leftover neg nodes


def test_strict_lets_the_error_propagate(toys):
    with pytest.raises(Exception, match="toy failure"):
        _run({"toy_raise": True, "strict": True})


def test_instruments_see_each_pass_in_order(toys):
    seen = []

    class Recorder(Instrument):
        def on_graph_start(self, gm, ctx):
            seen.append("start")

        def before_pass(self, name, gm, ctx):
            seen.append(f"before {name}")

        def after_pass(self, name, gm, ctx, record):
            seen.append(f"after {name}: {record.status}")

        def on_graph_end(self, gm, ctx, report):
            seen.append(f"end {len(report.passes)}")

    _run({"toy_copy": True, "toy_raise": True, "instruments": [Recorder()]})
    assert seen == ["start", "before toy_copy", "after toy_copy: ran",
                    "before toy_raise", "after toy_raise: rolled back", "end 2"]


def test_verify_reports_output_error(toys):
    _run({"toy_copy": True, "verify": True})
    (row,) = _last_graph().verify
    assert row["max_abs"] == 0.0 and row["rel_fro"] == 0.0 and row["cosine"] == pytest.approx(1.0)
