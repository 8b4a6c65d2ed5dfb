"""Graph facts: placeholders classified and named like model.named_parameters()."""

import pytest
import torch
from helpers import hf_model

import effc

from effc.compiler.graph_facts import (GraphFacts, add_constant, copy_graph_module, fqn_from_source,
                                       graph_device, is_static, matches, node_shape)


@pytest.mark.parametrize("source,expected", [
    ("L['self']._modules['model']._modules['layers']._modules['3']._modules['mlp']"
     "._modules['down_proj']._parameters['weight']", "model.layers.3.mlp.down_proj.weight"),
    ("L['fn']._modules['0']._parameters['weight']", "0.weight"),
    ("L['self']._modules['rotary_emb']._buffers['inv_freq']", "rotary_emb.inv_freq"),
    ("G['encoder']._modules['fc']._parameters['bias']", "encoder.fc.bias"),
    ("L['self'].blocks[2].weight", "blocks.2.weight"),
    ("L['s']._modules['fc1']._parameters['weight']", "fc1.weight"),  # forward(s, x)
    # transformers 5 wraps forward as wrapper(*args, **kwargs): self is args[0]
    ("L['args'][0]._modules['model']._modules['norm']._parameters['weight']", "model.norm.weight"),
    ("L['kwargs']['model']._modules['fc']._parameters['weight']", "fc.weight"),  # f(**kw)
    ("L['enc']._modules['0']._parameters['bias']", "0.bias"),  # a closure variable
    ("L['model']._parameters['weight']", "weight"),  # f(x, model=lin)
    # a module's path in node.meta["nn_module_stack"]
    ("L['args'][0].model.layers.0.self_attn", "model.layers.0.self_attn"),
    ("something odd", "something odd"),
])
def test_fqn_from_source(source, expected):
    assert fqn_from_source(source) == expected


def _capture(model, *args, dynamic=None, **kwargs):
    """The graph and facts as the backend sees them (Dynamo strips some meta afterwards)."""
    seen = {}

    def backend(gm, example_inputs):
        seen["gm"], seen["facts"] = gm, GraphFacts(gm, example_inputs)
        seen.setdefault("all", []).append(seen["facts"])
        seen["copy"] = copy_graph_module(gm)
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend, dynamic=dynamic)(*args, **kwargs)
    return seen


ARCHITECTURES = ["bert", "gpt2", "llama", "vit", "t5", "whisper", "mixtral", "falcon"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_every_architecture_names_weights_like_named_parameters(kind):
    """Whatever root Dynamo's sources start from (transformers 5 wraps some forwards, so
    theirs start at L['args'][0]), every lifted weight is named as named_parameters() names
    it, and effc's report names its sites the same way."""
    model, inputs = hf_model(kind)
    model.eval()
    seen = _capture(model, **inputs)
    facts = seen["all"]  # every graph (transformers 4's Mixtral breaks its graph)
    # tied weights (T5's shared embedding) have several names; named_parameters() lists the
    # first only, remove_duplicate=False lists each
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    for gi in (gi for f in facts for gi in f.inputs):
        if gi.kind == "parameter":
            assert params.get(gi.name) is gi.value, gi.name
        elif gi.kind == "buffer":
            assert gi.name in buffers, gi.name
    assert sum(gi.kind == "parameter" for f in facts for gi in f.inputs) > 4

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="effc", options={"low_rank": {"rank": 8,
                                                                          "min_saving": 0.0}})
    with torch.no_grad():
        compiled(**inputs)
    names = [row.site for row in effc.report().sites]
    assert names and set(names) <= set(params), set(names) - set(params)


def test_two_modules_with_equal_paths_keep_names_of_their_own():
    enc = torch.nn.Sequential(torch.nn.Linear(4, 4))
    dec = torch.nn.Sequential(torch.nn.Linear(4, 4))

    def f(x):
        return dec(enc(x))

    seen = _capture(f, torch.randn(2, 4))
    names = {gi.name for gi in seen["facts"].inputs if gi.kind == "parameter"}
    assert names == {"enc.0.weight", "enc.0.bias", "dec.0.weight", "dec.0.bias"}


def test_a_model_passed_as_keyword_is_named_from_its_own_root():
    lin = torch.nn.Linear(4, 3)

    def f(*args, **kwargs):
        return kwargs["net"](args[0])

    seen = _capture(f, torch.randn(2, 4), net=lin)
    assert {gi.name for gi in seen["facts"].inputs if gi.kind == "parameter"} == {"weight", "bias"}


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


class _Inner(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.register_buffer("scale", torch.ones(4))

    def forward(self, x):
        x = self.fc(x)
        torch._dynamo.graph_break()  # Dynamo then compiles the rest of this frame on its own
        return self.fc(x) * self.scale


class _Outer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block = torch.nn.Sequential(_Inner())
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.block(x))


def test_a_graph_break_inside_a_submodule_keeps_the_full_names():
    """The graph after the break starts at the submodule (L['self'] is _Inner), yet its
    weights are named as the called model names them."""
    model = _Outer()
    seen = {"all": []}

    def backend(gm, example_inputs):
        seen["all"].append(GraphFacts(gm, example_inputs))
        seen.setdefault("sources_only", []).append(GraphFacts(gm, example_inputs, root=None))
        return gm.forward

    torch.compile(model, backend=backend)(torch.randn(3, 4))

    def weights(facts):
        return {gi.name for f in facts for gi in f.inputs if gi.kind in ("parameter", "buffer")}

    names = weights(seen["all"])
    assert len(seen["all"]) >= 2
    assert names <= set(dict(model.named_parameters())) | set(dict(model.named_buffers()))
    assert "block.0.scale" in names and "block.0.fc.weight" in names
    assert "scale" in weights(seen["sources_only"])  # what source paths alone would say


def test_remove_dead_code_keeps_in_place_writes_without_users():
    import torch.fx as fx

    from effc.compiler.graph_facts import remove_dead_code

    class Writes(torch.nn.Module):
        def forward(self, buf, x, i):
            buf.index_copy_(0, i, x)   # no user: the caller reads buf afterwards
            torch.add(x, 2)            # dead
            return x + 1

    gm = fx.symbolic_trace(Writes())
    remove_dead_code(gm.graph)
    gm.recompile()
    ops = [str(n.target) for n in gm.graph.nodes if n.op in ("call_method", "call_function")]
    assert "index_copy_" in ops and not any("torch.add" in o or "add" == o for o in ops)
    assert len(ops) == 2  # index_copy_ and x + 1
    buf = torch.zeros(3, 2)
    gm(buf, torch.ones(2, 2), torch.tensor([1, 2]))
    assert buf.sum().item() == 4.0


def test_graph_device_is_the_accelerator_even_when_a_cpu_tensor_comes_first():
    """A GPU model's Dynamo graph can take small CPU tensors as inputs, first among them; the
    constants passes add (token_skip's routers) must go to the accelerator all the same (on an
    H200 they went to the CPU and every routed site failed). "meta" stands in for the GPU."""
    cpu, accel = torch.zeros(2), torch.zeros(2, device="meta")
    assert graph_device([3, cpu, accel, torch.zeros(1)]) == torch.device("meta")
    assert graph_device([cpu, 3]) == torch.device("cpu")
    assert graph_device([]) == torch.device("cpu")
