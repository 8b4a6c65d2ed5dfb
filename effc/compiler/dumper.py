"""The debug dumper: one folder per compiled graph showing what every pass did.

    <debug_dir>/graph_000/
      00_input.py            the graph as Dynamo gave it
      01_<pass>.py/.diff     the graph after each pass, and what that pass changed
      graph_before.svg / graph_after.svg   when pydot and graphviz's `dot` are available
      lowered.py / kernels/*.py   the graph that runs and the Triton source of each kernel
      report.json / report.md

Folder names come from one process-wide counter and skip names already on disk, so graphs
from graph breaks, recompilations and earlier runs never collide.
"""

from __future__ import annotations

import difflib
import itertools
import json
import os
import shutil
import threading
from pathlib import Path

import torch.fx as fx

from effc.compiler.pass_manager import Instrument, PassContext
from effc.compiler.report import GraphReport, PassRecord, graph_to_dict, render_graph

_counter = itertools.count()
_lock = threading.Lock()


def new_graph_name(debug_dir: str | None) -> str:
    """A fresh `graph_NNN` name; with a debug dir, its folder is created (never reused)."""
    with _lock:
        while True:
            name = f"graph_{next(_counter):03d}"
            if debug_dir is None:
                return name
            try:
                os.makedirs(Path(debug_dir) / name, exist_ok=False)
                return name
            except FileExistsError:
                continue


def drawing_unavailable() -> str | None:
    """Why SVG drawings cannot be made here, or None if they can."""
    try:
        import pydot  # noqa: F401
    except ImportError:
        return "pydot is not installed (pip install pydot)"
    if shutil.which("dot") is None:
        return "graphviz's `dot` is not on PATH (apt-get install graphviz)"
    return None


def _code(gm: fx.GraphModule, title: str) -> str:
    return f"# {title}\n" + gm.code.strip() + "\n"


def write_report(folder: str | os.PathLike, report: GraphReport) -> None:
    """(Re)write report.json and report.md in `folder`; also called after a runtime fallback."""
    folder = Path(folder)
    (folder / "report.json").write_text(json.dumps(graph_to_dict(report), indent=2))
    (folder / "report.md").write_text(render_graph(report, markdown=True))


class Dumper(Instrument):
    """Writes the folder for one graph; `folder` must exist (see `new_graph_name`)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._step = 0
        self._last_code = ""
        self._draw_problem = drawing_unavailable()

    def _write(self, name: str, text: str) -> None:
        (self.folder / name).write_text(text)

    def _draw(self, gm: fx.GraphModule, name: str) -> None:
        if self._draw_problem is not None:
            return
        from torch.fx.passes.graph_drawer import FxGraphDrawer

        try:
            dot = FxGraphDrawer(gm, name).get_dot_graph()
            (self.folder / f"{name}.svg").write_bytes(dot.create_svg())
        except Exception as exc:  # a drawing is never worth failing a compile
            self._draw_problem = f"drawing failed: {type(exc).__name__}: {exc}"

    def on_graph_start(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        self._last_code = _code(gm, "the graph as Dynamo gave it")
        self._write("00_input.py", self._last_code)
        self._draw(gm, "graph_before")

    def after_pass(self, name: str, gm: fx.GraphModule, ctx: PassContext,
                   record: PassRecord) -> None:
        self._step += 1
        stem = f"{self._step:02d}_{name}"
        code = _code(gm, f"after pass {name}: {record.status}"
                     + (f" ({record.reason})" if record.reason else "")
                     + f"; {record.counters}")
        self._write(f"{stem}.py", code)
        diff = difflib.unified_diff(self._last_code.splitlines(True)[1:], code.splitlines(True)[1:],
                                    fromfile="before.py", tofile=f"{stem}.py")
        self._write(f"{stem}.diff", "".join(diff))
        self._last_code = code

    def after_lowering(self, lowered, ctx: PassContext, report: GraphReport) -> None:
        if lowered.gm is not None and lowered.sources:
            self._write("lowered.py", _code(lowered.gm, f"after lowering={report.lowering}"))
        if lowered.sources:
            (self.folder / "kernels").mkdir(exist_ok=True)
            for stem, text in lowered.sources.items():
                self._write(f"kernels/{stem}.py", text)

    def on_graph_end(self, gm: fx.GraphModule, ctx: PassContext, report: GraphReport) -> None:
        self._draw(gm, "graph_after")
        if self._draw_problem is not None:
            report.notes.append(f"graph drawings skipped: {self._draw_problem}")
        write_report(self.folder, report)
