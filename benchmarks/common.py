"""Shared benchmark helpers: interleaved timing, machine description, tables, BENCHMARKS.md.

CPU timings are noisy, so candidates are timed round-robin (each repeat runs every candidate
once, in a rotating order) and compared by their medians, as ratios from the same run.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"


def gpu_ms(fn: Callable[[], object], cudagraph: bool = True) -> tuple[float, str]:
    """Median GPU milliseconds of `fn`, and how they were measured: replayed from a CUDA graph
    where the call can be captured (the kernels' time, no Python launch overhead), else
    `triton.testing.do_bench` (launches included: what eager execution costs)."""
    import triton.testing

    for _ in range(3):  # compile, autotune, allocator warm-up: never inside the measurement
        fn()
    torch.cuda.synchronize()
    if cudagraph:
        try:
            return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"), "cudagraph"
        except Exception as exc:  # a call that cannot be captured: timed with its launches
            print(f"  (cudagraph capture failed: {type(exc).__name__}: {exc}; using do_bench)")
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"), "do_bench"


def time_interleaved(candidates: dict[str, Callable[[], object]], repeats: int = 15,
                     warmup: int = 2, inner: int = 1, gpu: bool = True) -> dict[str, float]:
    """Median seconds per call of each candidate, timed round-robin in one run (CPU noise hits
    all alike). With CUDA in use and `gpu`, each candidate's GPU time instead (`gpu_ms`: a
    synchronize around every call would add its latency, ~0.05 ms, to kernels that take less);
    `gpu=False` keeps wall time with a synchronize at both ends (host cost per call)."""
    names = list(candidates)
    with torch.inference_mode():
        for name in names:
            for _ in range(warmup):
                candidates[name]()
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()  # (after the warmup)
        if cuda and gpu:
            return {n: gpu_ms(candidates[n])[0] / 1e3 for n in names}
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        samples: dict[str, list[float]] = {n: [] for n in names}
        for rep in range(repeats):
            order = names[rep % len(names):] + names[:rep % len(names)]
            for name in order:
                fn = candidates[name]
                sync()
                start = time.perf_counter()
                for _ in range(inner):
                    fn()
                sync()
                samples[name].append((time.perf_counter() - start) / inner)
    return {n: statistics.median(s) for n, s in samples.items()}


def main_output(out) -> torch.Tensor:
    """A model call's main tensor: itself, a Hugging Face output's logits, or its first item."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    return out[0]


def machine() -> str:
    """CPU model, cores and threads used, torch version and date: what a number was taken on."""
    cpu = platform.processor() or "unknown CPU"
    try:
        text = Path("/proc/cpuinfo").read_text()
        found = re.search(r"model name\s*:\s*(.+)", text)
        cpu = found.group(1).strip() if found else cpu
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), {datetime.date.today().isoformat()}")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table; floats to 3 significant digits."""
    def fmt(v: object) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def record(section: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append) `section` of BENCHMARKS.md, delimited by HTML comment markers."""
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else "# effc benchmarks\n"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def run_parts(doc: str, parts: dict[str, Callable[[bool], str]], section: str,
              section_of: Callable[[str], str] | None = None) -> None:
    """The command line every benchmark script shares: --part (comma list), --quick (smoke
    run: never recorded), --record (each part's table into BENCHMARKS.md under
    `section`_<part>, or `section_of(part)`; a part that says it was skipped is not
    recorded)."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--part", default=",".join(parts),
                        help="comma list of parts: " + ", ".join(parts))
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--record", action="store_true", help="write the tables to BENCHMARKS.md")
    args = parser.parse_args()
    for key in (k.strip() for k in args.part.split(",")):
        text = parts[key](args.quick)
        print(text, "\n", flush=True)
        if args.record and not args.quick and "skipped" not in text.splitlines()[0]:
            record(section_of(key) if section_of else f"{section}_{key}", text)

