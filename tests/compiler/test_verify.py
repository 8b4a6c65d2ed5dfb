"""verify: each output named, floats by error, integers by how many elements agree."""

import torch
from helpers import hf_model

import effc
from effc.compiler.report import SiteRow
from effc.passes import Pass, PassResult, extra_passes


class ArgmaxToArgmin(Pass):
    """Turns every argmax into argmin: an integer output that disagrees on every element."""

    name = "toy_argmin"

    def run(self, gm, ctx):
        rows = []
        for node in gm.graph.nodes:
            if node.op == "call_method" and node.target == "argmax":
                node.target = "argmin"
                rows.append(SiteRow(self.name, node.name, "rewritten"))
        return PassResult(rows)


class Classifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 6)

    def forward(self, x):
        logits = self.fc(x)
        return {"logits": logits, "label": logits.argmax(-1)}


def test_integer_output_that_disagrees_everywhere_reports_zero_agreement():
    with extra_passes(ArgmaxToArgmin):
        torch.compile(Classifier(), backend="effc",
                      options={"toy_argmin": True, "verify": True})(torch.randn(5, 8))
    rows = {r["output"]: r for r in effc.report().graphs[0].verify}
    assert set(rows) == {"logits", "argmax"}
    assert rows["logits"]["max_abs"] == 0.0
    assert rows["argmax"]["agreement"] == 0.0 and rows["argmax"]["exact"] is False
    line = next(ln for ln in str(effc.report()).splitlines() if ln.startswith("argmax"))
    assert line.split()[-1] == "0"  # the agreement column is filled, not an empty row


def test_llama_outputs_are_named_by_what_they_hold():
    model, inputs = hf_model("llama")
    compiled = torch.compile(model.eval(), backend="effc",
                             options={"low_rank": {"rank": 8, "min_saving": 0.0}, "verify": True})
    with torch.no_grad():
        compiled(**inputs, use_cache=True)
    names = [r["output"] for r in effc.report().graphs[0].verify]
    assert "logits" in names and any(n.startswith("keys") for n in names), names
    assert len(set(names)) == len(names)
    logits = next(r for r in effc.report().graphs[0].verify if r["output"] == "logits")
    assert 0.0 < logits["rel_fro"] < 1.0


def test_effc_verify_names_model_outputs_by_their_path():
    model, inputs = hf_model("llama")
    model.eval()
    rows = effc.verify(model, {**inputs, "use_cache": True})  # passes off: exact
    names = [r["output"] for r in rows]
    cache = "cache" if "cache.1.values" in names else "past_key_values"  # transformers 5 / 4
    assert names[0] == "logits" and f"{cache}.1.values" in names, names
    assert all(r["max_abs"] == 0.0 for r in rows)
    torch._dynamo.reset()
    lossy = {r["output"]: r for r in effc.verify(model, {**inputs, "use_cache": True},
                                                  low_rank={"rank": 8, "min_saving": 0.0})}
    assert 0.0 < lossy["logits"]["rel_fro"] < 1.0 and lossy[f"{cache}.0.keys"]["sqnr_db"] < 60


def test_effc_verify_reports_integer_outputs_by_agreement():
    with extra_passes(ArgmaxToArgmin):
        rows = {r["output"]: r for r in effc.verify(Classifier(), torch.randn(5, 8),
                                                    toy_argmin=True)}
    assert set(rows) == {"logits", "label"}
    assert rows["label"]["agreement"] == 0.0 and rows["logits"]["max_abs"] == 0.0
