"""The training objective: reference loss and the exact NLL of the normalised features."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fastflow.core.errors import FastFlowError
from fastflow.estimator.feature_cache import FeatureCache
from fastflow.estimator.training import (
    BatchNll,
    TrainConfig,
    channel_noise_scales,
    extract_features,
    fit_flows,
    learning_rate,
    resolve_budget,
)
from fastflow.model.config import Recipe, get_config, get_recipe
from fastflow.model.fastflow import FastFlowModel


def _model() -> FastFlowModel:
    return FastFlowModel(get_config("resnet18", input_size=(64, 48), flow_steps=2), weights="random")


def test_exact_nll_adds_the_layernorm_affine_log_det():
    model = _model()
    with torch.no_grad():
        for norm in model.norms:
            norm.weight.uniform_(0.2, 2.0)
    features = [torch.randn(3, *shape) for shape in model.feature_shapes]
    reference, exact = BatchNll(model, exact=False)(features) / 3, BatchNll(model, exact=True)(features) / 3
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
        BatchNll(model, exact)(features).backward()
        mean_grads[exact] = torch.stack([n.weight.grad.mean() for n in model.norms])
    assert (mean_grads[False] > 0.5).all()  # descent lowers the scales
    assert (mean_grads[True].abs() < 0.25 * mean_grads[False]).all()


def _cached_features(model: FastFlowModel, count: int, seed: int) -> FeatureCache:
    generator = torch.Generator().manual_seed(seed)
    return FeatureCache.of(
        [torch.randn(count, *shape, generator=generator) for shape in model.feature_shapes]
    )


def test_channel_noise_scales_follow_each_channels_spread():
    features = [torch.randn(6, 3, 4, 5) * torch.tensor([0.5, 1.0, 4.0]).view(1, 3, 1, 1)]
    (scale,) = channel_noise_scales(FeatureCache.of(features), 0.2)
    assert scale.shape == (1, 3, 1, 1)
    torch.testing.assert_close(scale.flatten(), 0.2 * features[0].std(dim=(0, 2, 3)))


def test_training_noise_is_drawn_reproducibly_and_changes_what_the_flow_learns():
    def trained(noise: float, noisy_copies: bool = False) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = _model()
        noisy = _cached_features(model, 8, 3) if noisy_copies else None
        fit_flows(
            model,
            _cached_features(model, 8, 1),
            _cached_features(model, 4, 2),
            TrainConfig(max_epochs=2, batch_size=4),
            feature_noise=noise,
            noisy_features=noisy,
            progress=False,
        )
        return model.flow_state_dict()

    clean = trained(0.0)
    for noise, copies in ((0.5, False), (0.0, True)):
        first, again = trained(noise, copies), trained(noise, copies)
        assert all(torch.equal(first[k], again[k]) for k in first)
        assert any(not torch.equal(clean[k], first[k]) for k in clean)


def test_bfloat16_flows_give_the_float32_loss_and_float32_gradients():
    """bf16 autocast is an arithmetic choice, not another objective: the loss stays within bf16
    rounding of float32's, and the parameters and their gradients stay float32."""
    model = _model()
    features = [torch.randn(4, *shape) for shape in model.feature_shapes]
    exact = BatchNll(model, exact=True)(features)
    fast = BatchNll(model, exact=True, precision="bfloat16")(features)
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, exact, rtol=0.02, atol=0.0)
    assert not torch.equal(fast, exact)  # it did run in bf16
    fast.backward()
    grads = [
        p.grad
        for name, p in model.named_parameters()
        if not name.startswith("backbone.") and p.grad is not None
    ]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_flow_precision_is_checked():
    with pytest.raises(FastFlowError, match="flow_precision"):
        TrainConfig(flow_precision="float16")


def test_auto_flow_precision_is_bfloat16_only_where_the_cpu_has_it(monkeypatch):
    from fastflow.estimator.training import resolve_flow_precision

    cpu = torch.device("cpu")
    assert resolve_flow_precision("float32", cpu) == "float32"
    for amx, avx512_bf16, expected in (
        (True, False, "bfloat16"),
        (False, True, "bfloat16"),
        (False, False, "float32"),
    ):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        assert resolve_flow_precision("auto", cpu) == expected


def test_micro_batches_default_to_the_fewest_equal_passes_within_the_element_budget():
    from fastflow.estimator.training import MICRO_BATCH_ELEMENTS, resolve_micro_batch_size

    resnet18_at_256 = [(64, 64, 64), (128, 32, 32), (256, 16, 16)]
    lite0_at_256 = [(24, 64, 64), (40, 32, 32), (112, 16, 16)]
    assert resolve_micro_batch_size(None, resnet18_at_256, 32) == 8
    assert resolve_micro_batch_size(None, lite0_at_256, 32) == 16  # 21 fit: two passes of 16, not 21 + 11
    assert resolve_micro_batch_size(None, lite0_at_256, 5) == 5
    assert resolve_micro_batch_size(None, [(MICRO_BATCH_ELEMENTS + 1, 1, 1)], 32) == 1
    assert resolve_micro_batch_size(3, resnet18_at_256, 32) == 3
    with pytest.raises(FastFlowError, match="micro_batch_size"):
        TrainConfig(micro_batch_size=0)


def test_micro_batches_give_the_gradients_and_loss_of_one_pass():
    from fastflow.estimator.training import _accumulate_gradients

    model = _model().train()
    batch = [
        torch.randn(6, *shape, generator=torch.Generator().manual_seed(1)) for shape in model.feature_shapes
    ]
    loss_of = BatchNll(model, exact=True)
    parameters = [p for name, p in model.named_parameters() if not name.startswith("backbone.")]

    def gradients(micro_batch_size: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = _accumulate_gradients(loss_of, batch, micro_batch_size, 1 / 6)
        return loss, [p.grad.clone() for p in parameters]

    whole_loss, whole = gradients(6)
    for micro_batch_size in (1, 4):  # equal passes and a short last one
        loss, grads = gradients(micro_batch_size)
        torch.testing.assert_close(loss, whole_loss, rtol=1e-6, atol=0)
        for grad, reference in zip(grads, whole, strict=True):
            torch.testing.assert_close(grad, reference, rtol=1e-4, atol=1e-6 * reference.abs().max().item())


def test_pixel_noise_of_the_noisy_copies_follows_the_seed():
    model = _model()
    pixels = torch.full((2, 3, 64, 48), 128, dtype=torch.uint8)

    def noisy_features(seed: int) -> list[torch.Tensor]:
        clean = FeatureCache(model.feature_shapes, 2)
        noisy = FeatureCache(model.feature_shapes, 2)
        extract_features(model, [([0, 1], pixels)], clean, noisy, sigma=3.0, seed=seed)
        return noisy.slice(0, 2)

    first, again, other = noisy_features(1), noisy_features(1), noisy_features(2)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])


def test_cosine_schedule_falls_from_the_peak_to_zero_over_the_budget():
    assert learning_rate("constant", 1e-3, 90, 100) == 1e-3
    rates = [learning_rate("cosine", 1e-3, step, 100) for step in range(101)]
    assert (
        rates[0] == pytest.approx(1e-3)
        and rates[50] == pytest.approx(5e-4)
        and rates[100] == pytest.approx(0)
    )
    assert all(a > b for a, b in itertools.pairwise(rates))


def test_the_recipes_schedule_sets_the_optimisers_learning_rate():
    def trained(schedule: str) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = _model()
        fit_flows(
            model,
            _cached_features(model, 8, 1),
            _cached_features(model, 4, 2),
            TrainConfig(max_epochs=2, batch_size=4, patience=5),
            progress=False,
            lr_schedule=schedule,
        )
        return model.flow_state_dict()

    constant, cosine = trained("constant"), trained("cosine")
    assert any(not torch.equal(constant[k], cosine[k]) for k in constant)
    with pytest.raises(FastFlowError, match="lr_schedule"):
        Recipe(lr_schedule="step")


def test_the_step_budget_gives_every_dataset_size_the_same_number_of_updates():
    improved, reference = get_recipe("improved"), get_recipe("reference")
    for count in (7, 108, 135, 188, 900, 5000):
        config = resolve_budget(TrainConfig(), improved, count)
        steps_per_epoch = math.ceil(count / config.batch_size)
        # Whole epochs, at least the budget, less than one epoch beyond it.
        assert config.batch_size == improved.batch_size
        assert improved.step_budget <= config.max_epochs * steps_per_epoch
        assert (config.max_epochs - 1) * steps_per_epoch < improved.step_budget or config.max_epochs == 1
    assert resolve_budget(TrainConfig(), improved, 188).max_epochs == 42  # 24 steps an epoch
    assert resolve_budget(TrainConfig(), improved, 900).max_epochs == 9  # 113 steps an epoch
    # What the user gives wins; the reference keeps its fixed 100 epochs of batch 32.
    given = resolve_budget(TrainConfig(max_epochs=3, batch_size=4), improved, 900)
    assert (given.max_epochs, given.batch_size) == (3, 4)
    fixed = resolve_budget(TrainConfig(), reference, 900)
    assert (fixed.max_epochs, fixed.batch_size) == (100, 32)


def test_an_unresolved_budget_cannot_reach_the_training_loop():
    model = FastFlowModel(get_config("resnet18", input_size=(64, 64)), weights="random")
    with pytest.raises(ValueError, match="resolve_budget"):
        fit_flows(model, [], [], TrainConfig())
