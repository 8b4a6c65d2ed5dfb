"""Debug dumper: the folder layout of DESIGN.md, one folder per graph, names never reused."""

import json

import torch
from helpers import BrokenMLP, CopyWeightPass, RaisingPass

import effc
import effc.compiler.dumper as dumper
from effc.passes import extra_passes


def _compile_two_graphs(tmp_path, **extra):
    torch.manual_seed(0)
    model = BrokenMLP().eval()
    options = {"toy_copy": True, "toy_raise": True, "debug_dir": str(tmp_path), **extra}
    x = torch.randn(3, 16)
    with extra_passes(CopyWeightPass, RaisingPass), torch.no_grad():
        assert torch.equal(torch.compile(model, backend="effc", options=options)(x), model(x))
    return sorted(p.name for p in tmp_path.iterdir())


def test_two_graph_model_writes_two_complete_folders(tmp_path):
    effc.reset()
    folders = _compile_two_graphs(tmp_path)
    assert len(folders) == 2
    graphs = effc.report().graphs
    assert [g.graph for g in graphs] == folders
    for folder, graph in zip(folders, graphs):
        files = {p.name for p in (tmp_path / folder).iterdir()}
        expected = {"00_input.py", "01_toy_copy.py", "01_toy_copy.diff", "02_toy_raise.py",
                    "02_toy_raise.diff", "report.json", "report.md"}
        assert expected <= files
        if dumper.drawing_unavailable() is None:
            assert {"graph_before.svg", "graph_after.svg"} <= files
            assert (tmp_path / folder / "graph_after.svg").read_text().lstrip().startswith("<?xml")
        data = json.loads((tmp_path / folder / "report.json").read_text())
        assert data["counters"] == {p.name: p.counters for p in graph.passes}
        assert data["counters"]["toy_copy"]["rewritten"] == len(
            [s for s in graph.sites if s.decision == "rewritten"]) > 0
        assert data["passes"][1]["status"] == "rolled back"
        code = (tmp_path / folder / "01_toy_copy.py").read_text()
        diff = (tmp_path / folder / "01_toy_copy.diff").read_text()
        assert "_effc_" in code and "+" in diff and "_effc_" in diff
        assert (tmp_path / folder / "02_toy_raise.diff").read_text() == ""  # rolled back
        md = (tmp_path / folder / "report.md").read_text()
        assert "toy_copy" in md and "rolled back" in md


def test_input_graph_is_dynamos_code(tmp_path):
    _compile_two_graphs(tmp_path)
    first = sorted(tmp_path.iterdir())[0]
    text = (first / "00_input.py").read_text()
    assert "torch._C._nn.linear" in text and "_effc_" not in text


def test_names_do_not_collide_across_compilations_and_runs(tmp_path):
    (tmp_path / "graph_999").mkdir()  # left over from an earlier process
    a = _compile_two_graphs(tmp_path)
    torch._dynamo.reset()
    b = _compile_two_graphs(tmp_path)
    assert len(b) == len(a) + 2 == 5 and len(set(b)) == 5


def test_missing_graphviz_is_said_in_report_md(tmp_path, monkeypatch):
    monkeypatch.setattr(dumper, "drawing_unavailable", lambda: "graphviz's `dot` is not on PATH")
    folders = _compile_two_graphs(tmp_path)
    for folder in folders:
        files = {p.name for p in (tmp_path / folder).iterdir()}
        assert not any(f.endswith(".svg") for f in files)
        assert "graph drawings skipped: graphviz's `dot` is not on PATH" in (
            tmp_path / folder / "report.md").read_text()


def test_drawings_exist_or_report_md_says_why(tmp_path):
    """.ci/run installs graphviz, so CI takes the first branch; elsewhere the second."""
    folders = _compile_two_graphs(tmp_path)
    problem = dumper.drawing_unavailable()
    if problem is None:
        svg = (tmp_path / folders[0] / "graph_before.svg").read_text()
        assert "<svg" in svg and "linear" in svg
    else:
        assert problem in (tmp_path / folders[0] / "report.md").read_text()


def test_env_var_turns_the_dumper_on(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFC_DEBUG_DIR", str(tmp_path))
    with torch.no_grad():
        torch.compile(torch.nn.Linear(4, 2), backend="effc")(torch.randn(1, 4))
    (folder,) = tmp_path.iterdir()
    assert (folder / "report.md").exists() and (folder / "00_input.py").exists()
