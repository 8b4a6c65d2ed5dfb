"""effc.explain returns the report without lowering; the report prints as a table."""

import json

import torch
from helpers import MLP, CopyWeightPass, hf_model

import effc
from effc.passes import extra_passes


def test_explain_reports_sites_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = MLP().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with extra_passes(CopyWeightPass):
        report = effc.explain(model, torch.randn(3, 16), toy_copy=True)
    assert report.counters() == {"toy_copy": {"seen": 3, "rewritten": 3, "skipped": 0}}
    assert report.graphs[0].lowering == "none"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    text = str(report)
    assert "toy_copy" in text and "fc2.weight" in text and "rewritten" in text
    assert "| toy_copy | fc1.weight | rewritten |" in report.to_markdown()
    data = json.loads(report.to_json())
    assert data["counters"]["toy_copy"]["rewritten"] == 3
    weights = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
    assert data["totals"]["params_before"] == data["totals"]["params_after"] == weights
    assert f"params {weights} -> {weights}" in text


def test_explain_takes_a_dict_batch_like_hugging_face():
    model, inputs = hf_model("bert")
    with extra_passes(CopyWeightPass):
        report = effc.explain(model.eval(), inputs, toy_copy={"include": ["encoder.*"]})
    rewritten = [s.site for s in report.sites if s.decision == "rewritten"]
    skipped = [s.site for s in report.sites if s.decision == "skipped"]
    assert len(rewritten) == 2 * 6  # two layers x (q, k, v, attn out, intermediate, output)
    assert all(name.startswith("encoder.layer.") for name in rewritten)
    assert skipped == ["pooler.dense.weight"]


def test_explain_with_no_pass_still_describes_the_graph():
    report = effc.explain(MLP().eval(), torch.randn(2, 16))
    (g,) = report.graphs
    assert g.passes == [] and g.inputs["parameter"] == 6
    assert "no pass enabled" in str(report)
