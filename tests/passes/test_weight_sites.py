"""The shared weight-site finder: sites of every form, and BatchNorm folded exactly."""

import pytest
import torch
import torch.nn as nn

import effc


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 24)
        self.bn1 = nn.BatchNorm1d(24)
        self.out = nn.Linear(24, 5)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.out(torch.relu(self.bn1(self.fc(h))))


def _model():
    torch.manual_seed(0)
    model = ConvBN().eval()
    with torch.no_grad():  # BatchNorms with statistics that really rescale the channels
        for bn in (model.bn, model.bn1):
            bn.running_mean.normal_(0, 0.5)
            bn.running_var.uniform_(0.2, 3.0)
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.normal_(0, 0.3)
        # exactly rank 8, so a rank-8 factorization of the folded layer is exact
        model.conv.weight.copy_((torch.randn(32, 8) @ torch.randn(8, 144)).reshape(32, 16, 3, 3)
                                / 20)
        model.fc.weight.copy_(torch.randn(24, 8) @ torch.randn(8, 32) / 10)
    return model


def _compile(model, x, **low_rank):
    torch._dynamo.reset()
    effc.reset()
    compiled = torch.compile(model, backend="effc", options={"low_rank": low_rank})
    with torch.no_grad():
        return compiled, compiled(x)


def test_conv_and_linear_batch_norms_fold_exactly():
    model, x = _model(), torch.randn(4, 16, 8, 8)
    with torch.no_grad():
        ref = model(x)
    _, out = _compile(model, x, rank=8, include=["conv", "fc"])
    rows = {s.site: s for s in effc.report().sites}
    assert rows["conv.weight"].decision == "rewritten" and rows["fc.weight"].decision == "rewritten"
    assert rows["conv.weight"].details["batch_norm_folded"]
    assert rows["fc.weight"].details["batch_norm_folded"]
    assert "BatchNorm folded" in rows["conv.weight"].reason
    # rank 8 of an exactly rank-8 folded matrix: the folded layer is the layer, to rounding
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_folded_weights_are_the_batch_norm_scaled_rows():
    """At low rank the error is that of the folded matrix diag(s) W, not of W."""
    model, x = _model(), torch.randn(4, 16, 8, 8)
    _compile(model, x, rank=4, rank_multiple=4, include=["conv"])
    row = next(s for s in effc.report().sites if s.site == "conv.weight")
    s = model.bn.weight / (model.bn.running_var + model.bn.eps).sqrt()
    folded = (model.conv.weight.reshape(32, -1) * s[:, None]).double()
    sv = torch.linalg.svdvals(folded)
    expected = (sv[4:].pow(2).sum() / sv.pow(2).sum()).sqrt().item()
    assert row.error["weight_rel_fro"] == pytest.approx(expected, rel=1e-6)
    plain = torch.linalg.svdvals(model.conv.weight.reshape(32, -1).double())
    assert expected != pytest.approx((plain[4:].pow(2).sum() / plain.pow(2).sum()).sqrt().item(),
                                     rel=1e-3)


def test_a_changed_batch_norm_statistic_rederives_the_fold():
    model, x = _model(), torch.randn(4, 16, 8, 8)
    compiled, _ = _compile(model, x, rank=8, include=["conv"])
    with torch.no_grad():
        model.bn.running_var.mul_(2.0)
        ref = model(x)
        out = compiled(x)
    graph = effc.report().graphs[0]
    assert graph.rederivations == 1 and "bn.running_var" in graph.notes[-1]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_fold_bn_false_and_training_mode_leave_the_batch_norm():
    model, x = _model(), torch.randn(4, 16, 8, 8)
    _compile(model, x, rank=8, include=["conv"], fold_bn=False)
    row = next(s for s in effc.report().sites if s.site == "conv.weight")
    assert "batch_norm_folded" not in row.details and "BatchNorm" not in row.reason
