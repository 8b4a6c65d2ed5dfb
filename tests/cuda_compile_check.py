"""Compile every kernel effc generates for a CUDA GPU, on a machine that has none.

Triton compiles to a GPU binary (cubin) without a device: only loading and launching need one.
This script runs real graphs (small Hugging Face models, long rows, dynamic shapes, every
pointwise op, both GEMM templates at several ranks) through `lowering="triton"` with CPU
tensors, the lowering told to target CUDA and each kernel launch recorded instead of run; then
it compiles every distinct recorded kernel (every autotune config of the GEMM templates) for
`--arch` and prints one JSON line per compile: name, options, shared memory, or the error.

It must run without TRITON_INTERPRET (the interpreter would replace the compiler), so the
tests start it in a subprocess (tests/compiler/lowering/test_cuda_compile.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without the Triton interpreter"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import effc  # noqa: E402
import effc.compiler.lowering.triton_lowering as triton_lowering  # noqa: E402
from effc.compiler.lowering.codegen import templates  # noqa: E402
import effc.kernels.low_rank  # noqa: E402,F401

LOW_RANK = torch.ops.effc.low_rank_linear
TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
CALLS: list[tuple] = []
# a multiply-add contracted in fp16/bf16 (math functions work in fp32, so only contraction
# of the generated code's own ops makes these)
HALF_FMA = re.compile(r"fma\.rn(?:\.ftz)?\.b?f16")


def _record(self, *args, **kwargs):
    kwargs.pop("grid", None)
    kwargs.pop("warmup", None)
    CALLS.append((self, args, kwargs))


def _workloads():
    """(name, fn, inputs, options, dynamic): what to lower."""
    from helpers import hf_model

    g = torch.Generator().manual_seed(0)
    rnd = lambda *s, dtype=torch.float32: torch.randn(s, generator=g).to(dtype)
    bf16, fp16 = torch.bfloat16, torch.float16
    out = []
    for kind, dtype, passes in [("llama", torch.float32, {"low_rank": {"rank": 8}}),
                                ("llama", bf16, {}), ("bert", bf16, {"low_rank": {"rank": 8}}),
                                ("gpt2", fp16, {}), ("whisper", fp16, {}), ("falcon", bf16, {})]:
        model, inputs = hf_model(kind)
        inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        out.append((f"{kind} {TYPES[dtype]} {'low_rank' if passes else 'dense'}",
                    model.eval().to(dtype), inputs, passes, False))

    def every_pointwise(x, w):
        y = F.gelu(x) + F.gelu(x, approximate="tanh") * F.silu(w) - torch.relu(x) / 3.0
        y = torch.tanh(y) * torch.sigmoid(x) + torch.exp(-x.abs()) + torch.log(x.abs() + 1.0)
        y = y * torch.rsqrt(x * x + 1.0) + torch.sqrt(x.abs()) - torch.cos(x) * torch.sin(w)
        y = y + F.hardswish(x) + F.leaky_relu(w, 0.2) * x.clamp(-1.0, 1.0) + torch.erf(x)
        return (y.pow(3) - (-y)).to(torch.float32) * 0.5

    def norms(x, r, w, b):
        h = x + r
        ms = h.float().pow(2).mean(-1, keepdim=True)
        return F.layer_norm(h, h.shape[-1:], w, b, 1e-5), (h.float() * torch.rsqrt(ms + 1e-6)).to(x.dtype) * w

    def softmax_scaled(x):
        return torch.softmax(x * 0.125, -1)

    def low_rank_gelu(x, v, u, b):
        return F.gelu(LOW_RANK(x, v, u, b)) * 2.0

    def swiglu(x, w1, w2):
        return F.silu(F.linear(x, w1)) * F.linear(x, w2)

    for dtype in (torch.float32, fp16, bf16):
        out.append((f"pointwise ops {TYPES[dtype]}", every_pointwise,
                    (rnd(5, 77, dtype=dtype), rnd(77, dtype=dtype)), {}, False))
    for dtype in (torch.float32, bf16):
        out.append((f"swiglu {TYPES[dtype]}", swiglu, (rnd(5, 96, dtype=dtype), rnd(256, 96, dtype=dtype),
                                                      rnd(256, 96, dtype=dtype)), {}, False))
    for rank, dtype in [(128, torch.float32), (128, bf16), (256, bf16)]:
        out.append((f"low_rank r{rank} {TYPES[dtype]}", low_rank_gelu,
                    (rnd(5, 96, dtype=dtype), rnd(rank, 96, dtype=dtype),
                     rnd(80, rank, dtype=dtype), rnd(80, dtype=dtype)), {}, False))
    for n in (4096, 16384):
        out.append((f"norms N={n} bf16", norms, (rnd(2, n, dtype=bf16), rnd(2, n, dtype=bf16),
                                                 rnd(n, dtype=bf16), rnd(n, dtype=bf16)), {}, False))
    out.append(("softmax N=50257 (looped) bf16", softmax_scaled, (rnd(2, 50257, dtype=bf16),), {}, False))
    out.append(("softmax dynamic N (both variants)", softmax_scaled, (rnd(3, 45),), {}, True))
    return out


def _signature(fn: JITFunction, args: tuple, kwargs: dict) -> tuple[dict, dict]:
    values = dict(zip(fn.arg_names, args))
    values.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
    constexpr = {p.name for p in fn.params if p.is_constexpr}
    sig, consts = {}, {}
    for name in fn.arg_names:
        v = values.get(name)
        if name in constexpr or v is None:
            sig[name], consts[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + TYPES[v.dtype]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
        else:
            sig[name] = "fp32"
    if "UPCAST_DOT" in consts:  # the interpreter's bf16 workaround: off on a GPU
        consts["UPCAST_DOT"] = False
    return sig, consts


def _compiles(arch: int) -> list[dict]:
    """Every distinct recorded launch (each autotune config), compiled for sm_<arch>."""
    seen, rows = set(), []
    for kernel, args, kwargs in CALLS:
        variants = [(kernel.fn, {**kwargs, **c.all_kwargs()}) for c in kernel.configs] \
            if isinstance(kernel, Autotuner) else [(kernel, kwargs)]
        for fn, kw in variants:
            options = {k: kw[k] for k in ("num_warps", "num_stages", "enable_fp_fusion")
                       if kw.get(k) is not None}
            sig, consts = _signature(fn, args, kw)
            key = (fn.fn.__module__, fn.__name__, tuple(sig.items()), tuple(consts.items()),
                   tuple(options.items()))
            if key in seen:
                continue
            seen.add(key)
            row = {"kernel": fn.__name__, "options": options,
                   "consts": {k: v for k, v in consts.items() if isinstance(v, (int, str))},
                   "dtypes": sorted({t for t in sig.values() if t.startswith("*")})}
            start = time.perf_counter()
            try:
                done = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", arch, 32),
                                      options=options)
                row.update(ok=True, shared=done.metadata.shared, cubin=len(done.asm["cubin"]),
                           half_fma=len(HALF_FMA.findall(done.asm["ptx"])))
            except Exception as exc:  # reported, not raised: the test lists every failure
                row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:400]}")
            row["seconds"] = round(time.perf_counter() - start, 2)
            rows.append(row)
    return rows


def _run(name, fn, inputs, passes, dynamic) -> None:
    torch._dynamo.reset()
    effc.reset()
    before = len(CALLS)
    compiled = torch.compile(fn, backend="effc", dynamic=dynamic,
                             options={"lowering": "triton", "strict": True, **passes})
    with torch.inference_mode():
        if isinstance(inputs, dict):
            compiled(**inputs)
        else:
            compiled(*inputs)
            if dynamic:  # a second length: the looped sibling of the persistent kernel
                compiled(*(torch.randn(3, 100000),))
    print(json.dumps({"workload": name, "launches": len(CALLS) - before}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    args = parser.parse_args()
    JITFunction.run = _record
    Autotuner.run = _record
    triton_lowering.unavailable_reason = lambda *a, **k: None
    triton_lowering.kernel_target = lambda inputs: "cuda"
    workloads = _workloads()
    for workload in workloads:
        _run(*workload)
    # the low-rank groups' two-step kernels (t from a library GEMM, then the dense template
    # over u), which CPU tensors never pick: forced, on every workload with a low-rank GEMM
    templates.fused_fills_gpu = lambda *a: False
    for name, *rest in workloads:
        if "low_rank" in name:
            _run(f"{name} (two-step)", *rest)
    for row in _compiles(args.arch):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
