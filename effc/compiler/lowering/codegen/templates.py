"""GEMM-like templates with an epilogue slot: `low_rank_linear`, `phm_linear`, `shift_linear`,
dense `linear`, and what follows.

Four templates share one epilogue generator:
- low rank, the effc low-rank GEMM: each program computes t = x_rows @ v.T ([BLOCK_M, R_PAD],
  fp32) once, keeps it in registers, and produces its output tiles acc = t @ u.T (+ bias).
  Its text is TEMPLATE in effc/kernels/low_rank.py, which the op's own kernel fills with a
  fixed epilogue, so the op and the lowering run one algorithm (and one set of launch rules).
  When the rows do not fill the GPU (decoding), that kernel would split columns over
  programs that each recompute t, re-reading v: then the module's second kernel, `<name>_t`,
  runs instead: t from a library GEMM, then the dense template over (t, u) with the same
  epilogue (`fused_fills_gpu` decides per launch);
- DENSE, `F.linear(x, W, b)`: x is the [M, K] view of any leading dims, W is [N, K]; each
  program computes one [BLOCK_M, BLOCK_N] tile acc = x @ W.T (+ bias), accumulating in fp32
  with `tl.dot` (IEEE fp32 products unless TF32 is allowed), masked for ragged M, N and K;
  its K loop is the low-rank template's first product (`x_times_wt`). The partitioner only
  hands over a dense linear that has an epilogue: alone, cuBLAS wins;
- phm, `effc.phm_linear(x, a, s, b)`, W = sum_t a_t kron s_t never built: each program mixes
  x's n blocks with a_t's row in registers and multiplies the mix by s_t's tile, for one
  block-row of the output. Its text is TEMPLATE in effc/kernels/phm.py, filled with the op's
  own epilogue there; its launch rules and tiling are in phm_template.py;
- shift, `effc.shift_linear(x, codes, scale, b, group)`, W packed as 4-bit power-of-two codes
  and never decoded in memory: two kernels in one module, as the op has, picked per launch by
  the row count: exponent-add products for up to 16 rows, tiles decoded in registers for
  `tl.dot` above. The text is effc/kernels/shift.py's; launch rules and tiling in
  shift_template.py.

The slot after `acc` receives generated code: the op's own activation, then the fused
pointwise nodes (activation, scale, residual add, gating multiply by another tensor, casts),
each rounded to its dtype as eager would, and one store per materialized node. Extra epilogue
operands are read as [M, N] tiles through strides given at launch (0 for broadcast dims, e.g.
a bias-like [N] vector).

Tiling: for CUDA the kernel is wrapped in `triton.autotune` over a short config list (BLOCK_M,
BLOCK_N, BLOCK_K, num_warps, num_stages) keyed on the problem sizes (the row count by its
power-of-two bucket); under the Triton
interpreter it runs one fixed small config (INTERPRETER_CONFIG), which also keeps every
ragged edge of the test shapes inside a masked block.
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import torch
import torch.nn.functional as F
import triton

from effc.compiler.lowering.codegen.common import (TL_DTYPE, assign, CodegenError, Source, describe, expr,
                                          memory_order, module_text, next_pow2, operand, rounded,
                                          row_major, strides_of)
from effc.compiler.lowering.codegen import phm_template, shift_template
from effc.compiler.lowering.codegen.launch import (NO_FMA, Launcher, alloc, cdiv, check_static,
                                                  sibling, single_or_tuple)
from effc.compiler.lowering.ops import Op, meta
from effc.compiler.lowering.partition import Group
from effc.kernels.low_rank import (BIAS_ADD, column_splits, dot_constexprs, fused_fills_gpu,
                                   kernel_source, rank_block, x_times_wt)

TARGETS = ("interpreter", "cuda")
# the interpreter runs programs one after another: one small config, no tuning
INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Large tiles for prefill-sized M, 16-row
# tiles for decode (M = 1..16, where the kernel is a weight-bandwidth-bound GEMV). Configs that
# do not fit shared memory (fp32, large tiles) are skipped by the autotuner (OutOfResources).
DENSE_CONFIGS = [
    (128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 64, 4, 3),
    (32, 64, 64, 4, 4), (16, 64, 128, 4, 4), (16, 128, 64, 4, 3),
]
# the low-rank template holds t [BLOCK_M, R_PAD] in registers and reads u in [R_PAD, BLOCK_N]
LOW_RANK_CONFIGS = [
    (64, 64, 32, 4, 3), (64, 128, 32, 8, 3), (32, 64, 64, 4, 3), (16, 64, 64, 4, 3),
    (16, 128, 128, 4, 3), (128, 64, 16, 8, 2),
]
# autotuning is keyed on the row count's bucket, not the row count: a new prompt length or
# batch size reuses the tuning of its power-of-two bucket instead of benchmarking every config
AUTOTUNE_KEYS = {"dense": ["M_BUCKET", "N", "K"], "low_rank": ["M_BUCKET", "N", "K", "R"],
                 "phm": phm_template.AUTOTUNE_KEY, "shift": shift_template.AUTOTUNE_KEY,
                 "shift_dot": shift_template.AUTOTUNE_KEY}
_CONFIGS = {"dense": (DENSE_CONFIGS, ("BLOCK_M", "BLOCK_N", "BLOCK_K")),
            "low_rank": (LOW_RANK_CONFIGS, ("BLOCK_M", "BLOCK_N", "BLOCK_K")),
            "phm": (phm_template.PHM_CONFIGS, phm_template.BLOCKS),
            "shift": (shift_template.SHIFT_CONFIGS, shift_template.BLOCKS),
            "shift_dot": (shift_template.DOT_CONFIGS, shift_template.BLOCKS)}
M_BUCKET_MAX = 4096


def m_bucket(m: int) -> int:
    """The autotuning bucket of M rows: the next power of two, all rows above 4096 in one."""
    return min(next_pow2(max(m, 1)), M_BUCKET_MAX)

DENSE = '''
@triton.jit
def {name}(
    x_ptr, w_ptr, {operand_params}
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, {stride_params}
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # tiles in groups of 8 row blocks, column by column within a group: programs running at
    # the same time share the weight's column blocks and x's row blocks in L2
    pid = tl.program_id(0)
    row_blocks = tl.cdiv(M, BLOCK_M)
    in_group = 8 * tl.cdiv(N, BLOCK_N)
    first_m = (pid // in_group) * 8
    group_rows = tl.minimum(row_blocks - first_m, 8)
    pid_m = first_m + (pid % in_group) % group_rows
    pid_n = (pid % in_group) // group_rows
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]

    # acc = x @ w.T for this [BLOCK_M, BLOCK_N] tile
{x_times_wt}
    # ---- epilogue (generated) ----
{epilogue}'''

_ROUND_T = {torch.float32: "t", torch.float16: "t.to(tl.float16)",
            torch.bfloat16: "round_to_bf16(t).to(tl.bfloat16)"}


@dataclasses.dataclass
class GemmPlan:
    template: str              # "low_rank", "phm", "shift" or "dense"
    target: str                # "interpreter" (fixed config) or "cuda" (autotuned)
    shape: tuple               # output shape (sympy)
    x: int                     # positions of the GEMM operands among the launcher's inputs
    weights: list[int]         # [v, u] (low_rank), [a, s] (phm), [codes, scale] (shift), [w]
    bias: int | None
    epilogue: list[int]        # positions of the epilogue's extra operands
    out_dtypes: list[torch.dtype]
    weight_kn: bool = False    # dense `x @ B`: the weight [N, K] is B.t(), passed as a view
    out_orders: list = dataclasses.field(default_factory=list)  # None: row-major; else strided
    two_step: str | None = None  # low_rank: the kernel taking t = x @ v.T from a library GEMM
    dot: str | None = None     # shift: the decode-to-dot kernel, for more than 16 rows
    group: int = 0             # shift: input columns per scale (0: one scale per row)


# whether this Triton's autotuner can keep its choice on disk (triton.autotune(cache_results=))
_AUTOTUNE_CACHES = "cache_results" in inspect.signature(triton.autotune).parameters


def _tuned(text: str, template: str, target: str) -> str:
    """A template's kernel text, wrapped in its autotuner for CUDA."""
    if target != "cuda":
        return text.strip("\n")
    configs, blocks = _CONFIGS[template]
    return _autotune_decorator(configs, AUTOTUNE_KEYS[template], blocks) + "\n" + text.strip("\n")


def _autotune_decorator(configs: list[tuple], key: list[str],
                        blocks: tuple[str, ...] = ("BLOCK_M", "BLOCK_N", "BLOCK_K")) -> str:
    """`@triton.autotune(...)` over `configs` (`blocks`' sizes, num_warps, num_stages), one
    readable line per config; the best config is kept in Triton's cache across processes
    where this Triton can (`cache_results`)."""
    rows = ["        triton.Config({" + ", ".join(f"'{b}': {v}" for b, v in zip(blocks, c[:3]))
            + f"}}, num_warps={c[3]}, num_stages={c[4]})," for c in configs]
    return ("@triton.autotune(\n    configs=[\n" + "\n".join(rows) + "\n    ],\n"
            f"    key={key!r},\n" + ("    cache_results=True,\n" if _AUTOTUNE_CACHES else "") + ")")


def _store_rows(j: int, lead: int) -> tuple[list[str], str]:
    """(lines, offset) of output j's rows in a layout other than row-major: `offs_m` split
    into its `lead` leading-dim indices (sizes out{j}_d1.. passed), each times its stride."""
    lines, rest, terms = [], "offs_m", []
    for k in reversed(range(1, lead)):
        lines += [f"o{j}_i{k} = {rest} % out{j}_d{k}", f"o{j}_r{k} = {rest} // out{j}_d{k}"]
        terms.append(f"o{j}_i{k} * out{j}_s{k}")
        rest = f"o{j}_r{k}"
    terms.append(f"{rest} * out{j}_s0")
    return lines, " + ".join(reversed(terms))


def _epilogue(group: Group, gemm, op: Op, extra: list, bias: bool, dtype: torch.dtype,
              orders: list[list[int] | None]):
    """(lines, out_dtypes, needs_bf16): the generated code after `acc`, shared by templates.
    An output with a memory order (eager's layout, not row-major) is stored through strides."""
    names = {n: f"e{i}" for i, n in enumerate(extra)}
    lines = [f"e{i} = tl.load(in{i}_ptr + offs_m[:, None] * in{i}_sm + offs_n[None, :] * in{i}_sn,"
             f" mask=mask, other=0.0).to(tl.float32)  # {n.name}" for i, n in enumerate(extra)]
    if bias:
        lines.append(BIAS_ADD)
    needs_bf16 = dtype == torch.bfloat16
    for j, n in enumerate(group.nodes):
        node_dtype = meta(n)[1]
        activation = op.params.get("activation", "none")
        if n is gemm and activation != "none":
            # the op's reference applies its activation to the linear's output in its dtype
            act_op = Op("pointwise", "gelu", (), {"approximate": "tanh"}) \
                if activation == "gelu_tanh" else Op("pointwise", activation, ())
            lines.append(f"lin = {rounded('acc', node_dtype)}")
            value = expr(act_op, ["lin"])
        elif n is gemm:
            value = "acc"
        else:
            node_op = group.ops[n]
            value = expr(node_op, [operand(a, names) for a in node_op.operands], node_dtype)
        lines.append(f"# {describe(n)}")
        lines += assign(f"v{j}", value, node_dtype)
        needs_bf16 |= node_dtype == torch.bfloat16
        names[n] = f"v{j}"
    out_dtypes = []
    for j, out in enumerate(group.outputs):
        out_dtypes.append(meta(out)[1])
        where = "offs_m[:, None] * N + offs_n[None, :]"
        if orders[j] is not None:
            row_lines, rows = _store_rows(j, len(group.shape) - 1)
            lines += [f"# {out.name} in eager's layout (memory order {orders[j]})"] + row_lines
            where = f"({rows})[:, None] + offs_n[None, :] * out{j}_sn"
        lines.append(f"tl.store(out{j}_ptr + {where}, "
                     f"{names[out]}.to({TL_DTYPE[meta(out)[1]]}), mask=mask)  # {out.name}")
    return lines, out_dtypes, needs_bf16


def generate(group: Group, target: str = "interpreter") -> Source:
    """The kernel module for a GEMM group; `target` "cuda" wraps it in `triton.autotune`."""
    if target not in TARGETS:
        raise CodegenError(f"unknown GEMM target {target!r}")
    gemm = group.gemm
    op: Op = group.ops[gemm]
    if op.name == "low_rank_linear":
        template, (x, v, u, bias) = "low_rank", op.operands
        weights = [v, u]
    elif op.name == "linear":
        template, (x, w, bias) = "dense", op.operands
        weights = [w]
    elif op.name == "phm_linear":
        template, (x, a, s, bias) = "phm", op.operands
        weights = [a, s]
    elif op.name == "shift_linear":
        template, (x, codes, scale, bias) = "shift", op.operands
        weights = [codes, scale]
    else:
        raise CodegenError(f"no template for {op.name}")
    weight_kn = op.params.get("weight") == "kn"  # x @ B: the weight is B^T, a strided view
    name, dtype = group.kernel_name(), meta(gemm)[1]
    position = {n: i for i, n in enumerate(group.inputs)}
    orders = []  # per output: None (row-major), or eager's memory order, stored with strides
    for out in group.outputs:
        out_shape, st = meta(out)[0], strides_of(out)
        if row_major(out_shape, st):
            orders.append(None)
            continue
        orders.append(memory_order(out_shape, st))
        if orders[-1] is None:
            raise CodegenError(f"output {out.name} has a non-dense layout in eager (strides {st})")
    extra = [n for n in group.inputs
             if any(n in group.ops[m].nodes for m in group.nodes if m is not gemm)]
    for n in extra:
        in_shape = meta(n)[0]
        if len(in_shape) > len(group.shape) or any(
                a not in (1, b) for a, b in zip(in_shape[::-1], group.shape[::-1])):
            raise CodegenError(f"epilogue operand {n.name} {in_shape} does not broadcast to "
                               f"{group.shape}")

    lines, out_dtypes, needs_bf16 = _epilogue(group, gemm, op, extra, bias is not None, dtype,
                                              orders)
    operand_params = (["bias_ptr"] if bias is not None else []) + [f"in{i}_ptr" for i in range(len(extra))]
    operand_params += [f"out{j}_ptr" for j in range(len(group.outputs))]
    stride_params = (["stride_b"] if bias is not None else []) + [
        p for i in range(len(extra)) for p in (f"in{i}_sm", f"in{i}_sn")]
    lead = len(group.shape) - 1
    stride_params += ["M_BUCKET"]  # the autotuning key (CUDA), unused by the kernel body
    stride_params += [p for j, order in enumerate(orders) if order is not None for p in
                      [f"out{j}_s{k}" for k in range(lead)] + [f"out{j}_sn"]
                      + [f"out{j}_d{k}" for k in range(1, lead)]]
    def dense(kernel_name: str) -> str:  # the dense template with this epilogue
        text = DENSE.format(name=kernel_name,
                            operand_params="".join(p + ", " for p in operand_params),
                            stride_params="".join(p + ", " for p in stride_params),
                            x_times_wt=x_times_wt("acc", "w", "n", "BLOCK_N"),
                            epilogue="".join(f"    {line}\n" for line in lines))
        return _tuned(text, "dense", target)

    two_step = dot = None
    if template == "low_rank":
        # fused: t = x @ v.T kept in registers; two-step (`_t`): t from a library GEMM, then
        # the dense template over (t, u) with the same epilogue (see fused_fills_gpu)
        two_step = f"{name}_t"
        body = _tuned(kernel_source(name, operand_params, stride_params, _ROUND_T[dtype], lines),
                      "low_rank", target) + "\n\n" + dense(two_step)
        what = (f"low_rank_linear ({gemm.name}: x={x.name}, rank {int(meta(v)[0][0])}; {name} "
                f"keeps x @ v.T in registers, {two_step} reads it from a library GEMM)")
    elif template == "phm":
        body = _tuned(phm_template.source(name, operand_params, stride_params, lines, dtype),
                      "phm", target)
        what = phm_template.what(gemm.name, x.name, tuple(meta(a)[0]), tuple(meta(s)[0]))
    elif template == "shift":  # both of the op's kernels, the launch picks one by rows
        dot = name + shift_template.DOT_SUFFIX
        body = "\n\n".join([shift_template.helpers()] + [_tuned(shift_template.source(
            kind, kernel_name, operand_params, stride_params, lines, dtype), tuning, target)
            for kind, kernel_name, tuning in (("shift", name, "shift"), ("dot", dot, "shift_dot"))])
        what = shift_template.what(gemm.name, x.name, tuple(meta(codes)[0]), meta(x)[0][-1],
                                   op.params["group"], name)
    else:
        body = dense(name)
        what = (f"linear ({gemm.name}: x={x.name}, weight={w.name} {tuple(meta(w)[0])}"
                + (" stored [K, N], read transposed)" if weight_kn else ")"))
    tiling = "fixed config for the interpreter"
    if target == "cuda":
        tiling = "autotuned over config lists"
    summary = (f"{what} with an epilogue of {len(group.nodes) - 1} FX nodes "
               f"({group.describe()}); output shape {tuple(group.shape)}; epilogue operands: "
               + (", ".join(f"in{i}={n.name}" for i, n in enumerate(extra)) or "none")
               + "; outputs: " + ", ".join(f"out{j}={n.name}" for j, n in enumerate(group.outputs))
               + f"; {tiling}")
    plan = GemmPlan(template, target, group.shape, position[x], [position[t] for t in weights],
                    position[bias] if bias is not None else None,
                    [position[n] for n in extra], out_dtypes, weight_kn, orders, two_step, dot,
                    op.params.get("group", 0))
    return Source(name, "gemm", module_text(name, "gemm", summary, body, needs_bf16), plan)


class GemmLauncher(Launcher):
    kind = "gemm"
    last_config: dict | None = None  # the fixed tiling of the last interpreter launch
    last_variant: str | None = None  # what the last launch ran: low_rank "fused" or "two_step",
    # shift "shift" or "dot"

    def launch(self, *inputs):
        p = self.plan
        x = inputs[p.x]
        weights = [inputs[i] for i in p.weights]
        if p.weight_kn:
            weights = [w.t() for w in weights]
        phm = p.template == "phm"
        n = phm_template.out_features(*weights) if phm else weights[-1].shape[0]
        shape = tuple(x.shape[:-1]) + (n,)
        check_static(shape, p.shape)
        m, k = math.prod(shape[:-1]), x.shape[-1]
        orders = p.out_orders or [None] * len(p.out_dtypes)
        outs = [alloc(shape, dtype, x.device, order) for dtype, order in zip(p.out_dtypes, orders)]
        if m == 0 or n == 0:
            return single_or_tuple(outs)
        x2 = x.reshape(m, k)
        kernel, template = self.kernel, p.template
        if template == "low_rank":
            self.last_variant = "fused" if fused_fills_gpu(m, n, x.device) else "two_step"
            if self.last_variant == "two_step":  # t from the library; then a dense GEMM over u
                x2, weights, k = F.linear(x2, weights[0]), weights[1:], weights[0].shape[0]
                kernel, template = sibling(self.kernel, p.two_step), "dense"
        elif template == "shift":  # exponent-add for few rows, decode-to-dot above
            self.last_variant = shift_template.variant(m)
            if self.last_variant == "dot":
                kernel = sibling(self.kernel, p.dot)
        extra = [inputs[i].expand(shape).reshape(m, n) for i in p.epilogue]
        bias = [inputs[p.bias]] if p.bias is not None else []
        args = [x2, *weights, *bias, *extra,
                *[o.view(m, n) if order is None else o for o, order in zip(outs, orders)]]
        if template == "shift":
            args += shift_template.sizes(m, k, *weights, p.group)
        else:
            args += phm_template.sizes(m, *weights) if phm else [m, n, k]
        if template == "low_rank":
            args.append(weights[0].shape[0])  # R
        args += [x2.stride(0), x2.stride(1)] + [s for t in weights for s in t.stride()]
        args += [b.stride(0) for b in bias] + [s for e in extra for s in e.stride()]
        args.append(m_bucket(m))
        for o, order in zip(outs, orders):  # strides of every dim, then the leading dims' sizes
            if order is not None:
                args += list(o.stride()) + list(shape[1:-1])
        consts = dot_constexprs(x)
        if template == "low_rank":
            consts["R_PAD"] = rank_block(weights[0].shape[0])

        def grid(meta):
            if phm:  # a program per row block and column block of one output block-row
                return phm_template.grid(m, *weights, meta)
            if template == "shift":
                return shift_template.grid(m, n, meta)
            rows, cols = cdiv(m, meta["BLOCK_M"]), cdiv(n, meta["BLOCK_N"])
            if template == "low_rank":  # a program loops over its share of column blocks
                return rows, column_splits(rows, cols, x.device)
            return (rows * cols,)  # the dense template orders its tiles in groups itself

        if p.target == "cuda":  # triton.autotune picks BLOCK_*, num_warps and num_stages
            kernel[grid](*args, **consts, **NO_FMA)
            self.last_config = None
        else:
            config = dict(phm_template.INTERPRETER_CONFIG if phm else
                          shift_template.INTERPRETER_CONFIGS[self.last_variant]
                          if template == "shift" else INTERPRETER_CONFIG)
            kernel[grid(config)](*args, **consts, **config, num_warps=4, num_stages=2,
                                 **NO_FMA)
            self.last_config = config
        return single_or_tuple(outs)
