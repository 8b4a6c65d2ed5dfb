"""The shared allocator: end-to-end sensitivity where the per-layer proxy misallocates, the
quality-bounded default, and the candidates in the report."""

import pytest
import torch
import torch.nn as nn

import effc
from effc.compiler.metrics import error_stats
from effc.compiler.report import Report
from effc.passes.budget import Candidate, SiteOptions, allocate


def _spectral(n, decay, seed):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    s = torch.arange(1, n + 1, dtype=torch.float32) ** decay
    return u @ torch.diag(s) @ v.T


class Amplified(nn.Module):
    """Two layers with equal spectra; b's output reaches the result 20x amplified. Their own
    relative errors are alike at every rank, their effects on the output are not."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(96, 96, bias=False), nn.Linear(96, 96, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(_spectral(96, -1.0, 1))
            self.b.weight.copy_(_spectral(96, -1.0, 2))

    def forward(self, x):
        return self.a(x) + 20.0 * self.b(x)


def _run(model, x, options):
    torch._dynamo.reset()
    effc.reset()
    with torch.no_grad():
        out = torch.compile(model, backend="effc", options=options)(x)
    return out, Report(graphs=list(effc.report().graphs))  # the session report is reset later


def test_end_to_end_sensitivity_allocates_where_the_proxy_does_not():
    torch.manual_seed(0)
    model, x = Amplified().eval(), torch.randn(256, 96)
    with torch.no_grad():
        ref = model(x)
    calib = effc.calibrate(model, [torch.randn(256, 96)], progress=False)
    budget = {"param_budget": 0.3, "min_saving": 0.0, "rank_multiple": 4}
    out_e2e, rep_e2e = _run(model, x, {"low_rank": budget, "calibration": calib})
    out_proxy, rep_proxy = _run(model, x, {"low_rank": {**budget, "sensitivity": "layer"},
                                           "calibration": calib})
    ranks = lambda rep: {s.site: s.details.get("rank") for s in rep.sites}  # noqa: E731
    e2e, proxy = ranks(rep_e2e), ranks(rep_proxy)
    assert e2e["b.weight"] > e2e["a.weight"]          # b's error costs 20x more
    assert abs(proxy["b.weight"] - proxy["a.weight"]) <= 4  # the proxy sees equal layers
    kept = lambda rep: sum(s.params_after for s in rep.sites)  # noqa: E731
    assert kept(rep_e2e) <= 0.3 * 2 * 96 * 96 and kept(rep_proxy) <= 0.3 * 2 * 96 * 96
    err_e2e = error_stats(ref, out_e2e)["rel_fro"]
    err_proxy = error_stats(ref, out_proxy)["rel_fro"]
    assert err_e2e < 0.8 * err_proxy, (err_e2e, err_proxy)  # measured: 0.15 vs 0.22
    row = next(s for s in rep_e2e.sites if s.site == "b.weight")
    assert row.details["sensitivity_measured"] is True
    assert row.details["sensitivity"] > 10 * next(
        s for s in rep_e2e.sites if s.site == "a.weight").details["sensitivity"]
    assert row.details["candidates"]["dense"] == [96 * 96, 4 * 96 * 96, 2 * 256 * 96 * 96, 0.0]
    assert row.details["candidates"]["8"][:3] == [8 * 192, 4 * 8 * 192, 2 * 256 * 8 * 192]
    assert any("end-to-end sensitivity measured on 1 calibration sample" in n
               for n in rep_e2e.graphs[0].notes)
    assert any("sensitivity: each site's own error" in n for n in rep_proxy.graphs[0].notes)


def test_default_keeps_the_outputs_within_its_stated_bound():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(),
                          nn.Linear(128, 32)).eval()
    with torch.no_grad():  # weights with a decaying spectrum, as trained ones have
        for i, m in enumerate(model):
            if isinstance(m, nn.Linear):
                m.weight.copy_(_spectral(max(m.weight.shape), -1.0, i)[:m.weight.shape[0],
                                                                      :m.weight.shape[1]])
    batches = [torch.randn(128, 64) for _ in range(4)]
    calib = effc.calibrate(model, batches, progress=False)
    x = batches[0]
    with torch.no_grad():
        ref = model(x)
    out, rep = _run(model, x, {"low_rank": True, "calibration": calib})
    note = next(n for n in rep.graphs[0].notes if "output SQNR" in n)
    measured = float(note.split("output SQNR ")[1].split(" dB")[0])
    assert measured >= 25.0 and "(bound 25 dB)" in note and "quality-bounded default" in note
    assert error_stats(ref, out)["sqnr_db"] >= 25.0  # x is one of the calibration samples
    kept = sum(s.params_after for s in rep.sites)
    assert kept < 0.9 * sum(s.params_before for s in rep.sites)  # it did compress
    with torch.no_grad():  # held-out data: within a few dB of the bound
        fresh = torch.randn(256, 64)
        held = error_stats(model(fresh), torch.compile(model, backend="effc", options={
            "low_rank": True, "calibration": calib})(fresh))["sqnr_db"]
    assert held >= 22.0


def test_default_without_calibration_is_a_per_site_bound_and_keeps_output_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    with torch.no_grad():
        model[0].weight.copy_(_spectral(64, -2.0, 0))
    _, rep = _run(model, torch.randn(8, 64), {"low_rank": True})
    rows = {s.site: s for s in rep.sites}
    assert rows["2.weight"].reason.startswith("output layer")
    first = rows["0.weight"]
    assert first.decision == "rewritten" and first.error["weight_rel_fro"] <= 0.05
    assert any("per-site error bound of 0.05" in n for n in rep.graphs[0].notes)


class _Cached(nn.Module):
    """A decoder-like graph: the logits, and a wide tensor it also returns (a cache)."""

    def __init__(self):
        super().__init__()
        self.body, self.cache, self.head = nn.Linear(64, 64), nn.Linear(64, 256), nn.Linear(64, 10)

    def forward(self, x):
        return self.head(torch.relu(self.body(x))), self.cache(x)


@pytest.mark.parametrize("dynamic", [False, True])
def test_the_output_layer_is_the_one_feeding_the_deepest_output_also_traced_dynamic(dynamic):
    """The main output is the one computed from the most of the graph (the logits), not the
    widest (a cache's tensor): so, without calibration, the head stays dense and the cache's
    projection does not, also when sizes are symbolic (it used to pick the first output)."""
    torch.manual_seed(0)
    model = _Cached().eval()
    with torch.no_grad():
        model.body.weight.copy_(_spectral(64, -2.0, 0))
    torch._dynamo.reset()
    effc.reset()
    with torch.no_grad():
        torch.compile(model, backend="effc", dynamic=dynamic,
                      options={"low_rank": True})(torch.randn(8, 64))
    rows = {s.site: s for s in effc.report().sites}
    assert rows["head.weight"].reason.startswith("output layer")
    assert not rows["cache.weight"].reason.startswith("output layer")


def test_allocate_walks_the_convex_hull_and_respects_both_stops():
    def opts(key, errors, sens=1.0):
        cands = [Candidate(r, 10 * r, e) for r, e in errors] + [Candidate(None, 100, 0.0)]
        return SiteOptions(key, cands, sensitivity=sens)

    # rank 2 of "a" is off the hull (no better than rank 1): never chosen
    a = opts("a", [(1, 0.5), (2, 0.5), (4, 0.1)])
    b = opts("b", [(1, 0.5), (4, 0.2)], sens=4.0)
    choice = allocate([a, b], max_params=80)
    assert sum(c.params for c in choice.values()) <= 80
    assert choice["b"].choice == 4  # b's error weighs 4x: it is bought first
    bound = allocate([a, b], max_error2=0.2)
    assert sum(s.sensitivity * bound[s.key].error ** 2 for s in (a, b)) <= 0.2
    with pytest.raises(ValueError, match="param_budget too small"):
        allocate([a, b], max_params=10)


class Reshaping(nn.Module):
    """Bakes its batch size into a reshape, as traced vision/ViT graphs do."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x):
        return self.fc(x).reshape(x.shape[0] * 2, 32)


@pytest.mark.parametrize("batch", [5, 4])
def test_samples_of_other_shapes_fall_back_or_split_into_the_graphs_batches(batch):
    """Calibrated on batches of 16, compiled for a graph that bakes its batch size: for 5,
    no sample runs, and the call being compiled is measured; for 4, which divides 16, each
    sample runs as four calls of 4."""
    model = Reshaping().eval()
    with torch.no_grad():
        model.fc.weight.copy_(_spectral(64, -1.5, 0))
    calib = effc.calibrate(model, [torch.randn(16, 64) for _ in range(6)], progress=False)
    torch._dynamo.reset()
    _, rep = _run(model, torch.randn(batch, 64), {"low_rank": True, "calibration": calib})
    note = next(n for n in rep.graphs[0].notes if "output SQNR" in n)
    if batch == 4:
        assert rep.graphs[0].warnings == []
        assert "measured on 16 calibration sample calls" in note
        return
    assert any("none of the calibration's 4 sample inputs of this graph runs on it" in w
               for w in rep.graphs[0].warnings)
    assert "measured on the inputs of the call being compiled" in note
    assert float(note.split("output SQNR ")[1].split(" dB")[0]) >= 25.0


def test_one_calibration_serves_two_compiles_of_one_model():
    """Dynamo compares the backend options of cached graphs: a Calibration compares by
    identity (comparing its tensors with == raised 'Boolean value of Tensor ...')."""
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32)).eval()
    calib = effc.calibrate(model, [torch.randn(8, 32) for _ in range(6)], progress=False)
    torch._dynamo.reset()
    options = {"low_rank": {"rank": 8, "min_saving": 0.0}, "calibration": calib}
    first = torch.compile(model, backend="effc", options=options)
    second = torch.compile(model, backend="effc", options=dict(options))
    x = torch.randn(8, 32)
    with torch.no_grad():
        torch.testing.assert_close(first(x), second(x))
    assert calib == calib and calib != effc.calibrate(model, [x], progress=False)


def test_a_dynamic_graph_runs_samples_recorded_on_a_static_one():
    """calibrate's observer traced a static graph; dynamic=True gives effc one with a size
    argument, read off each sample's shapes."""
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    calib = effc.calibrate(model, [torch.randn(8, 32) for _ in range(6)], progress=False)
    torch._dynamo.reset()
    effc.reset()
    compiled = torch.compile(model, backend="effc", dynamic=True, options={
        "low_rank": {"param_budget": 0.5, "min_saving": 0.0}, "calibration": calib})
    with torch.no_grad():
        compiled(torch.randn(5, 32))
    (graph,) = effc.report().graphs
    assert graph.inputs["symint"] == 1 and graph.warnings == []
    assert "measured on 4 calibration sample calls" in graph.notes[0]


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_default_on_hugging_face_models_meets_its_bound_on_held_out_batches(kind):
    """Calibrated with padded-free batches of one shape, compiled on another batch of that
    shape: the default's measured bound holds on data neither fitted nor measured on."""
    from helpers import first_tensor, hf_model

    model, inputs = hf_model(kind)
    model.eval()
    g = torch.Generator().manual_seed(1)
    batches = [{**inputs, "input_ids": torch.randint(0, 96, (2, 9), generator=g)}
               for _ in range(8)]
    calib = effc.calibrate(model, batches, progress=False)
    held_out = {**inputs, "input_ids": torch.randint(0, 96, (2, 9), generator=g)}
    with torch.no_grad():
        ref = first_tensor(model(**held_out))
    torch._dynamo.reset()
    effc.reset()
    compiled = torch.compile(model, backend="effc", options={"low_rank": True,
                                                            "calibration": calib})
    with torch.no_grad():
        out = first_tensor(compiled(**held_out))
    note = next(n for g in effc.report().graphs for n in g.notes if "output SQNR" in n)
    assert "(bound 25 dB)" in note and "not fitted to" in note
    assert float(note.split("output SQNR ")[1].split(" dB")[0]) >= 25.0
    assert error_stats(ref, out)["sqnr_db"] >= 20.0
    sites = effc.report().sites
    assert sum(s.params_after for s in sites) < 0.9 * sum(s.params_before for s in sites)


def test_a_graph_recompiled_for_strided_inputs_still_runs_the_samples():
    """A transposed view recompiles with its stride as a size argument (read off the
    samples' strides), so the second graph is measured on calibration data too."""
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    calib = effc.calibrate(model, [torch.randn(8, 32) for _ in range(6)], progress=False)
    torch._dynamo.reset()
    effc.reset()
    compiled = torch.compile(model, backend="effc", options={
        "low_rank": {"param_budget": 0.5, "min_saving": 0.0}, "calibration": calib})
    with torch.no_grad():
        compiled(torch.randn(8, 32))
        compiled(torch.randn(32, 8).T)
    graphs = effc.report().graphs
    assert len(graphs) == 2 and graphs[1].inputs["symint"] >= 1
    assert all(g.warnings == [] for g in graphs), [g.warnings for g in graphs]
    assert all("measured on 4 calibration sample calls" in g.notes[0] for g in graphs)


def test_max_forwards_bounds_the_sensitivity_runs():
    torch.manual_seed(0)
    model = Amplified().eval()
    calib = effc.calibrate(model, [torch.randn(64, 96) for _ in range(8)], progress=False)
    _, rep = _run(model, torch.randn(64, 96), {"low_rank": {
        "param_budget": 0.3, "min_saving": 0.0, "max_forwards": 2, "compensate": False},
        "calibration": calib})
    notes = rep.graphs[0].notes
    assert any("sensitivities measured on 1 of the 4 sample calls" in n for n in notes), notes
    # 4 reference runs, 2 sites x 1 call, the final choice checked on all 4 calls (no
    # refining round: its 2 re-measurements would pass the bound)
    assert any("(10 forward passes)" in n for n in notes), notes


class _Saturating:
    """A stand-in for EndToEnd whose output error is not the linear sum the allocator assumes:
    site "a" hurts like 0.1 e^2 (1 + (e / 0.2)^4) (harmless for small errors, much worse for
    large), site "b" exactly like e^2. `realize` hands it the chosen candidates themselves."""

    def __init__(self):
        self.calls = [()]
        self.runs = 0

    def error2(self, replace, calls=None):
        self.runs += 1
        e = {k: c.error for k, c in replace.items()}
        a, b = e.get("a", 0.0), e.get("b", 0.0)
        return 0.1 * a ** 2 * (1 + (a / 0.2) ** 4) + b ** 2


def test_refining_at_the_chosen_candidates_fixes_a_misjudged_probe():
    from effc.passes.budget import _refine

    def options():
        # same costs for both; "a" has the lower own error at every size
        return [SiteOptions(k, [Candidate(p, p, err, bytes=p) for p, err in
                                ((1, 0.6 * f), (2, 0.4 * f), (3, 0.2 * f), (4, 0.1 * f))]
                            + [Candidate(None, 8, 0.0, bytes=8)], 1.0, True)
                for k, f in (("a", 0.9), ("b", 1.0))]

    e2e = _Saturating()
    sites = options()
    for s in sites:  # what measure_sensitivities finds with its probe (own error 0.1 or less)
        probe = min((c for c in s.candidates if 0 < c.error <= 0.1), key=lambda c: c.params)
        s.sensitivity = e2e.error2({s.key: probe}) / probe.error ** 2
    first = allocate(sites, max_params=6)
    before = e2e.error2(first)
    choice, after = _refine(sites, e2e, lambda c: c, first, before, 6, "params", 1, 512)
    assert after == e2e.error2(choice) and after < 0.5 * before, (before, after)
    # the probe saw "a" as harmless, so "a" got cut hardest; refined, "a" gets more back
    assert first["a"].params < first["b"].params and choice["a"].params > first["a"].params
    # the best of every split of the budget
    best = min(e2e.error2({"a": ca, "b": cb}) for ca in sites[0].candidates
               for cb in sites[1].candidates if ca.params + cb.params <= 6)
    assert after == pytest.approx(best)
