"""Graph facts: placeholders classified and named like model.named_parameters()."""

import pytest
import torch
from helpers import hf_model

from effc.compiler.graph_facts import (GraphFacts, add_constant, copy_graph_module, fqn_from_source,
                                       is_static, matches, node_shape)


@pytest.mark.parametrize("source,expected", [
    ("L['self']._modules['model']._modules['layers']._modules['3']._modules['mlp']"
     "._modules['down_proj']._parameters['weight']", "model.layers.3.mlp.down_proj.weight"),
    ("L['fn']._modules['0']._parameters['weight']", "0.weight"),
    ("L['self']._modules['rotary_emb']._buffers['inv_freq']", "rotary_emb.inv_freq"),
    ("G['encoder']._modules['fc']._parameters['bias']", "encoder.fc.bias"),
    ("L['self'].blocks[2].weight", "blocks.2.weight"),
    ("L['s']._modules['fc1']._parameters['weight']", "fc1.weight"),  # forward(s, x)
    ("something odd", "something odd"),
])
def test_fqn_from_source(source, expected):
    assert fqn_from_source(source) == expected


def _capture(model, *args, dynamic=None, **kwargs):
    """The graph and facts as the backend sees them (Dynamo strips some meta afterwards)."""
    seen = {}

    def backend(gm, example_inputs):
        seen["gm"], seen["facts"] = gm, GraphFacts(gm, example_inputs)
        seen["copy"] = copy_graph_module(gm)
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend, dynamic=dynamic)(*args, **kwargs)
    return seen


def test_llama_weights_named_like_named_parameters():
    model, inputs = hf_model("llama")
    seen = _capture(model.eval(), **inputs)
    gm, facts = seen["gm"], seen["facts"]
    params = dict(model.named_parameters())
    named = {gi.name: gi for gi in facts.inputs if gi.kind == "parameter"}
    assert set(named) == set(params)
    for name, gi in named.items():
        assert gi.value is params[name]
    assert [gi.name for gi in facts.inputs if gi.kind == "buffer"] == ["model.rotary_emb.inv_freq"]
    assert [gi.kind for gi in facts.inputs].count("input") == 1
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder"
                       and facts.weight_name(n) == "model.layers.1.mlp.down_proj.weight")
    assert facts.weight_value(placeholder) is params["model.layers.1.mlp.down_proj.weight"]
    assert facts.describe()["parameter_elements"] == sum(p.numel() for p in params.values())


def test_dynamic_shapes_give_symint_inputs_and_symbolic_sizes():
    lin = torch.nn.Linear(8, 4)
    seen = _capture(lin, torch.randn(5, 8), dynamic=True)
    gm, facts = seen["gm"], seen["facts"]
    assert any(gi.kind == "symint" for gi in facts.inputs)
    x = next(n for n in gm.graph.nodes if n.op == "placeholder" and facts.input_of(n).kind == "input")
    rows, cols = node_shape(x)
    assert not is_static(rows) and is_static(cols) and cols == 8


@pytest.mark.parametrize("name,include,exclude,expected", [
    ("model.layers.0.mlp.down_proj.weight", [], [], True),
    ("model.layers.0.mlp.down_proj.weight", ["*.mlp.*"], [], True),
    ("model.layers.0.mlp.down_proj.weight", ["model.layers.0.mlp"], [], True),
    ("model.layers.0.mlp.down_proj.weight", ["*.self_attn.*"], [], False),
    ("model.layers.0.mlp.down_proj.weight", [], ["*down_proj*"], False),
    ("model.layers.0.mlp.down_proj.weight", ["*.mlp.*"], ["model.layers.0"], False),
    ("lm_head.weight", ["lm_head"], [], True),
    ("lm_head_2.weight", ["lm_head"], [], False),
])
def test_glob_filters(name, include, exclude, expected):
    assert matches(name, include, exclude) is expected


def test_copy_shares_tensors_and_add_constant_registers_a_buffer():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    seen = _capture(model, torch.randn(2, 4))
    gm, clone = seen["gm"], seen["copy"]
    assert [n.name for n in clone.graph.nodes] == [n.name for n in gm.graph.nodes]
    assert clone.graph is not gm.graph
    value = torch.randn(3, 4)
    node = add_constant(clone, value, "0.weight/derived")
    assert node.op == "get_attr" and getattr(clone, node.target).data_ptr() == value.data_ptr()
    second = add_constant(clone, value, "0.weight/derived")
    assert second.target != node.target
    assert all(n.op != "get_attr" for n in gm.graph.nodes)  # the original is untouched
