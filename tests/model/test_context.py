"""Context options: neighbourhood average, scale fusion, positional condition; folded and saved alike."""

from __future__ import annotations

import pytest
import torch
from support import perturb_trainable

from fastflow.core.errors import FastFlowError
from fastflow.model.config import get_config
from fastflow.model.context import fuse_to_finest, local_average, positional_encoding
from fastflow.model.fastflow import FastFlowModel
from fastflow.model.flow import CouplingStep, FlowStack
from fastflow.model.scoring import nll_loss


def test_local_average_is_the_neighbourhood_mean_inside_and_at_the_borders():
    feature = torch.randn(2, 3, 6, 7)
    pooled = local_average(feature, 3)
    assert pooled.shape == feature.shape and local_average(feature, 1) is feature
    torch.testing.assert_close(pooled[:, :, 2, 3], feature[:, :, 1:4, 2:5].mean(dim=(2, 3)))
    torch.testing.assert_close(pooled[:, :, 0, 0], feature[:, :, :2, :2].mean(dim=(2, 3)))  # no zero padding
    constant = torch.full((1, 2, 5, 5), 3.0)
    torch.testing.assert_close(local_average(constant, 5), constant)


def test_fusion_brings_every_scale_to_the_finest_grid():
    maps = [torch.randn(2, 4, 8, 10), torch.randn(2, 6, 4, 5), torch.randn(2, 3, 2, 3)]
    fused = fuse_to_finest(maps)
    assert fused.shape == (2, 13, 8, 10)
    torch.testing.assert_close(fused[:, :4], maps[0])


def test_positional_encoding_tells_every_position_apart():
    code = positional_encoding(16, 6, 9)
    assert code.shape == (1, 16, 6, 9) and code.abs().max() <= 1
    flat = code[0].flatten(1).T  # (positions, channels)
    assert torch.cdist(flat, flat).add(torch.eye(54)).min() > 1e-3
    with pytest.raises(ValueError, match="multiple of 4"):
        positional_encoding(6, 4, 4)


def test_conditioned_step_log_det_matches_autograd_and_inverts():
    torch.set_default_dtype(torch.float64)
    try:
        step = CouplingStep(4, kernel_size=3, hidden_ratio=2.0, condition_channels=4)
        perturb_trainable(step, torch.Generator().manual_seed(0))
        condition = positional_encoding(4, 3, 2).double()
        x = torch.randn(1, 4, 3, 2)
        jacobian = torch.autograd.functional.jacobian(lambda t: step(t, condition)[0], x).reshape(
            x.numel(), -1
        )
        torch.testing.assert_close(step(x, condition)[1].sum(), torch.linalg.slogdet(jacobian)[1])
        torch.testing.assert_close(step.inverse(step(x, condition)[0], condition), x)
        assert not torch.allclose(step(x, condition)[0], step(x, torch.zeros_like(condition))[0])
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("permutation", ["random", "swap"])
@pytest.mark.parametrize("in_place", [False, True])
def test_folded_conditioned_flow_equals_the_flow(in_place, permutation):
    flow = FlowStack(10, 4, kernels=(3, 1), condition_channels=8, seed=2, permutation=permutation)
    perturb_trainable(flow, torch.Generator().manual_seed(1))
    condition = positional_encoding(8, 7, 5)
    x = torch.randn(3, 10, 7, 5)
    with torch.no_grad():
        reference, _ = flow(x, condition)
        folded = flow.fold(condition, in_place)
        z, _ = folded(x)
    torch.testing.assert_close(z[:, folded.output_permutation], reference, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="condition"):
        flow.fold()


OPTIONS = [
    {"context_pool": 3},
    {"fuse_scales": True},
    {"positional_channels": 8},
    {"positional_channels": 8, "permutation": "swap"},
    {"context_pool": 3, "fuse_scales": True, "positional_channels": 8},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "+".join(o))
def test_model_options_train_fold_and_reload_alike(options):
    config = get_config("resnet18", input_size=(64, 48), flow_steps=2, **options)
    model = FastFlowModel(config, "random").eval()
    perturb_trainable(model, torch.Generator().manual_seed(3))
    pixels = torch.randint(0, 256, (2, 3, 70, 50), dtype=torch.uint8)
    with torch.no_grad():
        zs, log_dets = model.flow(model.extract(pixels), with_norm_log_det=True)
        folded_zs, _ = model.fold()(pixels)
    assert len(zs) == (1 if config.fuse_scales else 3)
    assert [tuple(z.shape[1:]) for z in zs] == model.flow_shapes
    assert torch.isfinite(nll_loss(zs, log_dets))
    for z, folded, flow in zip(zs, folded_zs, model.fold().flows, strict=True):
        torch.testing.assert_close(folded[:, flow.output_permutation], z, rtol=1e-4, atol=1e-4)
    # The positional code is computed, not saved: a fresh model with the same weights agrees.
    twin = FastFlowModel(config, "random").eval()
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        for z, twin_z in zip(zs, twin(pixels)[0], strict=True):
            torch.testing.assert_close(twin_z, z)


def test_pooling_changes_what_the_flows_see():
    plain = FastFlowModel(get_config("resnet18", input_size=(64, 48), flow_steps=2), "random").eval()
    pooled = FastFlowModel(
        get_config("resnet18", input_size=(64, 48), flow_steps=2, context_pool=3), "random"
    )
    pooled.backbone.load_state_dict(plain.backbone.state_dict())
    pixels = torch.randint(0, 256, (1, 3, 64, 48), dtype=torch.uint8)
    raw, smooth = plain.extract(pixels), pooled.extract(pixels)
    torch.testing.assert_close(smooth[1], local_average(raw[1], 3))
    assert not torch.allclose(smooth[1], raw[1])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("context_pool", 2),
        ("context_pool", 0),
        ("positional_channels", 6),
        ("fuse_scales", 1),
        ("permutation", "shuffle"),
    ],
)
def test_bad_context_options_are_clear_errors(field, value):
    with pytest.raises(FastFlowError, match=field):
        get_config("resnet18", **{field: value})
