"""The training objective: reference loss and the exact NLL of the normalised features."""

from __future__ import annotations

import torch

from fastflow.model.fastflow import FastFlowModel
from fastflow.presets import get_config
from fastflow.train import _flow_nll


def _model() -> FastFlowModel:
    return FastFlowModel(get_config("resnet18", input_size=(64, 48), flow_steps=2), weights="random")


def test_exact_nll_adds_the_layernorm_affine_log_det():
    model = _model()
    with torch.no_grad():
        for norm in model.norms:
            norm.weight.uniform_(0.2, 2.0)
    features = [torch.randn(3, *shape) for shape in model.feature_shapes]
    reference, exact = _flow_nll(model, features, exact=False), _flow_nll(model, features, exact=True)
    expected = -sum(norm.weight.log().sum() for norm in model.norms)
    torch.testing.assert_close(exact - reference, expected, rtol=1e-4, atol=1e-2)


def test_reference_loss_pulls_the_layernorm_scale_down_exact_nll_does_not():
    """The reference loss's degenerate direction: at init its gradient shrinks every LayerNorm
    scale (lower NLL by squeezing the features); the exact NLL's log-det term balances it."""
    model = _model()
    features = [torch.randn(16, *shape) for shape in model.feature_shapes]
    mean_grads = {}
    for exact in (False, True):
        model.zero_grad()
        _flow_nll(model, features, exact).backward()
        mean_grads[exact] = torch.stack([n.weight.grad.mean() for n in model.norms])
    assert (mean_grads[False] > 0.5).all()  # descent lowers the scales
    assert (mean_grads[True].abs() < 0.25 * mean_grads[False]).all()

