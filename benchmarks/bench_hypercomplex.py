"""hypercomplex benchmarks: trained PHM models, the phm_linear kernel, quality per parameter.

    .venv/bin/python benchmarks/bench_hypercomplex.py                 # all parts, prints tables
    .venv/bin/python benchmarks/bench_hypercomplex.py --part a --record   # also BENCHMARKS.md

(a) a trained-PHM-shaped MLP (HyperNets' PHMLinear: W rebuilt by a kron sum at every call):
    the reference forward, inductor on it, effc with {"hypercomplex": True} (rewritten to
    phm_linear, W never built), and the dense model with the same W; batch 1 / 8 / 64,
    times relative to the reference, and the outputs' SQNR against it.
(b) phm_linear vs a dense linear at 4096 x 4096, n in {2, 4, 8} (T = n terms), batch
    1 / 8 / 64: weight bytes read and time ratios.
(c) quality per parameter on real pretrained weights (torchvision's ImageNet MobileNetV2):
    per layer, the relative weight error of the Kronecker-sum fit against truncated SVD at
    equal parameters; end to end, param_budget 0.9 / 0.8 for hypercomplex and low_rank,
    calibrated, top-1 agreement with the dense model on held-out photo crops.
(d) PHC conv: the op's materialized weight (built per call, then the library conv) vs the
    grouped form that never builds it, and vs the dense conv, at MobileNet-like sizes.
Runs on CUDA when one is present (parts a, b and d), else on CPU.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import effc  # noqa: E402
from benchmarks.common import machine, run_parts, table, time_interleaved  # noqa: E402
from benchmarks.models.phm import PHMMLP  # noqa: E402
from effc.compiler.metrics import error_stats  # noqa: E402
from effc.kernels.phm import kron_weight  # noqa: E402
from effc.passes.hypercomplex_math import kronecker_fit, params  # noqa: E402
from effc.passes.low_rank_math import factorize  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _where() -> str:
    if DEVICE.type == "cuda":  # (time_interleaved times the GPU: benchmarks.common.gpu_ms)
        return f"{torch.cuda.get_device_name()}, GPU time per call (CUDA graph replay)"
    return machine()


def _dense_twin(model: PHMMLP) -> torch.nn.Module:
    """The same MLP with each PHM layer's W materialized once into an nn.Linear."""
    twin = copy.deepcopy(model)
    for block in twin.blocks:
        for i, layer in enumerate(block):
            w = kron_weight(layer.a.detach(), layer.s.detach())
            lin = torch.nn.Linear(w.shape[1], w.shape[0]).to(w.device)
            lin.weight.data.copy_(w)
            lin.bias.data.copy_(layer.bias.detach())
            block[i] = lin
    return twin


def part_a(quick: bool) -> str:
    n, d = 4, (256 if quick else 1024)
    torch.manual_seed(0)
    model = PHMMLP(n, d).to(DEVICE).eval()
    rows = []
    for batch in (1, 8, 64):
        x = torch.randn(batch, d, device=DEVICE)
        torch._dynamo.reset()
        effc.reset()
        variants = {"reference": model, "inductor": torch.compile(copy.deepcopy(model)),
                    "effc hypercomplex": torch.compile(model, backend="effc",
                                                       options={"hypercomplex": True}),
                    "dense (W built once)": _dense_twin(model)}
        with torch.no_grad():
            ref = model(x)
            outs = {k: f(x) for k, f in variants.items()}
        sites = [s for s in effc.report().sites if s.pass_name == "hypercomplex"]
        rewritten = sum(s.decision == "rewritten" for s in sites)
        times = time_interleaved({k: (lambda f=f: f(x)) for k, f in variants.items()},
                                 repeats=5 if quick else 21, warmup=2)
        for k in variants:
            rows.append([batch, k, times[k] * 1e3, times["reference"] / times[k],
                         error_stats(ref, outs[k])["sqnr_db"],
                         f"{rewritten}/{len(sites)}" if k.startswith("effc") else ""])
    head = (f"(a) PHM MLP (n={n}, d={d}, 2 blocks of d -> 4d -> d, HyperNets' PHMLinear), fp32, "
            f"{_where()}\n\n")
    return head + table(["batch", "variant", "ms", "speedup vs reference", "SQNR dB vs reference",
                         "PHM sites rewritten"], rows)


def part_b(quick: bool) -> str:
    m = k = 1024 if quick else 4096
    torch.manual_seed(0)
    w = torch.randn(m, k, device=DEVICE) / k ** 0.5
    rows = []
    for batch in (1, 8, 64):
        x = torch.randn(batch, k, device=DEVICE)
        cands = {"dense": lambda x=x: F.linear(x, w)}
        for n in (2, 4, 8):
            a = torch.randn(n, n, n, device=DEVICE)
            # stored [p, T, q]-contiguous, as the hypercomplex pass stores it
            s = (torch.randn(m // n, n, k // n, device=DEVICE) / k ** 0.5).transpose(0, 1)
            cands[f"n={n}"] = lambda x=x, a=a, s=s: torch.ops.effc.phm_linear(x, a, s, None)
        times = time_interleaved(cands, repeats=5 if quick else 21, warmup=2)
        for n in (2, 4, 8):
            weight_bytes = params(m, k, n, n) * 4
            rows.append([batch, n, weight_bytes / 2 ** 20, m * k * 4 / 2 ** 20,
                         times["dense"] * 1e3, times[f"n={n}"] * 1e3,
                         times["dense"] / times[f"n={n}"]])
    head = f"(b) phm_linear (T = n) vs dense linear, {m}x{k}, fp32, {_where()}\n\n"
    return head + table(["batch", "n", "PHM weight MiB", "dense weight MiB", "dense ms",
                         "phm_linear ms", "speedup vs dense"], rows)


def _layer_table(model) -> str:
    """Median over MobileNetV2's 1x1 convs and classifier of the weight error at equal
    parameters: Kronecker sum (n, T) vs truncated SVD at the same parameter count."""
    weights = {name: p.detach().double().reshape(p.shape[0], -1)
               for name, p in model.named_parameters()
               if name.endswith("weight") and p.dim() in (2, 4) and
               (p.dim() == 2 or p.shape[2:] == (1, 1))}
    rows = []
    for n, terms in ((2, 1), (2, 2), (2, 3), (4, 4), (4, 8)):
        ratios, kron_err, svd_err, kept = [], [], [], []
        for w in weights.values():
            mm, kk = w.shape
            if mm % n or kk % n:
                continue
            cost = params(mm, kk, n, terms)
            if cost >= mm * kk:
                continue
            e_k = kronecker_fit(w, n).tail_rel_error()[terms].item()
            r = max(1, cost // (mm + kk))
            e_s = factorize(w).tail_rel_error()[min(r, min(mm, kk))].item()
            ratios.append(e_k / max(e_s, 1e-12))
            kron_err.append(e_k)
            svd_err.append(e_s)
            kept.append(cost / (mm * kk))
        med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
        rows.append([n, terms, len(ratios), med(kept), med(kron_err), med(svd_err), med(ratios)])
    return table(["n", "terms", "layers", "params kept (median)", "Kronecker weight error",
                  "SVD weight error (equal params)", "ratio (median)"], rows)


def part_c(quick: bool) -> str:
    from benchmarks.models import mobilenet_v2

    model = mobilenet_v2.pretrained()
    images = mobilenet_v2.photos()
    left = [img[:, :, : img.shape[2] // 2] for img in images]
    right = [img[:, :, img.shape[2] // 2:] for img in images]
    size, n_test = (96, 32) if quick else (160, 128)
    calib = effc.calibrate(model, list(mobilenet_v2.crops(left, 64, size, seed=0).split(16)),
                           progress=False, samples=2)
    test_x = mobilenet_v2.crops(right, n_test, size, seed=1)
    with torch.no_grad():
        ref = model(test_x)
    rows = []
    for budget in (0.9, 0.8):
        for pass_name in ("low_rank", "hypercomplex"):
            torch._dynamo.reset()
            effc.reset()
            compiled = torch.compile(model, backend="effc", options={
                pass_name: {"param_budget": budget}, "calibration": calib})
            with torch.no_grad():
                out = torch.cat([compiled(b) for b in test_x.split(16)])
            sites = [s for s in effc.report().sites if "grouped" not in s.reason]
            kept = sum(s.params_after for s in sites) / sum(s.params_before for s in sites)
            rows.append([budget, pass_name, kept,
                         sum(s.decision == "rewritten" for s in sites),
                         (out.argmax(1) == ref.argmax(1)).float().mean().item(),
                         error_stats(ref, out)["sqnr_db"]])
    end_to_end = table(["param_budget", "pass", "params kept", "sites rewritten",
                        "top-1 agreement", "logits SQNR dB"], rows)
    return (f"(c) quality per parameter, torchvision's pretrained MobileNetV2, {machine()}\n\n"
            f"Per layer (1x1 convs and classifier, raw weights):\n\n{_layer_table(model)}\n\n"
            f"End to end ({n_test} held-out crops of {size} px, calibrated on 64 other crops; "
            f"n=4 for hypercomplex):\n\n{end_to_end}")


def part_d(quick: bool) -> str:
    from effc.kernels.phm_conv import phm_conv, phm_conv_grouped

    torch.manual_seed(0)
    rows = []
    shapes = [(8, 64, 64, 28, 3), (8, 128, 128, 14, 3), (8, 256, 256, 7, 1), (1, 96, 96, 56, 3)]
    for batch, cin, cout, size, k in shapes[:2] if quick else shapes:
        n = 4
        x = torch.randn(batch, cin, size, size, device=DEVICE)
        a = torch.randn(n, n, n, device=DEVICE)
        s = torch.randn(n, cout // n, cin // n, k, k, device=DEVICE) / (cin * k)
        w = kron_weight(a, s)
        pad = [k // 2] * 2
        args = ([1, 1], pad, [1, 1])
        cands = {"dense conv": lambda: F.conv2d(x, w, None, 1, pad),
                 "materialized": lambda: phm_conv(x, a, s, None, *args),
                 "grouped": lambda: phm_conv_grouped(x, a, s, None, *args)}
        times = time_interleaved(cands, repeats=5 if quick else 21, warmup=2)
        rows.append([f"{batch}x{cin}x{size}x{size}, {cout} out, {k}x{k}",
                     *(times[c] * 1e3 for c in cands),
                     times["materialized"] / times["grouped"]])
    return (f"(d) PHC conv (n=4, T=4), fp32, {_where()}\n\n" +
            table(["input, conv", "dense ms", "materialized ms", "grouped ms",
                   "materialized / grouped time"], rows))


def main() -> None:
    run_parts(__doc__, {"a": part_a, "b": part_b, "c": part_c, "d": part_d}, "hypercomplex",
              lambda key: f"hypercomplex_{key}"
                          + ("_cuda" if DEVICE.type == "cuda" and key != "c" else ""))


if __name__ == "__main__":
    main()
