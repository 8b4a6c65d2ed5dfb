"""`effc.shift_linear` through the Triton lowering: the shift template with a generated epilogue.

The op's kernel text (effc/kernels/shift.py, `kernel_source`) has an epilogue slot; the lowering
fills it with the pointwise nodes that follow the op (bias, activation, residual add, gating
multiply, casts), so each op and its epilogue are one kernel. The generated module holds both of
the op's kernels with that epilogue, and each launch picks one by its row count as the op does:
`<name>` (exponent-add products) up to 16 rows, `<name>_dot` (tiles decoded for tl.dot) above.
Kernels run under the Triton interpreter with one fixed tiling per kernel
(shift_template.INTERPRETER_CONFIGS: shift 8 x 16 x 8, dot 32 x 16 x 16); the shapes below are
ragged against them: 15 rows (two shift row blocks, the second partly masked), 17 and 37 rows,
20 output features (two column blocks), 37 input features (odd: the last byte's high nibble is
padding, random here) in K chunks that end inside a scale group (group 12: chunks of 8 + 4 for
shift; 16-wide dot chunks straddle groups) and a last group of one column; and a shape inside
one block (1 row, 5 x 7). Codes take all 256 byte values. Every kernel writes into NaN-poisoned
outputs, so an element it skips cannot pass.

Tolerances, measured and justified:
- fp32: eager decodes W in fp32 (each weight rounded once) and calls the library GEMM; the
  kernels sum the same products in another order (shift: the exact products x * 2^-e summed per
  group, then scaled once). Outputs are O(1): rtol = atol = 1e-5, as for the other GEMM
  templates (measured: |out - eager| <= 3.5 eps_fp32 (|eager| + 1)).
- fp16/bf16: the dot kernel rounds its decoded tile to the dtype as eager rounds its weight, so
  the GEMMs differ by the summation order only; the shift kernel multiplies by the exact weight
  (as the op's own kernel does), which eager rounds to the dtype first (errors up to eps/2 per
  weight, random signs). Either way the GEMM's output may differ by about one unit in the last
  place before the epilogue's roundings (which match eager's op by op) carry it on, through an
  add or a product of two such outputs at most here: rtol = atol = 4 eps(dtype) on O(1) outputs
  (measured: |out - eager| <= 1.3 eps (|eager| + 1) for the shift kernel, 0.3 eps for the dot
  kernel). A graph computed in a half type and cast to fp32 keeps its tolerance.
"""

import inspect
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
from lowering_helpers import (DEVICE, as_tuple, assert_close, compile_triton, lower,
                              on_device, poisoned_outputs, rand, traced)  # noqa: F401 (fixture)

import effc
import effc.kernels.shift as shift
from effc.compiler.lowering.codegen import cache, generate, shift_template
from effc.compiler.lowering.codegen.templates import GemmLauncher
from effc.compiler.lowering.ops import classify
from effc.compiler.lowering.partition import partition

# modules and inputs on EFFC_TEST_DEVICE (on_device is a lowering_helpers fixture)
pytestmark = pytest.mark.usefixtures("on_device")

SHIFT = torch.ops.effc.shift_linear
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (lead, T, m, n, group): m output and n input features; dot for 37 and 17 rows, shift for 15
# and 1 (see the module docstring for how each is ragged against the blocks)
SHAPES = [((37,), 2, 20, 37, 12), ((17,), 1, 20, 37, 0), ((3, 5), 3, 20, 37, 12),
          ((1,), 2, 5, 7, 0)]
SHAPE_IDS = ["dot-M37T2m20n37g12", "dot-M17T1m20n37g0", "shift-M3x5T3m20n37g12",
             "shift-M1T2m5n7g0"]


def weights(terms, m, n, group, dtype=torch.float32, seed=0, bias=True):
    """codes uint8 [T, m, ceil(n / 2)] (all 256 byte values, padding nibbles included), signed
    scales [m, G] varying along K, bias [m]: outputs O(1) with both signs."""
    g = torch.Generator().manual_seed(seed)
    groups = math.ceil(n / group) if group > 0 else 1
    cpu = dict(generator=g, device="cpu")  # drawn on the CPU even under on_device's default
    codes = torch.randint(0, 256, (terms, m, math.ceil(n / 2)), dtype=torch.uint8, **cpu)
    sign = torch.randint(0, 2, (m, groups), **cpu) * 2 - 1
    scale = (torch.rand(m, groups, **cpu) + 0.5) * sign / n ** 0.5
    b = torch.randn(m, **cpu) * 0.5 if bias else None
    return (codes.to(DEVICE), scale.to(dtype=dtype, device=DEVICE),
            None if b is None else b.to(dtype=dtype, device=DEVICE))


class ShiftBlock(nn.Module):
    """A shift layer's epilogues: gelu(shift(x) + b) + residual, and a SwiGLU gate
    silu(shift_1(x)) * shift_2(x) whose multiply reads the second op's output."""

    def __init__(self, terms, m, n, group, dtype):
        super().__init__()
        self.group = group
        for i in range(3):
            codes, scale, b = weights(terms, m, n, group, dtype, seed=10 + i, bias=i != 1)
            self.register_buffer(f"c{i}", codes)
            self.register_buffer(f"s{i}", scale)
            self.register_buffer(f"b{i}", b)

    def forward(self, x, r):
        h = F.gelu(SHIFT(x, self.c0, self.s0, self.b0, self.group)) + r
        gate = F.silu(SHIFT(x, self.c1, self.s1, None, self.group)) * \
            SHIFT(x, self.c2, self.s2, self.b2, self.group)
        return h, gate


class _Ran:
    """Records each GEMM launch's (kernel, variant, interpreter config)."""

    def __init__(self, monkeypatch):
        self.rows = []
        launch = GemmLauncher.launch

        def spy(launcher, *inputs):
            out = launch(launcher, *inputs)
            self.rows.append((launcher.__name__, launcher.last_variant, launcher.last_config))
            return out

        monkeypatch.setattr(GemmLauncher, "launch", spy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES[1:3], ids=SHAPE_IDS[1:3])
def test_shift_ops_and_their_epilogues_are_one_kernel_each(shape, dtype, monkeypatch):
    """torch.compile with lowering='triton': the report shows each shift op with its epilogue
    in one kernel (the gate's second op is a kernel of its own, whose output the first one's
    epilogue reads), nothing fusable left eager, outputs as eager's; the launches ran the
    variant the row count picks (17 rows: dot, 15: shift)."""
    lead, terms, m, n, group = shape
    model = ShiftBlock(terms, m, n, group, dtype)
    x, r = rand(*lead, n, dtype=dtype, seed=1), rand(*lead, m, dtype=dtype, seed=2)
    ran = _Ran(monkeypatch)
    with torch.inference_mode():
        with poisoned_outputs():
            out = compile_triton(model)(x, r)
        ref = model(x, r)
    (g,) = effc.report().graphs
    assert g.fallbacks == []
    assert [(k.name, k.kind, len(k.nodes)) for k in g.kernels] == [
        ("shift_linear_gelu_add", "gemm", 3), ("shift_linear_silu_mul", "gemm", 3),
        ("shift_linear", "gemm", 1)]
    assert g.kernel_counts() == {"kernels": 3, "distinct_kernels": 3, "fused_nodes": 7,
                                 "fallbacks": 0}
    # Dynamo names nodes after the op or the variable they are assigned to
    assert [(k.nodes, k.outputs) for k in g.kernels] == [
        (["shift_linear", "gelu", "h"], ["h"]), (["shift_linear_1", "silu", "gate"], ["gate"]),
        (["shift_linear_2"], ["shift_linear_2"])]
    assert not any("shift_linear" in ops for ops in g.eager_ops.values())
    assert "triton: 3 kernels (3 distinct) computing 7 FX nodes" in str(effc.report())
    expected = "dot" if math.prod(lead) > 16 else "shift"
    assert sorted(name for name, _, _ in ran.rows) == sorted(k.name for k in g.kernels)
    assert {variant for _, variant, _ in ran.rows} == {expected}
    for o, e in zip(out, ref, strict=True):
        assert_close(o, e)


# epilogues over one shift op (x, codes, scale, b, r, group: r a residual of the output's shape)
EPILOGUES = {
    "plain": lambda x, c, s, b, r, g: SHIFT(x, c, s, b, g),
    "no_bias_relu": lambda x, c, s, b, r, g: torch.relu(SHIFT(x, c, s, None, g)),
    "gelu_tanh": lambda x, c, s, b, r, g: F.gelu(SHIFT(x, c, s, b, g), approximate="tanh"),
    "scale_residual": lambda x, c, s, b, r, g: SHIFT(x, c, s, bias=b, group=g) * 0.5 + r,
    "bias_like_and_cast": lambda x, c, s, b, r, g: (SHIFT(x, c, s, None, g) + b).float() * 2.0,
    # the op's own output is returned too: stored by the kernel besides the epilogue's
    "materialized": lambda x, c, s, b, r, g: (lambda y: (y, torch.tanh(y * 2.0) - r))(
        SHIFT(x, c, s, b, g)),
}

FUSED_NODES = {"plain": 1, "no_bias_relu": 2, "gelu_tanh": 2, "scale_residual": 3,
               "bias_like_and_cast": 4, "materialized": 4}


def _inputs(shape, dtype):
    """(x, codes, scale, b, r) for `shape`; the group goes into the function, not its inputs."""
    lead, terms, m, n, group = shape
    codes, scale, b = weights(terms, m, n, group, dtype, seed=sum(lead) + m)
    return [rand(*lead, n, dtype=dtype, seed=3), codes, scale, b,
            rand(*lead, m, dtype=dtype, seed=4)]


def with_group(fn, group):
    return lambda x, c, s, b, r: fn(x, c, s, b, r, group)


def check(fn, *inputs):
    """Lower `fn` (lowering_helpers.lower: outputs poisoned), compare with eager; every shift op
    and every epilogue node is in a gemm kernel. Returns (report, sources, lowered graph)."""
    out, report, gm, sources = lower(fn, *inputs)
    assert report.kernels and not report.fallbacks, report.fallbacks
    assert all(k.kind == "gemm" and k.name.startswith("shift_linear") for k in report.kernels)
    assert [n for n in gm.graph.nodes if n.op.startswith("call") and classify(n)] == []
    for o, r in zip(as_tuple(out), as_tuple(fn(*inputs)), strict=True):
        assert_close(o, r, inputs[0].dtype)
    return report, sources, gm


def _launcher(gm):
    (launcher,) = [n.target for n in gm.graph.nodes if isinstance(n.target, GemmLauncher)]
    return launcher


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("name", list(EPILOGUES))
def test_shift_linear_with_fused_epilogue(name, shape, dtype):
    report, _, gm = check(with_group(EPILOGUES[name], shape[-1]), *_inputs(shape, dtype))
    (kernel,) = report.kernels
    assert len(kernel.nodes) == FUSED_NODES[name]
    assert kernel.outputs == ([kernel.nodes[0], kernel.nodes[-1]] if name == "materialized"
                              else [kernel.nodes[-1]])
    assert _launcher(gm).last_variant == shift_template.variant(math.prod(shape[0]))


@pytest.mark.skipif(DEVICE.type == "cuda", reason="about the interpreter's tiling; CUDA autotunes")
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2]], ids=[SHAPE_IDS[0], SHAPE_IDS[2]])
def test_interpreter_runs_one_fixed_config_over_ragged_blocks(shape):
    """Each variant runs its own fixed config; rows, output features and K each span several
    blocks, the last partly masked, and (shift) a scale group spans two K chunks."""
    _, sources, gm = check(with_group(EPILOGUES["scale_residual"], shape[-1]),
                           *_inputs(shape, torch.float32))
    (text,) = sources.values()
    assert "autotune" not in text and "fixed config for the interpreter" in " ".join(text.split())
    launcher = _launcher(gm)
    lead, _, m, n, group = shape
    rows = math.prod(lead)
    variant = "dot" if rows > shift.SHIFT_MAX_ROWS else "shift"
    config = shift_template.INTERPRETER_CONFIGS[variant]
    assert launcher.plan.template == "shift" and launcher.plan.group == group
    assert launcher.launches == 1 and launcher.last_variant == variant
    assert launcher.last_config == config
    for size, block in ((rows, config["BLOCK_M"]), (m, config["BLOCK_N"]), (n, config["BLOCK_K"])):
        assert block < size and size % block
    if variant == "shift":
        assert config["BLOCK_K"] < group < 2 * config["BLOCK_K"] and n % group == 1


def _function(text: str, name: str) -> str:
    """One function's text in a module: from its `def` to the next decorator or the end."""
    return re.search(rf"^def {name}\(.*?(?=^@|\Z)", text, flags=re.S | re.M).group(0)


def test_generated_source_fills_the_ops_template_slots():
    """The op's own kernels and the generated ones are the same text: everything up to the
    epilogue is shared (the dot kernel's rounding of its tile aside); the slot holds the op's
    store in one and the fused nodes in the other. The code helpers are shift.py's."""
    fn = with_group(lambda x, c, s, b, r, g: F.silu(SHIFT(x, c, s, b, g)) * r, 12)
    _, sources, _ = check(fn, *_inputs(SHAPES[0], torch.float32))
    (text,) = sources.values()
    body = lambda t: t.split("):\n", 1)[1].split("# ---- epilogue")[0]
    op_shift = inspect.getsource(shift._shift_linear_shift_kernel.fn)
    op_dot = inspect.getsource(shift._shift_linear_dot_kernel.fn)
    gen_shift = _function(text, "shift_linear_silu_mul")
    gen_dot = _function(text, "shift_linear_silu_mul_dot")
    assert body(gen_shift) == body(op_shift)
    # the dot kernel's one other slot: how the decoded tile is rounded to x's dtype (fp32: as is)
    assert "w_in = w\n" in body(gen_dot) and "w_in = w.to(x_ptr.dtype.element_ty)\n" in body(op_dot)
    assert body(gen_dot) == body(op_dot).replace("w.to(x_ptr.dtype.element_ty)", "w")
    for gen in (gen_shift, gen_dot):
        assert "(\n    x_ptr, codes_ptr, scale_ptr, bias_ptr, in0_ptr, out0_ptr," in gen
        assert "# silu = silu(shift_linear, inplace=False)" in gen and "# mul = mul(silu, r)" in gen
    assert "_apply_activation" in op_shift and "_apply_activation" not in text
    for helper in shift_template.HELPERS:
        assert textwrap.dedent(inspect.getsource(getattr(shift, helper).fn)) in text


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_types_round_the_decoded_tile_to_nearest(dtype):
    """The dot kernel rounds its decoded tile to x's dtype as eager rounds its weight: bf16 with
    integer ops (the interpreter's cast truncates), so the GEMMs agree to the summation order."""
    _, sources, _ = check(with_group(EPILOGUES["plain"], 0), *_inputs(SHAPES[1], dtype))
    (text,) = sources.values()
    dot = _function(text, "shift_linear_dot")
    rounding = {torch.float16: "w.to(tl.float16)",
                torch.bfloat16: "round_to_bf16(w).to(tl.bfloat16)"}
    assert f"w_in = {rounding[dtype]}\n" in dot
    assert ("def round_to_bf16(" in text) == (dtype == torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_shift_output_keeps_eager_permuted_layout_and_reads_strided_operands(dtype):
    """`residual + shift(x)` with a channels-first residual takes the residual's layout in
    eager; the kernel stores through strides. x, codes and scale are non-contiguous views."""
    lead, terms, m, n, group = (3, 7), 2, 20, 37, 12
    x = rand(n, *lead, dtype=dtype, seed=5).permute(1, 2, 0)
    codes, scale, b = weights(terms, m, n, group, dtype, seed=6)
    codes = codes.permute(0, 2, 1).contiguous().permute(0, 2, 1)
    scale = scale.t().contiguous().t()
    r = rand(lead[0], m, lead[1], dtype=dtype, seed=7).permute(0, 2, 1)

    def fn(x, codes, scale, b, r):
        h = r + SHIFT(x, codes, scale, b, group)
        return h, F.gelu(h) * 2.0

    assert fn(x, codes, scale, b, r)[0].stride()[-1] != 1
    assert not (x.is_contiguous() or codes.is_contiguous() or scale.is_contiguous())
    _, sources, gm = check(fn, x, codes, scale, b, r)
    assert "in eager's layout" in next(iter(sources.values()))
    assert _launcher(gm).last_variant == "dot"  # 21 rows


@pytest.mark.skipif(DEVICE.type == "cuda", reason="one graph, four sizes: checked on the CPU")
def test_dynamic_row_count_one_graph_picks_the_variant_per_launch(monkeypatch):
    """One graph (dynamic rows) runs the dot kernel above 16 rows and the shift kernel at 16 and
    below, each under its own interpreter config, with the same epilogue."""
    terms, m, n = 2, 20, 37
    codes, scale, b = weights(terms, m, n, 12)
    # the group a literal: dynamic=True would make a closure's int a SymInt input, and a shift
    # op whose group is not a Python int stays eager (the template takes it at generation)
    fn = lambda x: F.gelu(SHIFT(x, codes, scale, b, 12)) * 2.0
    compiled = compile_triton(fn, dynamic=True)
    ran = _Ran(monkeypatch)
    for rows in (33, 17, 16, 3):  # (not 37 = n: Dynamo would take them for one size)
        x = rand(rows, n, seed=rows)
        with torch.inference_mode(), poisoned_outputs():
            out = compiled(x)
        assert_close(out, fn(x))
    (g,) = effc.report().graphs  # one graph for every size
    assert [k.name for k in g.kernels] == ["shift_linear_gelu_mul"] and g.fallbacks == []
    configs = shift_template.INTERPRETER_CONFIGS
    assert ran.rows == [("shift_linear_gelu_mul", v, configs[v])
                        for v in ("dot", "dot", "shift", "shift")]


def test_a_shift_op_on_a_flattened_input_is_computed_on_the_input():
    """A shift_add rewrite of a GPT-2 Conv1D site: shift(x.reshape(-1, K)).view(...); the views
    are dropped so the tanh fuses (graph_rewrites.unflatten_gemms)."""
    lead, terms, m, n, group = (3, 7), 2, 20, 37, 12
    codes, scale, b = weights(terms, m, n, group, seed=8)
    x = rand(*lead, n, seed=9)
    fn = lambda x, c, s, b: torch.tanh(SHIFT(x.reshape(-1, n), c, s, b, group).view(*lead, m))
    out, report, _, _ = lower(fn, x, codes, scale, b)
    (kernel,) = report.kernels
    assert kernel.name == "shift_linear_tanh" and len(kernel.nodes) == 2
    assert any("flattened input" in note for note in report.notes)
    assert_close(out, fn(x, codes, scale, b))


def test_the_op_is_classified_as_a_gemm_with_its_operands_and_group():
    x, codes, scale, b, _ = _inputs(SHAPES[0], torch.float32)
    for fn, bias, group in ((lambda x, c, s, b: SHIFT(x, c, s, b, 12), "b", 12),
                            (lambda x, c, s, b: SHIFT(x, c, s, bias=b, group=12), "b", 12),
                            (lambda x, c, s, b: SHIFT(x, c, s[:, :1]), None, 0)):
        gm = traced(fn, x, codes, scale, b)
        (node,) = [n for n in gm.graph.nodes
                   if n.op == "call_function" and "shift" in str(n.target)]
        op = classify(node)
        assert (op.kind, op.name, op.params) == ("gemm", "shift_linear", {"group": group})
        assert [getattr(o, "name", o) for o in op.operands][::3] == ["x", bias]
        assert op.operands[1].name == "c"  # the uint8 codes: the one non-float operand allowed
    # a float64 x has no template (the op's kernels take fp32/fp16/bf16)
    gm = traced(lambda x, c, s: SHIFT(x, c, s, None, 12), x.double(), codes, scale)
    (node,) = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert classify(node) is None


def _shift_group(dtype=torch.float32):
    fn = with_group(EPILOGUES["scale_residual"], 12)
    (group,) = partition(traced(fn, *_inputs(SHAPES[0], dtype)).graph).groups
    return group


def test_cuda_source_is_autotuned_over_the_shift_and_dot_configs(tmp_path):
    """The CUDA target cannot run here; its source is checked: each of the two kernels wrapped
    in a triton.autotune over its configs (SHIFT_CONFIGS: product tiles of at most 4096 lanes;
    DOT_CONFIGS: blocks >= 16 for tl.dot), keyed on the row bucket, N, K, T and the group; the
    helpers plain jit functions."""
    import ast

    group = _shift_group()
    source = generate(group, "cuda")
    assert source.plan.template == "shift" and "autotuned over" in " ".join(source.text.split())
    assert source.plan.dot == source.name + "_dot"
    module = ast.parse(source.text)
    fns = {d.name: d for d in module.body if isinstance(d, ast.FunctionDef)}
    assert list(fns) == [*shift_template.HELPERS, source.name, source.plan.dot]
    for helper in shift_template.HELPERS:
        assert [ast.unparse(d) for d in fns[helper].decorator_list] == ["triton.jit"]
    for name, configs in ((source.name, shift_template.SHIFT_CONFIGS),
                          (source.plan.dot, shift_template.DOT_CONFIGS)):
        fn = fns[name]
        call = fn.decorator_list[0]
        assert [ast.unparse(d.func if isinstance(d, ast.Call) else d)
                for d in fn.decorator_list] == ["triton.autotune", "triton.jit"]
        params = {a.arg: ast.unparse(a.annotation) if a.annotation else None for a in fn.args.args}
        kw = {k.arg: k.value for k in call.keywords}
        key = ast.literal_eval(kw["key"])
        assert key == ["M_BUCKET", "N", "K", "T", "GROUP"] and all(k in params for k in key)
        if "cache_results" in inspect.signature(triton.autotune).parameters:
            assert ast.literal_eval(kw["cache_results"]) is True
        found = []
        for c in kw["configs"].elts:
            blocks = ast.literal_eval(c.args[0])
            opts = {k.arg: ast.literal_eval(k.value) for k in c.keywords}
            found.append((blocks["BLOCK_M"], blocks["BLOCK_N"], blocks["BLOCK_K"],
                          opts["num_warps"], opts["num_stages"]))
        assert found == configs and len(found) >= 4
        assert all(params[b] == "tl.constexpr" for b in shift_template.BLOCKS)
    shift_configs, dot_configs = shift_template.SHIFT_CONFIGS, shift_template.DOT_CONFIGS
    assert all(c[0] <= shift.SHIFT_MAX_ROWS and c[0] * c[1] * c[2] <= 4096 for c in shift_configs)
    assert any(c[0] == 1 for c in shift_configs) and any(c[0] == 16 for c in shift_configs)
    assert all(min(c[:3]) >= 16 and c[0] > shift.SHIFT_MAX_ROWS // 2 for c in dot_configs)
    assert isinstance(cache.load(source.text, source.name, tmp_path), triton.runtime.Autotuner)
    plain = generate(group, "interpreter").text
    undecorated = re.sub(r"@triton\.autotune\(\n.*?\n\)\n", "", source.text, flags=re.S)
    assert plain.split("@triton.jit", 1)[1] == undecorated.split("@triton.jit", 1)[1]


def test_a_shift_add_model_lowers_its_shift_ops_with_their_gelu(monkeypatch):
    """nn.Sequential(Linear(64, 96), GELU, Linear(96, 32)) rewritten by the shift_add pass
    (2 terms): the first shift op and its GELU are one kernel, the second (the output) a bare
    shift kernel. One graph with dynamic rows: 37 rows run the dot kernels, 5 the shift ones.
    Compared with the same rewritten graph run eagerly, so the only difference is the
    generated code."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32)).eval().to(DEVICE)
    options = {"shift_add": {"terms": 2, "cache_decoded": False}}
    eager = torch.compile(model, backend="effc", options={**options, "lowering": "eager"},
                          dynamic=True)
    lowered = compile_triton(model, options, dynamic=True)
    ran = _Ran(monkeypatch)
    for rows in (37, 5):
        x = rand(rows, 64, seed=11)
        with torch.inference_mode():
            ref = eager(x)
            with poisoned_outputs():
                out = lowered(x)
        assert_close(out, ref)
    eager_graph, g = effc.report().graphs  # each compiled once, for both row counts
    assert eager_graph.lowering == "eager" and g.lowering == "triton" and g.fallbacks == []
    (record,) = g.passes
    assert record.name == "shift_add" and record.counters["rewritten"] == 2
    assert [(k.name, len(k.nodes)) for k in g.kernels] == [("shift_linear_gelu", 2),
                                                           ("shift_linear", 1)]
    assert not any("shift_linear" in ops for ops in g.eager_ops.values())
    assert [(name, variant) for name, variant, _ in ran.rows] == [
        (k.name, variant) for variant in ("dot", "shift") for k in g.kernels]


# Run where Triton compiles for a GPU (no TRITON_INTERPRET): every autotune config of both
# generated shift kernels, recorded from a CUDA-targeted lowering, compiled for sm_90.
_CUDA_CHECK = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    import cuda_compile_check as check
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction
    import effc.kernels.shift  # noqa: F401

    SHIFT = torch.ops.effc.shift_linear
    JITFunction.run = check._record
    Autotuner.run = check._record
    check.TYPES[torch.uint8] = "u8"  # the packed codes
    check.triton_lowering.unavailable_reason = lambda *a, **k: None
    check.triton_lowering.kernel_target = lambda inputs: "cuda"
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, (2, 96, 24), generator=g, dtype=torch.uint8)
    fn = lambda x, c, s, b, r: torch.nn.functional.silu(SHIFT(x, c, s, b, 16)) * r
    for dtype, rows in ((torch.float32, 5), (torch.bfloat16, 5), (torch.float32, 37),
                        (torch.bfloat16, 37)):
        rnd = lambda *s: torch.randn(s, generator=g).to(dtype)
        check._run(f"{{dtype}} {{rows}} rows", fn,
                   (rnd(rows, 48), codes, rnd(96, 3), rnd(96), rnd(rows, 96)), {{}}, False)
    for row in check._compiles(90):
        print(json.dumps(row), flush=True)
""")


@pytest.mark.slow
def test_generated_shift_kernels_compile_for_sm90(tmp_path):
    """The interpreter accepts more than the compiler: every config of both generated kernels
    (5 rows: the shift kernel; 37: the dot one), fp32 and bf16, must compile for the H100 and
    fit its shared memory."""
    pytest.importorskip("triton.backends.nvidia")
    tests = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton"), EFFC_CACHE_DIR=str(tmp_path / "effc"))
    done = subprocess.run([sys.executable, "-c", _CUDA_CHECK.format(tests=str(tests))], env=env,
                          capture_output=True, text=True, timeout=600)
    if done.returncode and "ptxas" in done.stderr:
        pytest.skip("this triton has no ptxas to compile for CUDA")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"kernel"')]
    assert not [r for r in rows if not r["ok"]], rows
    assert {r["kernel"] for r in rows} == {"shift_linear_silu_mul", "shift_linear_silu_mul_dot"}
    for kernel, configs in (("shift_linear_silu_mul", shift_template.SHIFT_CONFIGS),
                            ("shift_linear_silu_mul_dot", shift_template.DOT_CONFIGS)):
        mine = [r for r in rows if r["kernel"] == kernel]
        assert {d for r in mine for d in r["dtypes"]} >= {"*fp32", "*bf16", "*u8"}
        assert len(mine) == 2 * len(configs)
    assert all(r["shared"] <= 232448 for r in rows)  # sm_90's per-block limit (227 KiB)
