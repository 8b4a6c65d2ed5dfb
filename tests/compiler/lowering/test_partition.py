"""The partitioner: which nodes fuse, and the two rules it never breaks.

Rules: contracting a group never creates a cycle; a value used outside its group (or returned)
is an output of the group, so it stays materialized. Graphs are traced with
torch.fx.symbolic_trace, which spells ops as Dynamo does (operator.add, torch._C._nn.gelu,
call_method `to`/`pow`/`mean`), with ShapeProp metadata.
"""

import operator

import networkx as nx
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from lowering_helpers import DEVICE, LOW_RANK, poisoned_outputs, traced

from effc.compiler.config import Config
from effc.compiler.lowering.ops import classify
from effc.compiler.lowering.partition import partition
from effc.compiler.report import GraphReport
from effc.compiler.lowering.triton_lowering import lower_triton


def _node(gm, name):
    return next(n for n in gm.graph.nodes if n.name == name)


def _groups(fn, *inputs):
    gm = traced(fn, *inputs)
    return gm, partition(gm.graph)


def _names(nodes):
    return [n.name for n in nodes]


X = torch.randn(37, 45)
W = torch.randn(45)
COL = torch.randn(37, 1)


def test_pointwise_chain_is_one_group_reading_broadcast_inputs():
    gm, p = _groups(lambda x, w, b: F.gelu(x * w + b), X, W, COL)
    (g,) = p.groups
    assert g.kind == "pointwise" and g.kernel_name() == "fused_mul_add_gelu"
    assert _names(g.nodes) == ["mul", "add", "gelu"]
    assert _names(g.inputs) == ["x", "w", "b"] and _names(g.outputs) == ["gelu"]


def test_fusing_a_and_c_around_an_eager_b_is_refused():
    """a -> b (cumsum: not fusable) -> c and a -> c: {a, c} contracted would be a cycle."""
    def fn(x):
        a = x * 2.0
        b = torch.cumsum(a, -1)
        return a + b

    gm, p = _groups(fn, X)
    a, b, c = _node(gm, "mul"), _node(gm, "cumsum"), _node(gm, "add")
    dag = nx.DiGraph([(n, u) for n in gm.graph.nodes for u in n.users])
    assert not nx.is_directed_acyclic_graph(nx.contracted_nodes(dag, a, c, self_loops=False))
    group_of = {n: g for g in p.groups for n in g.nodes}
    assert group_of[a] is not group_of[c] and b not in group_of
    assert group_of[a].outputs == [a]  # read by the cumsum: materialized


def test_multiply_used_and_returned_intermediates_stay_materialized():
    def fn(x, w):
        a = x * w
        r = torch.relu(a)
        return torch.cumsum(a, -1), r.sigmoid(), r

    gm, p = _groups(fn, X, W)
    (g,) = p.groups
    assert _names(g.nodes) == ["mul", "relu", "sigmoid"]
    assert _names(g.outputs) == ["mul", "relu", "sigmoid"]


def test_an_unsupported_op_splits_the_chain_and_stays_eager():
    gm, p = _groups(lambda x: torch.exp(torch.erfinv(torch.tanh(x) * 0.5) + 1.0), X)
    assert [g.kernel_name() for g in p.groups] == ["fused_tanh_mul", "fused_add_exp"]
    assert all(n.name != "erfinv" for g in p.groups for n in g.nodes)


def test_row_groups_take_prologue_and_epilogue():
    def fn(x, w, r):
        h = x + r
        rms = h.to(torch.float32).pow(2).mean(-1, keepdim=True)
        y = h * torch.rsqrt(rms + 1e-6) * w
        return h, y, torch.softmax(y, -1) * 2.0

    gm, p = _groups(fn, X, W, X)
    (g,) = p.groups
    assert g.kind == "row" and g.kernel_name() == "row_add_rmsnorm_softmax_mul"
    assert _names(g.outputs) == ["add", "mul_1", "mul_2"]  # h, y and the softmax epilogue
    assert len(g.nodes) == len([n for n in gm.graph.nodes if n.op.startswith("call")])


def test_layer_norm_with_residual_and_plain_softmax():
    gm, p = _groups(lambda x, r, w, b: F.layer_norm(x + r, (45,), w, b, 1e-5), X, X, W, W)
    assert [g.kernel_name() for g in p.groups] == ["row_add_layernorm"]
    gm, p = _groups(lambda x: F.softmax(x, dim=-1), X)
    assert [g.kernel_name() for g in p.groups] == ["row_softmax"]


def test_gemm_takes_its_epilogue_never_its_prologue():
    v, u, b = torch.randn(8, 45), torch.randn(29, 8), torch.randn(29)

    def fn(x, v, u, b, r):
        h = x * 2.0
        y = LOW_RANK(h, v, u, b)
        return F.silu(y) * r + 1.0

    gm, p = _groups(fn, X, v, u, b, torch.randn(37, 29))
    kinds = {g.kind: g for g in p.groups}
    assert set(kinds) == {"pointwise", "gemm"}
    assert _names(kinds["pointwise"].nodes) == ["mul"]
    assert kinds["gemm"].kernel_name() == "low_rank_linear_silu_mul_add"
    assert _names(kinds["gemm"].inputs) == ["mul", "v", "u", "b", "r"]


def test_two_gemms_never_share_a_kernel():
    v, u = torch.randn(8, 45), torch.randn(29, 8)
    gm, p = _groups(lambda x, v, u: F.silu(LOW_RANK(x, v, u)) * LOW_RANK(x, v, u), X, v, u)
    assert sorted(g.kernel_name() for g in p.groups) == ["low_rank_linear", "low_rank_linear_silu_mul"]


WD, BD = torch.randn(29, 45), torch.randn(29)


def test_dense_linear_forms_a_gemm_group_only_with_an_epilogue():
    """A bare linear (bias included) stays a library call; with an epilogue it is a template."""
    gm, p = _groups(lambda x, w, b: F.linear(x, w, b), X, WD, BD)
    assert p.groups == []
    assert classify(_node(gm, "linear")).name == "linear"  # classified, then left to cuBLAS
    gm, p = _groups(lambda x, w, b: F.linear(x, w, b).to(torch.float32), X, WD, BD)
    assert p.groups == []  # a no-op cast is no epilogue
    gm, p = _groups(lambda x, w, b, r: F.gelu(F.linear(x * 2.0, w, b)) * r, X, WD, BD,
                    torch.randn(37, 29))
    kinds = {g.kind: g for g in p.groups}
    assert set(kinds) == {"pointwise", "gemm"}  # x * 2.0 is a prologue: not fused
    assert kinds["gemm"].kernel_name() == "linear_gelu_mul"
    assert _names(kinds["gemm"].nodes) == ["linear", "gelu", "mul_1"]
    assert _names(kinds["gemm"].inputs) == ["mul", "w", "b", "r"]


def test_dense_linear_arguments_the_template_does_not_take_stay_eager():
    for fn, args in [(lambda x, w, b: F.linear(x, w, b), (X, WD, torch.randn(1, 29))),  # [1, N] bias
                     (lambda x, w: F.linear(x, w), (X, torch.randn(45)))]:            # 1-d weight
        fn(*args)  # eager takes these
        assert classify(_node(traced(fn, *args), "linear")) is None


def _calls(gm):
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def _segments_respected(gm, p):
    """No group has nodes on both sides of a barrier."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    cuts = [order[_node(gm, name)] for name, _ in p.barriers]
    return all(not any(min(order[n] for n in g.nodes) < c < max(order[n] for n in g.nodes)
                       for c in cuts) for g in p.groups)


def _lowered_matches_eager(fn, x):
    """fn (returning a tuple) lowered with kernels against eager: its outputs, and its input
    as each left it."""
    config = Config.from_options({"lowering": "triton"}, env={})
    lowered, _ = lower_triton(traced(fn, x.clone()), (x.clone(),), config,
                              GraphReport(graph="test"), grad_enabled=False)
    x_ref, x_low = x.clone(), x.clone()
    ref = fn(x_ref)
    with poisoned_outputs(), torch.no_grad():
        out = lowered(x_low)
    for o, r in zip(out, ref, strict=True):
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(x_low, x_ref, rtol=0, atol=0, equal_nan=True)


def test_in_place_ops_on_fresh_intermediates_are_rewritten_out_of_place_and_fuse():
    """add_, relu(inplace=True), mul_, torch.relu_, masked_fill_ on a tensor this graph made:
    computed out of place, later readers pointed at the written value, and fused."""
    def fn(x, w):
        y = x * w
        y.add_(1.0)
        z = F.relu(y, inplace=True)
        z.mul_(3)
        torch.relu_(z)
        y.masked_fill_(y > 2.0, 0.5)  # y, z and the relu_ result are one tensor in eager
        return y * 2.0

    x, w = X.clone(), W.clone()
    gm, p = _groups(fn, x, w)
    assert p.barriers == []
    assert p.functionalized == ["add_", "relu", "mul_", "relu_", "masked_fill_"]
    assert not any(n.target in ("add_", "mul_", "masked_fill_") or n.kwargs.get("inplace")
                   for n in _calls(gm))
    g, tail = p.groups  # masked_fill and `>` are not kernel ops: the chain splits around them
    assert g.kernel_name() == "fused_mul_add_relu_mul_relu" and _names(g.outputs) == ["relu_"]
    assert tail.kernel_name() == "fused_mul" and _names(tail.inputs) == ["masked_fill_"]
    gm.recompile()
    torch.testing.assert_close(gm(x, w), fn(X.clone(), W.clone()), rtol=0, atol=0)
    assert torch.equal(x, X) and torch.equal(w, W)


def test_a_write_into_topk_values_is_rewritten_but_one_into_a_split_is_not():
    """An MoE router renormalises its top-k weights in place (`w /= w.sum(-1, keepdim=True)`,
    Mixtral): topk's values are a new tensor, so the write is computed out of place and fuses
    into a row kernel. A chunk of `split` is a view of its input: writing it stays a barrier."""
    def router(x):
        w, idx = torch.topk(torch.softmax(x, -1), 2, dim=-1)
        w.div_(w.sum(-1, keepdim=True))  # Dynamo's `w /= ...` (symbolic_trace would not)
        return w, idx

    def chunk(x):
        y = x * 2.0
        a, b = y.split(20, dim=-1)
        a.div_(a.sum(-1, keepdim=True))
        return y

    gm, p = _groups(router, X.clone())
    assert p.barriers == [] and p.functionalized == ["div_"]
    assert [g.kernel_name() for g in p.groups] == ["row_softmax", "row_sum_div"]
    gm.recompile()
    for o, r in zip(gm(X.clone()), router(X.clone())):
        torch.testing.assert_close(o, r, rtol=0, atol=0)
    gm, p = _groups(chunk, X.clone())
    assert [name for name, _ in p.barriers] == ["div_"] and p.functionalized == []


def test_writes_into_inputs_views_and_aliased_tensors_stay_eager_as_barriers():
    """Each unsafe write is kept, with its reason, and no group spans it."""
    def fn(x):
        y = x * 2.0
        v = y[:, 0]          # a view of y
        a = torch.tanh(y) + 1.0
        v.mul_(2.0)          # writes y through the view: a read before, sigmoid after
        b = torch.sigmoid(y) * 3.0
        x.add_(b)            # writes the caller's tensor
        return a, b, x * 4.0

    gm, p = _groups(fn, X.clone())
    assert [name for name, _ in p.barriers] == ["mul_", "add_"] and p.functionalized == []
    why = dict(p.barriers)
    assert "`getitem`, which may share memory" in why["mul_"]
    assert "graph input `x`" in why["add_"]
    assert _segments_respected(gm, p)
    assert [g.kernel_name() for g in p.groups] == ["fused_mul_tanh_add", "fused_sigmoid_mul",
                                                   "fused_mul"]


@pytest.mark.parametrize("case", ["read_through_a_view_before", "dtype_changes", "out_kwarg",
                                  "no_twin", "unknown_producer"])
def test_every_unsafe_write_says_why(case):
    def read_through_a_view_before(x):
        y = x * 2.0
        t = y.t()             # an alias of y read before the write: it must see it
        y.add_(1.0)
        return t * 1.0

    def dtype_changes(x):
        y = x * 2.0
        y.add_(torch.ones(45, dtype=torch.float64))  # y + that would be float64
        return y * 1.0

    def out_kwarg(x):
        y = x * 2.0
        torch.add(x, 1.0, out=y)
        return y * 1.0

    def no_twin(x):
        y = x * 2.0
        y.exponential_()  # random: no out-of-place twin effc knows (nor a sound one)
        return y * 1.0

    def unknown_producer(x):
        y = torch.erfinv(x.clamp(-0.5, 0.5)).contiguous()  # contiguous may return its input
        y.add_(1.0)
        return y * 1.0

    fn = locals()[case]
    expected = {"read_through_a_view_before": "`t` reads `mul` before the write",
                "dtype_changes": "another dtype or shape", "out_kwarg": "no out-of-place form",
                "no_twin": "no out-of-place form", "unknown_producer": "`contiguous`, which may"}
    gm, p = _groups(fn, X.clone())
    ((name, why),) = p.barriers
    assert expected[case] in why and "stays eager" in why
    assert p.functionalized == [] and _segments_respected(gm, p)
    if case != "no_twin":
        gm.recompile()
        torch.testing.assert_close(gm(X.clone()), fn(X.clone()), rtol=0, atol=0)


def test_eval_mode_dropout_with_inplace_writes_nothing():
    gm, p = _groups(lambda x: F.dropout(x * 2.0, 0.1, False, True) + 1.0, X)
    assert p.barriers == [] and [g.kernel_name() for g in p.groups] == ["fused_mul", "fused_add"]
    gm, p = _groups(lambda x: F.dropout(x * 2.0, 0.1, True, True) + 1.0, X)  # training: writes
    assert [name for name, _ in p.barriers] == ["dropout"]


def test_a_cast_that_aliases_a_written_tensor_is_not_fused():
    """`y.float()` on a float32 y is y: a kernel would return a copy that misses the write."""
    def fn(x):
        y = x * 2.0
        c = y.float()
        d = c + 1.0
        y[:, 0].mul_(2.0)
        return d, c * 3.0

    gm, p = _groups(fn, X.clone())
    cast = _node(gm, "float_1")
    assert all(cast not in g.nodes for g in p.groups)
    assert [g.kernel_name() for g in p.groups] == ["fused_mul", "fused_add", "fused_mul"]
    _lowered_matches_eager(fn, X)  # c * 3.0 sees the write, as in eager
    gm2, p2 = _groups(lambda x: (x * 2.0).float() + 1.0, X)  # nothing written: fused as before
    assert [g.kernel_name() for g in p2.groups] == ["fused_mul_add"]


def test_identity_only_groups_are_dropped():
    gm, p = _groups(lambda x: F.dropout(x.to(torch.float32), 0.1, False), X)
    assert p.groups == []


SPELLINGS = [
    (lambda x: x + 1.0, "add"), (lambda x: torch.add(x, x), "add"), (lambda x: x.add(x), "add"),
    (lambda x: 1.0 - x, "sub"), (lambda x: x.mul(3), "mul"), (lambda x: x / 3, "div"),
    (lambda x: torch.relu(x), "relu"), (lambda x: F.relu(x), "relu"), (lambda x: x.relu(), "relu"),
    (lambda x: F.gelu(x), "gelu"), (lambda x: F.gelu(x, approximate="tanh"), "gelu"),
    (lambda x: F.silu(x), "silu"), (lambda x: torch.tanh(x), "tanh"),
    (lambda x: torch.sigmoid(x), "sigmoid"), (lambda x: torch.exp(x), "exp"),
    (lambda x: torch.rsqrt(x), "rsqrt"), (lambda x: torch.pow(x, 2), "pow"),
    (lambda x: x.pow(0.5), "pow"), (lambda x: x ** 3, "pow"), (lambda x: -x, "neg"),
    (lambda x: x.to(torch.float16), "cast"), (lambda x: x.half(), "cast"),
    (lambda x: x.to(dtype=torch.bfloat16), "cast"), (lambda x: x.float(), "cast"),
    (lambda x: F.dropout(x, 0.5, False), "identity"),
    (lambda x: torch.softmax(x, -1), "softmax"), (lambda x: F.softmax(x, dim=1), "softmax"),
    (lambda x: x.softmax(-1), "softmax"), (lambda x: x.mean(-1, keepdim=True), "mean"),
    (lambda x: torch.sum(x, dim=-1, keepdim=True), "sum"),
    (lambda x: torch.amax(x, -1, keepdim=True), "amax"),
    (lambda x: F.layer_norm(x, (45,)), "layer_norm"),
    (lambda x: F.rms_norm(x, (45,), None, 1e-6), "rms_norm"),
]

REJECTED = [
    lambda x: torch.softmax(x, 0), lambda x: x.mean(-1), lambda x: x.sum(0, keepdim=True),
    lambda x: x.pow(2.5), lambda x: torch.add(x, x, alpha=2),
    lambda x: torch.div(x, 3, rounding_mode="floor"), lambda x: F.relu(x, inplace=True),
    lambda x: F.dropout(x, 0.5, True), lambda x: F.layer_norm(x, (37, 45)),
    lambda x: x.to(torch.int32), lambda x: torch.cumsum(x, -1), lambda x: x.to(torch.float64),
]


def _last_call(gm):
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")][-1]


@pytest.mark.parametrize("i", range(len(SPELLINGS)))
def test_every_spelling_is_classified(i):
    fn, name = SPELLINGS[i]
    op = classify(_last_call(traced(fn, X.abs() + 0.5)))
    assert op is not None and op.name == name


@pytest.mark.parametrize("i", range(len(REJECTED)))
def test_arguments_the_kernels_do_not_honour_are_rejected(i):
    gm = traced(REJECTED[i], X.abs() + 0.5)
    assert classify(_last_call(gm)) is None


fused_programs = []  # groups per generated program: the property test must not be vacuous
OPS = [operator.add, operator.mul, torch.relu, torch.tanh, torch.cumsum, "mean", "softmax"]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.integers(0, len(OPS) - 1), st.integers(0, 99), st.integers(0, 99)),
                min_size=1, max_size=14),
       st.lists(st.integers(0, 99), min_size=1, max_size=3))
def test_random_graphs_keep_the_invariants(program, returned):
    """Any mix of fusable ops and eager barriers: groups disjoint, outputs exact, quotient a DAG."""
    def fn(x):
        values = [x]
        for op_i, a, b in program:
            op, lhs, rhs = OPS[op_i], values[a % len(values)], values[b % len(values)]
            if op is torch.cumsum:
                values.append(torch.cumsum(lhs, -1))
            elif op == "mean":
                values.append(lhs.mean(-1, keepdim=True) + rhs)
            elif op == "softmax":
                values.append(torch.softmax(lhs, -1))
            elif op in (torch.relu, torch.tanh):
                values.append(op(lhs))
            else:
                values.append(op(lhs, rhs))
        return tuple(values[r % len(values)] for r in returned)

    gm, p = _groups(fn, torch.randn(4, 6))
    fused_programs.append(len(p.groups))
    seen = set()
    for g in p.groups:
        members = set(g.nodes)
        assert not members & seen
        seen |= members
        assert all(classify(n) is not None for n in g.nodes)
        assert set(g.outputs) == {n for n in g.nodes if any(u not in members for u in n.users)}
    group_of = {n: g.id for g in p.groups for n in g.nodes}
    quotient = nx.DiGraph()
    for n in gm.graph.nodes:
        quotient.add_node(group_of.get(n, n))
        for u in n.users:
            a, b = group_of.get(n, n), group_of.get(u, u)
            if a != b:
                quotient.add_edge(a, b)
    assert nx.is_directed_acyclic_graph(quotient)


def test_random_graphs_did_form_groups():
    if not fused_programs:  # run alone: generate the examples here
        test_random_graphs_keep_the_invariants()
    assert sum(n > 0 for n in fused_programs) > 20 and max(fused_programs) >= 3


inplace_programs = []  # (groups, rewritten, barriers) per program: the test must not be vacuous
INPLACE_OPS = ["add", "mul", "relu", "cumsum", "t", "add_", "relu_inplace", "view_mul_",
               "masked_fill_"]


def _inplace_program(program, returned):
    """A random mix of fusable ops, an eager op, views and in-place writes (into the input,
    into fresh intermediates, into views, into tensors read before)."""
    def fn(x):
        values = [x, x + 0.25]  # the input, and a fresh intermediate to write into
        for op_i, a, b in program:
            # counted from the newest value: hypothesis favours 0, which should not mean x
            op, lhs, rhs = INPLACE_OPS[op_i], values[~(a % len(values))], values[~(b % len(values))]
            if op == "add":
                values.append(lhs + rhs)
            elif op == "mul":
                values.append(lhs * rhs)
            elif op == "relu":
                values.append(torch.relu(lhs))
            elif op == "cumsum":
                values.append(torch.cumsum(lhs, -1))
            elif op == "t":
                values.append(lhs.t())
            elif op == "add_":
                values.append(lhs.add_(rhs * 0.5))
            elif op == "relu_inplace":
                values.append(F.relu(lhs, inplace=True))
            elif op == "view_mul_":
                lhs[:, :2].mul_(1.5)
            else:
                lhs.masked_fill_(lhs > 0.5, -1.0)
        return tuple(values[r % len(values)] for r in returned)
    return fn


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.integers(0, len(INPLACE_OPS) - 1), st.integers(0, 99),
                          st.integers(0, 99)), min_size=1, max_size=12),
       st.lists(st.integers(0, 99), min_size=1, max_size=3))
def test_random_graphs_with_in_place_writes_match_eager(program, returned):
    """Lowered with kernels, every output and the (possibly written) input equal eager's; no
    group spans a barrier. Only exactly rounded ops: the kernels must agree to the bit."""
    fn = _inplace_program(program, returned)
    x = torch.randn(5, 5, generator=torch.Generator().manual_seed(len(program))).to(DEVICE)
    pgm = traced(fn, x.clone())
    p = partition(pgm.graph)
    assert _segments_respected(pgm, p)
    inplace_programs.append((len(p.groups), len(p.functionalized), len(p.barriers)))
    _lowered_matches_eager(fn, x)


def test_random_in_place_programs_were_not_vacuous():
    if not inplace_programs:  # run alone: generate the examples here
        test_random_graphs_with_in_place_writes_match_eager()
    groups, rewritten, barriers = zip(*inplace_programs)
    assert sum(g > 0 for g in groups) > 15
    assert sum(r > 0 for r in rewritten) > 10 and sum(b > 0 for b in barriers) > 10
    assert sum(r > 0 and b > 0 and g > 0 for g, r, b in inplace_programs) > 5




def test_cat_pulls_in_its_operands_producers_only_when_it_holds_all_their_users():
    """A cat operand's producer (its shape, not the group's) is computed in the operand's
    range and never stored: it joins only when every user is in the group."""
    a, b = torch.randn(37, 5), torch.randn(37, 6)
    gm, p = _groups(lambda x, y: torch.cat((torch.neg(x) * 2.0, y), -1).exp(), a, b)
    (g,) = p.groups
    assert _names(g.nodes) == ["neg", "mul", "cat", "exp"] and _names(g.outputs) == ["exp"]
    assert g.kernel_name() == "fused_neg_mul_cat_exp" and g.shape == (37, 11)

    def shared(x, y):
        n = torch.neg(x)
        return torch.cat((n, y), -1).exp(), n * 2.0

    gm, p = _groups(shared, a, b)
    assert sorted(_names(g.nodes) for g in p.groups) == [["cat", "exp"], ["neg", "mul"]]

    def read_by_eager_op(x, y):
        n = torch.neg(x)
        return torch.cat((n, y), -1) * n.sum()

    gm, p = _groups(read_by_eager_op, a, b)
    assert [_names(g.nodes) for g in p.groups] == [["neg"], ["cat", "mul"]]


def test_cat_stays_out_of_row_and_gemm_groups():
    x, v, u = torch.randn(37, 45), torch.randn(8, 45), torch.randn(29, 8)
    gm, p = _groups(lambda a, b: torch.softmax(torch.cat((a, b), -1), -1), x, x)
    assert sorted((g.kind, _names(g.nodes)) for g in p.groups) == [("pointwise", ["cat"]),
                                                                    ("row", ["softmax"])]
    gm, p = _groups(lambda a: torch.cat((LOW_RANK(a, v, u), a), -1) * 2.0, x)
    assert sorted((g.kind, _names(g.nodes)) for g in p.groups) == [
        ("gemm", ["low_rank_linear"]), ("pointwise", ["cat", "mul"])]
