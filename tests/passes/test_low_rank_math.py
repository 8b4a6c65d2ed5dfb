"""low_rank math: randomized (top-r) factorization against full SVD, exact error reporting,
and which method the pass picks."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import effc
import effc.passes.low_rank_math as lrm
from effc.passes.low_rank_math import factorize, output_error, svd_method, weight_error

CHECKPOINT = Path(__file__).parents[2] / "benchmarks" / "models" / "checkpoints" / "text_llama.pt"


def _decaying(m, n, seed=0, noise=0.02):
    """A weight with a realistic spectrum: power-law decay (s_i ~ i^-0.5) plus a noise floor."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    p = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    q = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    s = torch.arange(1, k + 1, dtype=torch.float64) ** -0.5
    w = (p * s) @ q.T + noise * torch.randn(m, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    return w.float()


def _correlated_moment(n, seed=1):
    """E[x x^T] of strongly correlated inputs, as activations of a trained layer have."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -2, n,
                                                                               dtype=torch.float64)
    return mix @ mix.T / n + 1e-4 * torch.eye(n, dtype=torch.float64)


def _weight_err(w, u, v):
    w = w.double()
    return ((w - u @ v).norm() / w.norm()).item()


def _out_err(w, u, v, moment):
    w, L = w.double(), torch.linalg.cholesky(moment)
    return (((w - u @ v) @ L).norm() / (w @ L).norm()).item()


@pytest.fixture(scope="module")
def weight():
    return _decaying(1024, 1536)


def test_randomized_weight_error_is_within_one_percent_of_full_svd(weight):
    r = 256
    full = factorize(weight, rank=r, method="full")
    rand = factorize(weight, rank=r, method="randomized")
    assert (full.method, rand.method) == ("full", "randomized")
    best, got = _weight_err(weight, *full.factors(r)), _weight_err(weight, *rand.factors(r))
    assert best <= got <= 1.01 * best, (got, best)  # SVD is optimal (Eckart-Young)


def test_randomized_whitened_output_error_is_within_one_percent_of_full_svd(weight):
    r, moment = 256, _correlated_moment(1536)
    full = factorize(weight, moment, rank=r, method="full")
    rand = factorize(weight, moment, rank=r, method="randomized")
    assert full.whitened and rand.whitened
    best = _out_err(weight, *full.factors(r), moment)
    got = _out_err(weight, *rand.factors(r), moment)
    assert best <= got * (1 + 1e-9) and got <= 1.01 * best, (got, best)


@pytest.mark.parametrize("whitened", [False, True])
def test_reported_tail_error_is_the_error_of_the_truncated_factors(weight, whitened):
    r = 256
    moment = _correlated_moment(1536) if whitened else None
    fac = factorize(weight, moment, rank=r, method="randomized")
    err = fac.tail_rel_error()
    # only the top r values exist: the curve stops at r and is not zero there
    assert fac.known_rank == r and not fac.complete and err.shape == (r + 1,)
    assert err[0] == pytest.approx(1.0, abs=1e-12) and err[r] > 0.05
    assert torch.all(err[:-1] >= err[1:])
    for j in (8, 100, r):  # every prefix is exact, from ||A||^2 - sum of kept s_i^2
        u, v = fac.factors(j)
        got = _out_err(weight, u, v, moment) if whitened else _weight_err(weight, u, v)
        assert err[j].item() == pytest.approx(got, rel=1e-9)
    with pytest.raises(ValueError, match="holds 256"):
        fac.factors(r + 8)


def test_trained_llama_weights_randomized_close_to_svd():
    """Real spectra (the byte-level Llama of benchmarks/models) at a quarter of full rank."""
    state = torch.load(CHECKPOINT, weights_only=True)
    mats = [w for k, w in state.items() if w.dim() == 2 and "embed" not in k]
    assert len(mats) >= 28
    for w in mats:
        r = min(w.shape) // 4
        best = factorize(w, rank=r, method="full").tail_rel_error()[r].item()
        rand = factorize(w, rank=r, method="randomized")
        got = _weight_err(w, *rand.factors(r))
        assert rand.tail_rel_error()[r].item() == pytest.approx(got, rel=1e-9)
        assert best <= got <= 1.01 * best, (tuple(w.shape), got, best)


def test_randomized_is_deterministic(weight):
    a = factorize(weight, rank=64, method="randomized")
    b = factorize(weight, rank=64, method="randomized")
    assert torch.equal(a.u, b.u) and torch.equal(a.v, b.v)


def test_svd_method_auto_picks_randomized_only_for_large_small_fixed_ranks():
    assert svd_method(4096, 11008, 1024) == "randomized"
    assert svd_method(4096, 4096, 1025) == "full"     # above a quarter of full rank
    assert svd_method(1000, 4096, 200) == "full"      # below the size threshold
    assert svd_method(4096, 4096, None) == "full"     # rank not known in advance
    assert svd_method(64, 64, 8, "randomized") == "randomized"
    assert svd_method(4096, 4096, 64, "full") == "full"
    with pytest.raises(ValueError, match="auto, full, randomized"):
        svd_method(64, 64, 8, "lanczos")
    with pytest.raises(ValueError, match="rank in advance"):
        svd_method(64, 64, None, "randomized")


class Funnel(nn.Module):
    """A 128 x 256 weight (above a lowered threshold of 128) and a 64 x 128 one (below)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(256, 128, bias=False), nn.Linear(128, 64, bias=False)

    def forward(self, x):
        return self.b(self.a(x))


def _report(model, x, **low_rank):
    torch._dynamo.reset()
    effc.reset()
    with torch.no_grad():
        torch.compile(model, backend="effc", options={"low_rank": low_rank})(x)
    return {s.site: s for s in effc.report().sites}


@pytest.mark.parametrize("options,methods", [
    ({"rank_ratio": 0.25}, {"a.weight": "randomized", "b.weight": "full"}),
    ({"rank": 32}, {"a.weight": "randomized", "b.weight": "full"}),   # 32 > 64 / 4 for b
    ({"rank_ratio": 0.5}, {"a.weight": "full", "b.weight": "full"}),  # not a small fraction
    ({"energy": 0.8}, {"a.weight": "full", "b.weight": "full"}),      # needs the spectrum
    ({"rank_ratio": 0.25, "svd": "full"}, {"a.weight": "full", "b.weight": "full"}),
    ({"rank_ratio": 0.25, "svd": "randomized"}, {"a.weight": "randomized",
                                                 "b.weight": "randomized"}),
])
def test_pass_reports_the_method_auto_chose(monkeypatch, options, methods):
    monkeypatch.setattr(lrm, "RANDOMIZED_MIN_DIM", 128)
    torch.manual_seed(0)
    model = Funnel().eval()
    with torch.no_grad():
        model.a.weight.copy_(_decaying(128, 256, seed=2))
        model.b.weight.copy_(_decaying(64, 128, seed=3))
    rows = _report(model, torch.randn(4, 256), **options)
    for name, method in methods.items():
        row = rows[name]
        assert row.decision == "rewritten", (name, row.reason)
        assert row.details["svd"] == method
        rank = row.details["rank"]
        curve = row.details["weight_rel_fro_at_rank"]
        assert curve[str(rank)] == pytest.approx(row.error["weight_rel_fro"], rel=1e-5)
        if method == "randomized":
            assert row.details["error_known_up_to_rank"] == rank
            assert all(int(r) <= rank for r in curve)  # nothing invented beyond the top r
            assert f"randomized SVD (top {rank} factors only)" in row.reason
        else:
            assert "error_known_up_to_rank" not in row.details
            assert "randomized" not in row.reason


def test_whitened_randomized_site_reports_the_measured_output_error(monkeypatch):
    from effc.compiler.calibration import Calibration

    monkeypatch.setattr(lrm, "RANDOMIZED_MIN_DIM", 128)
    model = Funnel().eval()
    with torch.no_grad():
        model.a.weight.copy_(_decaying(128, 256, seed=2))
    cal = Calibration.from_moments({"a.weight": _correlated_moment(256),
                                    "b.weight": _correlated_moment(128, seed=4)})
    torch._dynamo.reset()
    effc.reset()
    with torch.no_grad():
        torch.compile(model, backend="effc", options={"low_rank": {"rank_ratio": 0.25},
                                                      "calibration": cal})(torch.randn(4, 256))
    row = {s.site: s for s in effc.report().sites}["a.weight"]
    assert row.details["svd"] == "randomized" and row.details["rank"] == 32
    assert row.reason == "whitened SVD (calibration); randomized SVD (top 32 factors only)"
    # output_error measures from C alone; the curve comes from ||M L||^2 - sum of kept s_i^2
    assert row.details["out_rel_fro_at_rank"]["32"] == pytest.approx(row.error["out_rel_fro"],
                                                                     rel=1e-5)


@pytest.mark.parametrize("rule", [{"energy": 0.9}, {"max_error": 0.2}, {"param_budget": 0.3}])
def test_randomized_with_a_spectrum_rule_is_rejected(rule):
    with pytest.raises(ValueError, match="'low_rank.svd'.*needs a fixed rank rule"):
        effc.Config.from_options({"low_rank": {**rule, "svd": "randomized"}}, env={})


def test_bad_svd_value_names_the_key_and_values():
    with pytest.raises(ValueError, match=r"low_rank\.svd.*'auto', 'full', 'randomized'"):
        effc.Config.from_options({"low_rank": {"svd": "lanczos"}}, env={})


def test_errors_of_a_whole_approximation_equal_those_of_its_factors():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(12, 9, generator=g, dtype=torch.float64)
    u, v = torch.randn(12, 3, generator=g, dtype=torch.float64), torch.randn(3, 9, generator=g,
                                                                             dtype=torch.float64)
    x = torch.randn(50, 9, generator=g, dtype=torch.float64)
    c = x.T @ x / 50
    for key, value in weight_error(w, u @ v).items():
        assert value == pytest.approx(weight_error(w, u, v)[key], rel=1e-9)
    for key, value in output_error(w, u @ v, None, c).items():
        assert value == pytest.approx(output_error(w, u, v, c)[key], rel=1e-9)


def test_shrink_keeps_the_trace_and_pulls_toward_the_identity():
    c = _correlated_moment(32)
    assert lrm.shrink(c, 0.0) is c
    half = lrm.shrink(c, 0.5)
    assert half.trace().item() == pytest.approx(c.trace().item(), rel=1e-12)
    off = ~torch.eye(32, dtype=torch.bool)
    torch.testing.assert_close(half[off], 0.5 * c[off])
    full = lrm.shrink(c, 1.0)
    torch.testing.assert_close(full, c.diagonal().mean() * torch.eye(32, dtype=c.dtype))


def test_softmax_fisher_is_the_mean_kl_hessian_scaled_to_trace_m():
    torch.manual_seed(0)
    z = torch.randn(50, 7, dtype=torch.float64) * 3
    f = lrm.softmax_fisher(z, 0.0)
    p = z.softmax(-1)
    # the Hessian of KL(p || softmax(z + d)) in d at d = 0 is diag(p) - p p^T, per row
    ref = sum(torch.diag(r) - torch.outer(r, r) for r in p) / len(p)
    torch.testing.assert_close(f, ref * 7 / ref.trace())
    assert f.trace().item() == pytest.approx(7.0)
    # a 0.3 shrink keeps it symmetric positive definite although each row's Hessian is singular
    assert torch.linalg.eigvalsh(lrm.softmax_fisher(z, 0.3)).min() > 0.29


def test_output_error_curve_is_the_measured_error_at_every_rank():
    w = _decaying(24, 40, seed=3).double()
    c = _correlated_moment(40)
    fac = factorize(w, lrm.shrink(c, 0.4))  # fitted with another moment than the one judged
    curve = lrm.output_error_curve(w, fac.u, fac.v, c)
    assert curve[0].item() == pytest.approx(1.0)
    for r in (1, 5, 17, 24):
        u, v = fac.factors(r)
        # (at full rank the error is 0 up to the cancellation in ||Wx||^2 - 2<.,.> + ||Ax||^2)
        assert curve[r].item() == pytest.approx(output_error(w, u, v, c)["out_rel_fro"],
                                                rel=1e-6, abs=1e-6)


def test_an_output_metric_moves_the_error_to_the_outputs_it_weighs_little():
    w = _decaying(30, 40, seed=5).double()
    c = _correlated_moment(40)
    g = torch.diag(torch.logspace(1, -2, 30, dtype=torch.float64))  # early outputs matter
    plain, weighted = factorize(w, c), factorize(w, c, out_metric=lrm.OutputMetric.of(g))
    root = g.sqrt()
    for r in (4, 10, 20):
        err = {name: [output_error(m @ w, m @ fac.factors(r)[0], fac.factors(r)[1], c)
                      ["out_rel_fro"] for m in (root, torch.eye(30, dtype=w.dtype))]
               for name, fac in (("plain", plain), ("weighted", weighted))}
        # each fit is optimal in its own metric (the weighted one by the same truncation)
        assert err["weighted"][0] < err["plain"][0]
        assert err["plain"][1] < err["weighted"][1]
    # the spectrum of the weighted fit is that of G^1/2 W L: its tail is the weighted error
    u, v = weighted.factors(10)
    assert weighted.tail_rel_error()[10].item() == pytest.approx(
        output_error(root @ w, root @ u, v, c)["out_rel_fro"], rel=1e-6)
