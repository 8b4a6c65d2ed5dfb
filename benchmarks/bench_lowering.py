"""effc's Triton lowering against inductor on the same rewritten graph, and against eager (CUDA).

    .venv/bin/python benchmarks/bench_lowering.py            # on a CUDA GPU: prints tables
    .venv/bin/python benchmarks/bench_lowering.py --record   # also writes BENCHMARKS.md (GPU only)
    .venv/bin/python benchmarks/bench_lowering.py --smoke    # no GPU: checks only, no timings

(a) per model (an MLP block, a small-config Llama and BERT from transformers configs; each
    dense and with low_rank {"rank_ratio": 0.25}): eager, inductor, and effc with
    lowering=eager|triton|inductor. effc-triton and effc-inductor run the *same* rewritten
    graph (the passes run before lowering), so their ratio compares the generated kernels.
    Latency is `triton.testing.do_bench` (median ms, whole model call); kernel counts are
    effc's report (generated kernels, FX nodes fused, fallbacks) and inductor's
    `generated_kernel_count`; error is against effc lowering=eager (the same graph run eagerly).
(b) decode-shaped kernels (M = 1..8 rows, GEMV-like, bound by reading the weights): the
    low_rank pass's op (`effc.low_rank_linear`: at these M on a GPU, two cuBLAS GEMMs, since the
    fused kernel would re-read v once per column split), the lowering's low-rank group with a
    gelu epilogue (x @ v.T from cuBLAS, then the generated dense template over u), effc's
    generated dense linear+gelu template and cuBLAS's linear + gelu for reference: bytes
    moved / time as a fraction of a measured copy bandwidth (a large
    `torch.empty_like(x).copy_(x)`, read + write bytes).
(c) host time per kernel launch (the Python launcher's shape checks, output allocation and
    argument lists), per kernel kind, next to running the same FX nodes as eager ops: what
    decode-sized calls pay per kernel before the GPU does any work. On CUDA the real launch;
    on the CPU the Triton call is stubbed out, so it measures effc's launcher alone.
(d) seconds the lowering itself takes (partition; and partition, code generation and kernel
    loading) on Llama graphs of 8, 16 and 32 layers: compile time that grows with depth.
Goal (issue): effc-triton >= inductor on the same graph; decode kernels >= 70% of the copy
bandwidth.

Without CUDA, (a) and (b) time nothing: `--smoke` runs tiny shapes on the CPU under the Triton
interpreter, checking every variant's output against eager and printing kernel counts, so the
script itself is exercised. (c) and (d) are timed on the CPU too:

    .venv/bin/python benchmarks/bench_lowering.py --part c,d --record   # CPU: BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # generated kernels run under the interpreter; it must be on before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import effc  # noqa: E402
import effc.kernels.low_rank  # noqa: E402,F401  (torch.ops.effc.low_rank_linear)
from benchmarks.common import gpu_ms, machine, main_output, record, table  # noqa: E402
from effc.compiler.metrics import error_stats  # noqa: E402

LOW_RANK = {"rank_ratio": 0.25}
VARIANTS = ["eager", "inductor", "effc lowering=eager", "effc lowering=triton",
            "effc lowering=inductor"]
INDUCTOR_VARIANTS = {"inductor", "effc lowering=inductor"}
# --smoke (fp32 on the CPU): a lowering of the same graph differs from it by summation order
# only, a few fp32 ulps through a few layers (the tests measure ~3e-7)
SMOKE_TOL = 1e-5


def smoke_check(what: str, rel_err: float, smoke: bool) -> None:
    if smoke and not rel_err <= SMOKE_TOL:
        raise AssertionError(f"smoke check failed: {what}: rel err {rel_err:.2e} > {SMOKE_TOL}")


# --- models ----------------------------------------------------------------------------------
class MLPBlock(nn.Module):
    """x + fc2(gelu(fc1(x))): the transformer MLP with its residual."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x)))


def build(kind: str, smoke: bool, device: str, dtype: torch.dtype):
    """(model, inputs). GPU sizes keep rank_ratio 0.25 ranks <= 128 (the fused low-rank kernel)."""
    import transformers as tf

    torch.manual_seed(0)
    batch, seq = (2, 7) if smoke else (4, 256)
    if kind == "mlp":
        d, hidden = (32, 64) if smoke else (512, 2048)
        model, inputs = MLPBlock(d, hidden), {"x": torch.randn(batch, seq, d)}
    elif kind == "llama":
        size = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2) if smoke else dict(
            hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4)
        cfg = tf.LlamaConfig(vocab_size=96 if smoke else 32000, max_position_embeddings=512, **size)
        model = tf.LlamaForCausalLM(cfg)
        inputs = {"input_ids": torch.randint(0, cfg.vocab_size, (batch, seq))}
    elif kind == "bert":
        size = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4) \
            if smoke else dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                               num_attention_heads=8)
        cfg = tf.BertConfig(vocab_size=96 if smoke else 30522, max_position_embeddings=512,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **size)
        model = tf.BertModel(cfg)
        inputs = {"input_ids": torch.randint(0, cfg.vocab_size, (batch, seq))}
    else:
        raise ValueError(kind)
    model = model.eval().to(device=device, dtype=dtype)
    inputs = {k: v.to(device) if v.dtype == torch.long else v.to(device, dtype)
              for k, v in inputs.items()}
    return model, inputs


def copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy (read + write), the practical HBM ceiling."""
    x = torch.empty(2 ** 28, dtype=torch.uint8, device="cuda").random_()  # 256 MiB
    ms, _ = gpu_ms(lambda: torch.empty_like(x).copy_(x), cudagraph=False)
    return 2 * x.numel() / (ms * 1e-3)


# --- (a) models ------------------------------------------------------------------------------
def make_variant(name: str, model, passes: dict):
    if name == "eager":
        return model
    if name == "inductor":
        return torch.compile(model)
    lowering = name.split("=")[1]
    return torch.compile(model, backend="effc", options={**passes, "lowering": lowering})


def run_model(kind: str, low_rank: bool, smoke: bool, device: str, dtype: torch.dtype,
              variants: list[str]) -> list[list]:
    from torch._inductor import metrics

    model, inputs = build(kind, smoke, device, dtype)
    passes = {"low_rank": dict(LOW_RANK)} if low_rank else {}
    outs, times, counts = {}, {}, {}
    for name in variants:
        torch._dynamo.reset()
        effc.reset()
        metrics.reset()
        fn = make_variant(name, model, passes)
        with torch.inference_mode():
            outs[name] = main_output(fn(**inputs)).float()  # compiles here
            if CUDA and not smoke:
                times[name], _ = gpu_ms(lambda: fn(**inputs), cudagraph=False)
        graphs = effc.report().graphs
        if name == "effc lowering=triton":
            c = {k: sum(g.kernel_counts()[k] for g in graphs) for k in
                 ("kernels", "distinct_kernels", "fused_nodes", "fallbacks")}
            names = sorted({k.name for g in graphs for k in g.kernels})
            counts[name] = (f"{c['kernels']} kernels ({c['distinct_kernels']} distinct), "
                            f"{c['fused_nodes']} nodes fused, {c['fallbacks']} fallbacks; "
                            + ", ".join(names[:6]) + (" ..." if len(names) > 6 else ""))
        elif name in INDUCTOR_VARIANTS:
            counts[name] = f"{metrics.generated_kernel_count} inductor kernels"
        else:
            counts[name] = "-"
        if low_rank and name.startswith("effc"):
            sites = [s for s in effc.report().sites if s.pass_name == "low_rank"]
            counts[name] += f" [{sum(s.decision == 'rewritten' for s in sites)} sites low-rank]"
    ref_graph = outs["effc lowering=eager"]  # the rewritten graph, run eagerly
    rows = []
    for name in variants:
        # eager and inductor run the model as written, not the rewritten graph
        same = error_stats(ref_graph, outs[name])["rel_fro"] \
            if name.startswith("effc") or not low_rank else None
        vs_eager = error_stats(outs["eager"], outs[name])["rel_fro"]
        smoke_check(f"{kind} {name}", same if same is not None else vs_eager, smoke)
        row = [f"{kind}{' low_rank' if low_rank else ''}", name]
        if times:
            row += [times[name], times["eager"] / times[name]]
            row += [times["effc lowering=inductor"] / times[name]
                    if "effc lowering=inductor" in times else "-"]
        row += ["-" if same is None else f"{same:.1e}", f"{vs_eager:.1e}", counts[name]]
        rows.append(row)
    return rows


def part_a(smoke: bool, device: str, dtype: torch.dtype) -> str:
    rows = []
    for kind in ("mlp", "llama", "bert"):
        for low_rank in (False, True):
            variants = VARIANTS if (not smoke or kind == "mlp") else \
                [v for v in VARIANTS if v not in INDUCTOR_VARIANTS]
            print(f"  {kind} {'low_rank' if low_rank else 'dense'}: {', '.join(variants)}",
                  flush=True)
            rows += run_model(kind, low_rank, smoke, device, dtype, variants)
    headers = ["model", "variant"]
    if CUDA and not smoke:
        headers += ["ms", "speedup vs eager", "speedup vs effc-inductor (same graph)"]
    headers += ["rel err vs same graph eager", "rel err vs eager model", "kernels"]
    return table(headers, rows)


# --- (b) decode kernels ----------------------------------------------------------------------
def part_b(smoke: bool, device: str, dtype: torch.dtype) -> str:
    size = torch.finfo(dtype).bits // 8
    k = n = 64 if smoke else 8192
    r = 16 if smoke else 128
    kd = nd = 48 if smoke else 4096
    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *s: (torch.randn(*s, generator=g, device=device) / s[-1] ** 0.5).to(dtype)
    v, u, bias = rnd(r, k), rnd(n, r), rnd(n)
    w, bd = rnd(nd, kd), rnd(nd)
    bw = copy_bandwidth() if CUDA and not smoke else None
    gelu_linear = lambda x: F.gelu(F.linear(x, w, bd))
    from effc.kernels.low_rank import low_rank_linear_triton

    # on CUDA the op dispatches to its Triton kernel (rank <= 128); on the CPU the op is the
    # torch reference, so the smoke run calls the kernel itself, under the interpreter
    low_rank = (lambda x: torch.ops.effc.low_rank_linear(x, v, u, bias)) if CUDA else \
        (lambda x: low_rank_linear_triton(x, v, u, bias))
    library = "cuBLAS" if CUDA else "torch CPU"
    rows = []
    for m in (1, 2, 4, 8):
        x, xd = rnd(m, k), rnd(m, kd)
        cands = {
            f"effc.low_rank_linear K=N={k} r={r}": (
                lambda x=x: low_rank(x), (m * k + r * k + n * r + n + m * n) * size,
                lambda x=x: F.linear(F.linear(x, v), u, bias)),
        }
        torch._dynamo.reset()
        effc.reset()
        lr_gelu = torch.compile(lambda x: F.gelu(torch.ops.effc.low_rank_linear(x, v, u, bias)),
                                backend="effc", options={"lowering": "triton"})
        with torch.inference_mode():
            lr_gelu(x)
        kernels = [kk.name for gr in effc.report().graphs for kk in gr.kernels]
        assert kernels == ["low_rank_linear_gelu"], kernels
        # at these M on a GPU: x @ v.T from cuBLAS, then the dense template over u with the gelu
        cands[f"effc template low_rank_linear_gelu K=N={k} r={r}"] = (
            lambda x=x: lr_gelu(x), (m * k + r * k + 2 * m * r + n * r + n + m * n) * size,
            lambda x=x: F.gelu(F.linear(F.linear(x, v), u, bias)))
        torch._dynamo.reset()
        effc.reset()
        compiled = torch.compile(gelu_linear, backend="effc", options={"lowering": "triton"})
        with torch.inference_mode():
            compiled(xd)
        kernels = [kk.name for gr in effc.report().graphs for kk in gr.kernels]
        assert kernels == ["linear_gelu"], kernels  # the dense template, not a library call
        dense_bytes = (m * kd + nd * kd + nd + m * nd) * size
        cands[f"effc template linear_gelu K=N={kd}"] = (lambda xd=xd: compiled(xd), dense_bytes,
                                                         lambda xd=xd: gelu_linear(xd))
        cands[f"{library} linear + gelu K=N={kd}"] = (lambda xd=xd: gelu_linear(xd), dense_bytes,
                                                   lambda xd=xd: gelu_linear(xd))
        for name, (fn, nbytes, ref) in cands.items():
            with torch.inference_mode():
                err = error_stats(ref().float(), fn().float())["rel_fro"]
                smoke_check(f"M={m} {name}", err, smoke)
                row = [m, name, f"{nbytes / 1e6:.2f} MB", f"{err:.1e}"]
                if bw is not None:
                    ms, how = gpu_ms(fn)
                    achieved = nbytes / (ms * 1e-3)
                    row += [ms * 1e3, achieved / 1e9, f"{achieved / bw:.0%}", how]
            rows.append(row)
    headers = ["M", "kernel", "bytes", "rel err vs torch"]
    if bw is not None:
        headers += ["us", "GB/s", "fraction of copy bandwidth", "timed with"]
    head = f"copy bandwidth: {bw / 1e9:.0f} GB/s (256 MiB copy, read + write)\n\n" if bw else ""
    return head + table(headers, rows)


# --- (c) host overhead per launch ------------------------------------------------------------
class _NoLaunch:
    """Stands in for a jit function on the CPU: `kernel[grid](...)` does nothing, so what is
    timed is effc's launcher alone (the interpreter's run would swamp it)."""

    def __init__(self):
        self.fn = type("Fn", (), {"__globals__": collections.defaultdict(lambda: self)})()

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def part_c(smoke: bool, device: str, dtype: torch.dtype) -> str:
    """Host microseconds per launch of each generated kernel of a small Llama with low_rank
    (shape checks, output allocation, argument lists): on CUDA the real asynchronous launch
    (Triton's launcher included); on the CPU effc's launcher alone, the Triton call stubbed.
    Next to it, the same FX nodes run as eager ops on the same tensors (the fallback path)."""
    from benchmarks.common import time_interleaved
    from effc.compiler.lowering.codegen.launch import Launcher

    model, inputs = build("llama", True, device, dtype)
    compiled = torch.compile(model, backend="effc",
                             options={"low_rank": dict(LOW_RANK), "lowering": "triton"})
    calls: dict[Launcher, tuple] = {}
    original = Launcher.__call__

    def recording(self, *args):
        calls.setdefault(self, args)
        return original(self, *args)

    torch._dynamo.reset()
    effc.reset()
    Launcher.__call__ = recording
    try:
        with torch.inference_mode():
            compiled(**inputs)
    finally:
        Launcher.__call__ = original
    sync = torch.cuda.synchronize if CUDA else (lambda: None)
    inner = 5 if smoke else 200
    per_kind: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    for launcher, args in calls.items():
        if not CUDA:
            launcher.kernel = _NoLaunch()

        def run(fn, args=args):
            for _ in range(inner):
                fn(*args)
            sync()

        t = time_interleaved({"kernel": lambda: run(launcher), "eager": lambda: run(
            launcher.fallback)}, repeats=3 if smoke else 15, gpu=False)
        per_kind[launcher.kind].append((t["kernel"] / inner * 1e6, t["eager"] / inner * 1e6))
    rows = []
    for kind, pairs in sorted(per_kind.items()):
        ours, eager = zip(*pairs)
        rows.append([kind, len(pairs), statistics.median(ours), min(ours), max(ours),
                     statistics.median(eager)])
    what = "launch, Triton's launcher included" if CUDA else "effc launcher, Triton call stubbed"
    return table(["kernel kind", "kernels", f"us per call, median ({what})", "min", "max",
                  "eager ops on the same nodes, median us"], rows)


# --- (d) lowering time vs depth ----------------------------------------------------------------
def part_d(smoke: bool, device: str, dtype: torch.dtype) -> str:
    """Seconds effc's Triton lowering spends on a Llama graph of growing depth (partition, and
    the whole lowering: partition, code generation, loading the cached kernels), with Dynamo's
    graph captured once and lowered again per timing; no kernel runs."""
    import time

    import transformers as tf

    from effc.compiler.config import Config
    from effc.compiler.lowering.partition import partition
    from effc.compiler.report import GraphReport
    from effc.compiler.lowering.triton_lowering import lower_triton

    rows = []
    for layers in ((2, 4) if smoke else (8, 16, 32)):
        torch.manual_seed(0)
        cfg = tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=2)
        model = tf.LlamaForCausalLM(cfg).eval().to(device)
        captured = []

        def capture(gm, example_inputs):
            captured.append((gm, example_inputs))
            return gm

        torch._dynamo.reset()
        with torch.inference_mode():
            torch.compile(model, backend=capture)(input_ids=torch.randint(0, 96, (1, 4),
                                                                          device=device))
        (gm, inputs), = captured
        config = Config.from_options({"lowering": "triton"}, env={})
        timings = {"partition": [], "lowering": []}
        for _ in range(1 if smoke else 3):
            copy = torch.fx.GraphModule(gm, gm.graph.__deepcopy__())
            start = time.perf_counter()
            groups = partition(copy.graph).groups
            timings["partition"].append(time.perf_counter() - start)
            start = time.perf_counter()
            lower_triton(gm, inputs, config, GraphReport(graph="d"), grad_enabled=False)
            timings["lowering"].append(time.perf_counter() - start)
        nodes = sum(1 for n in gm.graph.nodes if n.op in ("call_function", "call_method"))
        rows.append([layers, nodes, len(groups), statistics.median(timings["partition"]),
                     statistics.median(timings["lowering"])])
    return table(["layers", "FX call nodes", "kernels", "partition s (median)",
                  "whole lowering s (median)"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, outputs checked, no timings (the path without a GPU)")
    parser.add_argument("--part", default="a,b,c,d", help="comma list of parts: a, b, c, d")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--record", action="store_true",
                        help="write the tables to BENCHMARKS.md (CUDA runs only)")
    args = parser.parse_args()
    keys = [k.strip() for k in args.part.split(",")]
    if not CUDA and not args.smoke and set(keys) - {"c", "d"}:
        print("bench_lowering: no CUDA device: (a) and (b) need a GPU to time anything.")
        print("Run with --smoke to check the script's paths on the CPU (Triton interpreter), "
              "or --part c,d to time the host overhead per launch and the lowering here.")
        return
    smoke = args.smoke
    device = "cuda" if CUDA else "cpu"
    # the interpreter computes fp16 like the GPU does; fp32 keeps CPU eager references exact
    dtype = getattr(torch, args.dtype) if CUDA else torch.float32
    where = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}" if CUDA
             else f"CPU ({machine()}), Triton interpreter")
    print(f"device: {where}; dtype {dtype}; {'smoke' if smoke else 'full'} run\n")
    sections = []
    parts = {"a": ("(a) models: effc-triton vs inductor on the same rewritten graph, and vs eager",
                   part_a),
             "b": ("(b) decode-shaped kernels (M = 1..8): bandwidth", part_b),
             "c": ("(c) host time per kernel launch", part_c),
             "d": ("(d) lowering time vs model depth (Llama, passes off)", part_d)}
    for key in keys:
        title, fn = parts[key]
        text = f"{title}; {where}; {dtype}\n\n" + fn(smoke, device, dtype)
        print(text + "\n", flush=True)
        sections.append(text)
        if args.record and not smoke:  # after each part: a run cut short keeps what it measured
            if CUDA:
                record("lowering", "## Triton lowering (bench_lowering.py)\n\n"
                       + "\n\n".join(sections))
            else:
                record("lowering_host", "## Triton lowering: host overhead per launch and "
                       "lowering time, CPU (bench_lowering.py --part c,d)\n\n"
                       + "\n\n".join(sections))
    if smoke:
        print(f"smoke: every output matched its eager reference (rel err <= {SMOKE_TOL}); "
              "no timings were taken")
        if args.record:
            print("--record ignored: BENCHMARKS.md takes numbers from a full run only")


if __name__ == "__main__":
    main()
