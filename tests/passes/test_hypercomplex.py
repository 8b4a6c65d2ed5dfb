"""hypercomplex pass: trained PHM/PHC models rewritten exactly, budgeted fits of dense weights."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import first_tensor, hf_model

import effc
from benchmarks.models.phm import PHMLinear as HyperNetsPHMLinear
from effc.compiler.pass_manager import Instrument

PHM = torch.ops.effc.phm_linear.default
PHC = torch.ops.effc.phm_conv.default


class KronLoopPHMLinear(HyperNetsPHMLinear):
    """The same layer with torch.kron in a Python loop (phc-gnn's spelling)."""

    def forward(self, x):
        weight = torch.kron(self.a[0], self.s[0])
        for i in range(1, self.a.shape[0]):
            weight = weight + torch.kron(self.a[i], self.s[i])
        return F.linear(x, weight, self.bias)


class PHCConv(nn.Module):
    """A PHC conv: the weight sum_i kron(a_i, s_i) over (out, in) channels, by einsum."""

    def __init__(self, n, cin, cout, k=3):
        super().__init__()
        self.a = nn.Parameter(torch.randn(n, n, n) / n)
        self.s = nn.Parameter(torch.randn(n, cout // n, cin // n, k, k) / (cin * k))
        self.bias = nn.Parameter(torch.zeros(cout))

    def forward(self, x):
        n, p, q = self.a.shape[0], self.s.shape[1], self.s.shape[2]
        w = torch.einsum("tij,tabkl->iajbkl", self.a, self.s).reshape(n * p, n * q, 3, 3)
        return F.conv2d(x, w, self.bias, padding=1)


class DigitsPHM(nn.Module):
    def __init__(self, layer=HyperNetsPHMLinear, n=4):
        super().__init__()
        self.l1, self.l2 = layer(n, 64, 128), layer(n, 128, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(torch.relu(self.l2(torch.relu(self.l1(x)))))


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16
    return x[:1400], torch.tensor(d.target[:1400]), x[1400:], torch.tensor(d.target[1400:])


def _train(model, steps=80):
    torch.manual_seed(0)
    xtr, ytr, xte, yte = _digits()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(xtr), ytr).backward()
        opt.step()
    return model.eval(), xte, yte


class _Ops(Instrument):
    """The call targets of the graph after all passes."""

    def __init__(self):
        self.targets = []

    def on_graph_end(self, gm, ctx, *rest):
        self.targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _compile(model, x, **options):
    torch._dynamo.reset()
    effc.reset()
    ops = _Ops()
    compiled = torch.compile(model, backend="effc", options={**options, "instruments": [ops]})
    with torch.no_grad():
        out = compiled(x)
    return compiled, out, effc.report(), ops.targets


@pytest.mark.parametrize("layer", [HyperNetsPHMLinear, KronLoopPHMLinear])
def test_trained_phm_model_becomes_phm_ops_exactly(layer):
    torch.manual_seed(0)
    model, xte, yte = _train(DigitsPHM(layer))
    with torch.no_grad():
        ref = model(xte)
    assert (ref.argmax(1) == yte).float().mean() > 0.85  # it did learn
    _, out, rep, targets = _compile(model, xte, hypercomplex=True)
    rows = {s.site: s for s in rep.sites}
    assert rows["l1.<a,s>"].decision == rows["l2.<a,s>"].decision == "rewritten"
    assert rows["l1.<a,s>"].details["n"] == 4 and rows["l1.<a,s>"].details["terms"] <= 4
    assert rows["l1.<a,s>"].params_after == 4 * (16 + 32 * 16) < rows["l1.<a,s>"].params_before
    assert "head.weight" in rows and rows["head.weight"].decision == "skipped"
    assert targets.count(PHM) == 2
    # the dense W is never built: no kron, einsum, broadcast product or sum is left
    assert not {torch.kron, torch.sum, torch.einsum, torch.mul} & set(targets), targets
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(out.argmax(1), ref.argmax(1))


def test_phc_conv_becomes_a_phm_conv_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(PHCConv(4, 8, 16), nn.ReLU(), PHCConv(4, 16, 8)).eval()
    x = torch.randn(2, 8, 11, 9)
    with torch.no_grad():
        ref = model(x)
    _, out, rep, targets = _compile(model, x, hypercomplex=True)
    assert [s.decision for s in rep.sites] == ["rewritten", "rewritten"]
    assert targets.count(PHC) == 2 and torch.einsum not in targets
    assert torch.allclose(out, ref, atol=1e-5)


def test_passes_off_is_bit_exact_and_changed_factors_are_rederived():
    torch.manual_seed(0)
    model = copy.deepcopy(_train(DigitsPHM(), steps=20)[0])
    x = _digits()[2]
    with torch.no_grad():
        ref = model(x)
    assert torch.equal(_compile(model, x)[1], ref)
    compiled, before, _, _ = _compile(model, x, hypercomplex=True)
    with torch.no_grad():
        model.l1.s.mul_(0.5)
        after, fresh = compiled(x), model(x)
    assert effc.report().graphs[0].rederivations == 1
    assert not torch.allclose(before, after, atol=1e-3)
    assert torch.allclose(after, fresh, atol=1e-5)


def test_skip_reasons_name_the_number():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.odd = nn.Linear(30, 22)            # n = 4 divides neither
            self.dense = nn.Linear(64, 64)          # random: far from a Kronecker sum
            self.w = nn.Parameter(torch.randn(64, 64))
            self.mask = nn.Parameter(torch.rand(64, 64) > 0.5, requires_grad=False)

        def forward(self, x):
            y = self.dense(torch.relu(x @ torch.ones(30, 64) / 30))
            y = F.linear(y, self.w * self.mask)   # computed from weights, not a Kronecker sum
            return self.odd(y[:, :30])

    torch.manual_seed(0)
    rows = {s.site: s for s in _compile(Mixed().eval(), torch.randn(3, 30),
                                        hypercomplex=True)[2].sites}
    assert "n=4 does not divide" in rows["odd.weight"].reason
    assert "over the default bound max_error=0.05" in rows["dense.weight"].reason
    assert "relative error at the most profitable" in rows["dense.weight"].reason
    assert "not a sum of at most n Kronecker products" in rows["<mask,w>"].reason
    assert all(r.decision == "skipped" for r in rows.values())


def _spectral_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64), nn.ReLU(),
                         nn.Linear(64, 32)).eval()


def test_fixed_terms_rewrites_every_site_with_the_formula_parameters():
    model, x = _spectral_mlp(), torch.randn(7, 64)
    _, out, rep, targets = _compile(model, x, hypercomplex={"terms": 2, "n": 4})
    rows = [s for s in rep.sites if s.decision == "rewritten"]
    assert len(rows) == 3 and targets.count(PHM) == 3
    assert [r.params_after for r in rows] == [2 * (16 + 24 * 16), 2 * (16 + 16 * 24),
                                              2 * (16 + 8 * 16)]
    for r in rows:  # the reported weight error is the fit's
        assert 0 < r.error["weight_rel_fro"] < 1


def test_max_error_takes_the_fewest_terms_within_the_bound():
    model, x = _spectral_mlp(), torch.randn(7, 64)
    _, _, rep, _ = _compile(model, x, hypercomplex={"max_error": 0.8, "n": 2})
    rewritten = [s for s in rep.sites if s.decision == "rewritten"]
    assert rewritten
    for s in rewritten:
        t = s.details["terms"]
        curve = s.details["weight_rel_fro_at_terms"]
        assert s.error["weight_rel_fro"] <= 0.8 + 1e-9
        assert t == 1 or curve[str(t - 1)] > 0.8


def test_param_budget_with_calibration_keeps_the_budget_and_reports_candidates():
    model = _spectral_mlp()
    batches = [torch.randn(32, 64) for _ in range(4)]
    calib = effc.calibrate(model, batches, progress=False, samples=2)
    _, _, rep, _ = _compile(model, batches[0], hypercomplex={"param_budget": 0.5, "n": 2,
                                                             "output_layers": True},
                            calibration=calib)
    sites = rep.sites
    total = sum(s.params_before for s in sites)
    assert sum(s.params_after for s in sites) <= 0.5 * total
    note = next(n for n in rep.graphs[0].notes if n.startswith("hypercomplex param_budget"))
    assert "end-to-end sensitivity measured" in note and "were not fitted to" in note
    for s in sites:
        assert s.details["sensitivity_measured"] and "dense" in s.details["candidates"]


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="hypercomplex.n"):
        effc.Config.from_options({"hypercomplex": {"n": 5}}, env={})
    with pytest.raises(ValueError, match="one rule"):
        effc.Config.from_options({"hypercomplex": {"terms": 2, "max_error": 0.1}}, env={})
    assert effc.HypercomplexConfig(n=8).n == 8


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_hugging_face_models_compile_with_the_pass(kind):
    model, inputs = hf_model(kind)
    model.eval()
    with torch.no_grad():
        ref = first_tensor(model(**inputs))
    torch._dynamo.reset()
    effc.reset()
    compiled = torch.compile(model, backend="effc", options={"hypercomplex": {"terms": 4}})
    with torch.no_grad():
        out = first_tensor(compiled(**inputs))
    assert torch.isfinite(out).all() and out.shape == ref.shape
    rewritten = [s for s in effc.report().sites if s.decision == "rewritten"]
    assert len(rewritten) >= 6
    torch._dynamo.reset()
    effc.reset()
    compiled = torch.compile(model, backend="effc", options={"hypercomplex": True})
    with torch.no_grad():
        out = first_tensor(compiled(**inputs))
    for s in effc.report().sites:  # the default keeps every rewritten site within its bound
        assert s.decision == "skipped" or s.error["weight_rel_fro"] <= 0.05


class StoringPHMLinear(HyperNetsPHMLinear):
    """HyperNets' exact forward: it also stores W on the module (`self.weight = ...`)."""

    def forward(self, x):
        self.weight = torch.sum(self.kronecker_product(self.a, self.s), dim=0)
        x = x.type(dtype=self.weight.type())
        return F.linear(x, weight=self.weight, bias=self.bias)


def test_a_layer_that_stores_its_weight_is_rewritten_and_the_report_says_w_is_still_built():
    torch.manual_seed(0)
    model = nn.Sequential(StoringPHMLinear(4, 64, 128), nn.ReLU(), StoringPHMLinear(4, 128, 64))
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref = model.eval()(x)
    _, out, rep, targets = _compile(model, x, hypercomplex=True)
    assert [s.decision for s in rep.sites] == ["rewritten", "rewritten"]
    assert all("W is still computed at run time" in s.reason for s in rep.sites)
    assert targets.count(PHM) == 2 and torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(model[0].weight, torch.sum(model[0].kronecker_product(
        model[0].a, model[0].s), dim=0))   # the attribute the model stores is still right


def test_calibrated_fits_lower_the_output_error_on_correlated_inputs():
    model = _spectral_mlp()
    scale = torch.logspace(-2, 1, 64)
    batches = [torch.randn(64, 64) * scale for _ in range(4)]
    calib = effc.calibrate(model, batches, progress=False)
    errors = {}
    for whiten in (False, True):
        _, _, rep, _ = _compile(model, batches[0], calibration=calib,
                                hypercomplex={"terms": 3, "n": 2, "whiten": whiten})
        row = next(s for s in rep.sites if s.site == "0.weight")
        errors[whiten] = row.error["out_rel_fro"]
        assert ("whitened" in row.reason) == whiten
    assert errors[True] < 0.9 * errors[False], errors
