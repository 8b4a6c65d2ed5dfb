"""The shared residual-branch finder on Hugging Face small configs and a plain module."""

import pytest
import torch
import torch.nn as nn
from helpers import hf_model

from effc.compiler.graph_facts import GraphFacts, copy_graph_module
from effc.passes.residual_sites import flatten_token_sizes, residual_sites


def _sites(model, inputs):
    found = []

    def backend(gm, example):
        found.extend(residual_sites(gm, GraphFacts(gm, example)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model.eval(), backend=backend)(**inputs)
    return found


@pytest.mark.parametrize("kind,mlp", [("llama", "model.layers.{}.mlp"),
                                      ("gpt2", "transformer.h.{}.mlp"),
                                      ("bert", "encoder.layer.{}.output"),
                                      ("vit", "layers.{}.mlp")])
def test_every_layer_has_an_attention_and_an_mlp_site(kind, mlp):
    sites = _sites(*hf_model(kind))
    assert [s.kind for s in sites] == ["attention", "mlp"] * 2
    assert [s.layer for s in sites] == [0, 0, 1, 1]
    assert [s.name for s in sites if s.kind == "mlp"] == [mlp.format(0), mlp.format(1)]
    assert all(s.why == "" for s in sites if s.kind == "mlp")
    for s in sites:  # the branch ends at the update and never contains the stream
        assert s.branch[-1] is s.update and s.stream not in s.branch


def test_a_decoders_attention_branch_says_its_keys_leave_the_graph():
    sites = _sites(*hf_model("llama"))
    attn = [s for s in sites if s.kind == "attention"]
    assert attn and all("used outside it" in s.why for s in attn)


class _Gelu(nn.Module):  # x + c * x**3 inside GELU's tanh form is not a residual branch
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        y = self.fc(x)
        return y + 0.044715 * y ** 3 + x  # the only residual: x + (...)


def test_adds_without_a_weight_in_the_branch_are_not_sites():
    sites = _sites(_Gelu(), {"x": torch.randn(2, 5, 8)})
    assert len(sites) == 1 and sites[0].weights == ["fc.weight", "fc.bias"]


def test_token_sizes_in_branch_views_become_free():
    def backend(gm, example):
        g = copy_graph_module(gm)
        views = [n for n in g.graph.nodes if n.op == "call_method" and n.target == "view"]
        changed = [flatten_token_sizes(n, (2, 9)) for n in views]
        assert any(changed)
        for n, c in zip(views, changed):
            if c:
                sizes = n.args[1]
                assert -1 in sizes and 2 not in sizes[:1]
        return gm.forward

    model, inputs = hf_model("gpt2")  # Conv1D views to (B, T, nf) and (-1, nx)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model.eval(), backend=backend)(**inputs)


class _ConvResidual(nn.Module):  # MobileNetV2's inverted residual, in short
    def __init__(self):
        super().__init__()
        self.expand, self.depthwise = nn.Conv2d(8, 16, 1), nn.Conv2d(16, 16, 3, padding=1)
        self.project = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        return x + self.project(torch.relu(self.depthwise(torch.relu(self.expand(x)))))


def test_a_convolutional_branch_is_found_and_says_why_it_cannot_be_routed():
    (site,) = _sites(_ConvResidual(), {"x": torch.randn(2, 8, 6, 6)})
    assert site.weights[0] == "expand.weight" and "holds a convolution" in site.why



@pytest.mark.parametrize("replacement", ["unequal_attention", "select_attention"])
def test_an_attention_an_earlier_pass_replaced_is_still_an_attention_site(replacement):
    """kv_proj puts unequal_attention or effc.select_attention in SDPA's place: the block
    still mixes tokens, so it must not be taken for an MLP (routing it as one would mix the
    rows of different tokens and sequences)."""
    import effc.kernels.select_attention  # noqa: F401  (registers the op)
    from effc.passes.attention_sites import SDPA, unequal_attention

    target = unequal_attention if replacement == "unequal_attention" else \
        torch.ops.effc.select_attention.default
    found = []

    def backend(gm, example):
        g = copy_graph_module(gm)
        for n in g.graph.nodes:
            if n.op == "call_function" and n.target in SDPA:
                n.target = target
                n.args, n.kwargs = n.args[:3], {}
                if replacement == "select_attention":  # scale, top_k, initial, recent
                    n.args = n.args + (0.5, 4, 1, 2)
        g.recompile()
        found.extend(residual_sites(g, GraphFacts(g, example)))
        return gm.forward

    torch._dynamo.reset()
    model, inputs = hf_model("bert")
    with torch.no_grad():
        torch.compile(model.eval(), backend=backend)(**inputs)
    assert [s.kind for s in found] == ["attention", "mlp"] * 2
