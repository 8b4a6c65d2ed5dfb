"""shift_add benchmarks: quality vs bits per weight, weight bytes, and time per call.

    .venv/bin/python benchmarks/bench_shift_add.py                  # all parts, prints tables
    .venv/bin/python benchmarks/bench_shift_add.py --part a --record    # also BENCHMARKS.md

(a) quality vs bits/weight on torchvision's pretrained MobileNetV2 (top-1 agreement with the
    dense model on held-out photo crops) and on the byte-level Llama trained here (validation
    perplexity): 1 / 2 / 3 power-of-two terms (4 / 8 / 12 bits), naive (weight-error rounding,
    no calibration) and output-aware (calibrated), a per-site mix of 1-3 terms and dense at
    8 bits on average (bytes_budget 0.25), against int8 and int4 per-channel round-to-nearest
    at equal bits (torchao is not installed here), and the default.
(b) CPU time of one 4096 x 4096 linear at batch 1 and 64: dense, shift_linear decoding its
    packed codes per call (memory saved), and the decoded weight cached (memory not saved).
(c) CUDA only: the two Triton variants (exponent-add shifts; decode to the dot) vs cuBLAS.
(d) opt-in binary attention, training-free, on the digits ViT: accuracy by code width.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import effc  # noqa: E402
from benchmarks.common import (machine, main_output, run_parts, table,  # noqa: E402
                               time_interleaved)
from effc.compiler.graph_facts import matches  # noqa: E402
from effc.passes.shift_add_math import fit, pack  # noqa: E402


def _rtn(model: torch.nn.Module, bits: int, scope: dict) -> torch.nn.Module:
    """Per-output-channel symmetric round-to-nearest of the weights shift_add may take."""
    out = copy.deepcopy(model)
    levels = 2 ** (bits - 1) - 1
    for name, mod in out.named_modules():
        w = getattr(mod, "weight", None)
        if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) or w is None or \
                getattr(mod, "groups", 1) != 1 or not matches(f"{name}.weight",
                                                             scope.get("include", ())):
            continue
        flat = w.detach().reshape(w.shape[0], -1)
        scale = flat.abs().amax(1, keepdim=True).clamp_min(1e-12) / levels
        w.data.copy_(((flat / scale).round().clamp(-levels, levels) * scale).reshape(w.shape))
    return out


def _run(subject, options: dict | None) -> tuple[dict, float]:
    """(metrics, weight bytes kept) of the subject compiled with `options` (None: eager)."""
    if options is None:
        return subject.metrics(subject.model), 1.0
    torch._dynamo.reset()
    effc.reset()
    compiled = torch.compile(subject.model, backend="effc", options=options)
    with torch.no_grad():
        compiled(*subject.example())
    result = subject.metrics(compiled)
    sites = [s for s in effc.report().sites if s.pass_name == "shift_add"]
    before = sum(s.params_before * 4 for s in sites if "grouped" not in s.reason)
    after = sum(s.details.get("bytes_after", s.params_before * 4) for s in sites
                if "grouped" not in s.reason)
    return result, after / max(before, 1)


def part_a(quick: bool) -> str:
    from benchmarks.low_rank_quality import _llama, _mobilenet

    out = []
    for make in (_mobilenet, _llama):
        subject = make(64 if quick else 512)
        calib = effc.calibrate(subject.model, subject.batches, progress=False, samples=2)
        scope = subject.scope
        rows = []
        variants = [("dense (fp32)", 32, None, None)]
        for t in (1, 2, 3):
            variants.append((f"shift {t} term{'s' * (t > 1)}, naive", 4 * t,
                             {"shift_add": {"terms": t, "output_aware": False, **scope}}, None))
            variants.append((f"shift {t} term{'s' * (t > 1)}, output-aware", 4 * t,
                             {"shift_add": {"terms": t, **scope}, "calibration": calib}, None))
        variants.append(("shift mixed 1-3 terms or dense, bytes_budget 0.25", 8,
                         {"shift_add": {"bytes_budget": 0.25, **scope}, "calibration": calib},
                         None))
        variants += [("int8 per-channel RTN", 8, None, 8), ("int4 per-channel RTN", 4, None, 4),
                     ("shift default (calibrated)", None,
                      {"shift_add": {**scope}, "calibration": calib}, None)]
        for label, bits, options, rtn in variants:
            if rtn is not None:
                metrics, kept = subject.metrics(_rtn(subject.model, rtn, scope)), rtn / 32
            else:
                metrics, kept = _run(subject, options)
            rows.append([label, bits if bits is not None else f"{32 * kept:.1f} (avg)",
                         kept, *metrics.values()])
        headers = ["variant", "bits/weight", "weight bytes kept", *metrics.keys()]
        out.append(f"### {subject.name}\n\n" + table(headers, rows))
    return (f"(a) quality vs bits per weight, {machine()}\n\n" + "\n\n".join(out))


def part_b(quick: bool) -> str:
    m = k = 1024 if quick else 4096
    torch.manual_seed(0)
    w = torch.randn(m, k) / k ** 0.5
    rows = []
    for batch in (1, 64):
        x = torch.randn(batch, k)
        cands = {"dense": lambda x=x: F.linear(x, w)}
        for t in (1, 2, 3):
            f = fit(w, t)
            codes, scale = pack(f.codes), f.scale.float()
            decoded = f.matrix().float()
            cands[f"shift {t}, per call"] = (lambda x=x, c=codes, s=scale:
                                             torch.ops.effc.shift_linear(x, c, s, None, 0))
            cands[f"shift {t}, cached"] = lambda x=x, d=decoded: F.linear(x, d)
        times = time_interleaved(cands, repeats=5 if quick else 15, warmup=2)
        for name, sec in times.items():
            t = int(name.split()[1].rstrip(",")) if name != "dense" else None
            weight = m * k * 4 if t is None or "cached" in name else t * m * k // 2 + m * 4
            rows.append([batch, name, weight / 2 ** 20, sec * 1e3, times["dense"] / sec])
    return (f"(b) one {m}x{k} linear, fp32, CPU, {machine()}\n\n" +
            table(["batch", "variant", "weight MiB at run time", "ms", "speedup vs dense"],
                  rows))


def part_c(quick: bool) -> str:
    if not torch.cuda.is_available():
        return "(c) skipped: no CUDA device"
    from effc.kernels.shift import shift_linear_triton

    m = k = 4096
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(m, k, device="cuda") / k ** 0.5
        f = fit(w.double().cpu(), 2)
        codes = pack(f.codes).cuda()
        scale = f.scale.to("cuda", dtype)
        for batch in (1, 64):
            x = torch.randn(batch, k, device="cuda", dtype=dtype)
            wd = w.to(dtype)
            cands = {"cuBLAS": lambda: F.linear(x, wd),
                     "shift": lambda: shift_linear_triton(x, codes, scale, variant="shift"),
                     "dot": lambda: shift_linear_triton(x, codes, scale, variant="dot")}
            times = time_interleaved(cands, repeats=20, warmup=3)
            for name, sec in times.items():
                rows.append([str(dtype).removeprefix("torch."), batch, name, sec * 1e3,
                             times["cuBLAS"] / sec])
    return (f"(c) 4096x4096 linear, 2 terms, {torch.cuda.get_device_name()}, GPU time per call "
            "(CUDA graph replay)\n\n" +
            table(["dtype", "batch", "kernel", "ms", "speedup vs cuBLAS"], rows))


def part_d(quick: bool) -> str:
    """Opt-in binary attention (attention="binary"), training-free, on the digits ViT: test
    accuracy and agreement with the dense model for several code widths. Every attention of
    the ViT is replaced; no weight is touched."""
    from benchmarks.models import digits

    model, (_, _, xte, yte) = digits.get_model("digits_vit")
    n = (128 if quick else len(xte)) // 128 * 128
    xte, yte = xte[:n], yte[:n]

    def predict(m):
        with torch.no_grad():
            return torch.cat([main_output(m(x)).argmax(-1) for x in xte.split(128)])

    dense = predict(model)
    rows = [["dense", "-", (dense == yte).float().mean().item(), 1.0]]
    for bits in (32, 64, 256):
        torch._dynamo.reset()
        effc.reset()
        compiled = torch.compile(model, backend="effc", options={"shift_add": {
            "attention": "binary", "attention_bits": bits, "include": ["attention:*"]}})
        pred = predict(compiled)
        rows.append([f"binary attention, {bits} bits", bits,
                     (pred == yte).float().mean().item(), (pred == dense).float().mean().item()])
    return (f"(d) binary attention, training-free, digits ViT ({n} test images), {machine()}\n\n"
            + table(["variant", "code bits", "test accuracy", "agreement with dense"], rows))


def main() -> None:
    run_parts(__doc__, {"a": part_a, "b": part_b, "c": part_c, "d": part_d}, "shift_add")


if __name__ == "__main__":
    main()
