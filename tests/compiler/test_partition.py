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
from lowering_helpers import LOW_RANK, traced

from effc.compiler.ops import classify
from effc.compiler.partition import partition


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


def test_a_graph_that_writes_in_place_is_left_alone():
    def fn(x):
        y = x * 2.0
        y.add_(1.0)
        return torch.relu(y)

    gm, p = _groups(fn, X)
    assert p.groups == [] and "in place" in p.refused


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
