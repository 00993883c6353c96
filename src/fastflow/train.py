"""Training the flows: a plain PyTorch loop on cached backbone features.

The backbone is frozen and images are not augmented, so its features
(``FastFlowModel.extract`` of the uint8 pixels, the same path inference takes) are computed
once and reused every epoch; on a CPU this makes an epoch cost only the flows. Model selection uses
the NLL on held-out *normal* images, never a test metric: the best epoch's weights are kept,
and training stops once that NLL has not improved for ``patience`` epochs.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fastflow.errors import FastFlowError, is_integer, is_real, require
from fastflow.model.fastflow import FastFlowModel
from fastflow.scoring import nll_loss

__all__ = ["TrainConfig", "TrainState", "add_pixel_noise", "channel_noise_scales", "extract_features", "extract_with_noisy_copies", "fit_flows"]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; defaults follow the reference (Adam, lr 1e-3, wd 1e-5, batch 32).

    Invalid values raise ``FastFlowError`` at construction, naming the setting and its valid
    range, so a bad option stops a run before any image is read.
    """

    max_epochs: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-5
    patience: int = 10
    min_delta: float = 1e-3  # held-out NLL gain (nats per feature element) that counts as progress
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "max_epochs": (is_integer(self.max_epochs) and self.max_epochs >= 1, "an integer >= 1"),
            "batch_size": (is_integer(self.batch_size) and self.batch_size >= 1, "an integer >= 1"),
            "lr": (is_real(self.lr) and self.lr > 0, "a number > 0"),
            "weight_decay": (is_real(self.weight_decay) and self.weight_decay >= 0, "a number >= 0"),
            "patience": (is_integer(self.patience) and self.patience >= 1, "an integer >= 1"),
            "min_delta": (is_real(self.min_delta) and self.min_delta >= 0, "a number >= 0"),
            "seed": (is_integer(self.seed) and self.seed >= 0, "an integer >= 0"),
        }
        for name, (ok, valid) in checks.items():
            flag = "--" + {"max_epochs": "epochs"}.get(name, name).replace("_", "-")
            require(ok, f"{name} ({flag})", valid, getattr(self, name))


@dataclass
class TrainState:
    """Where training stands; everything needed to resume or report."""

    epoch: int = 0
    best_epoch: int = 0
    best_val_nll: float = math.inf
    progress_epoch: int = 0  # last epoch whose held-out NLL beat the previous mark by min_delta
    progress_val_nll: float = math.inf
    history: list[dict[str, float]] = field(default_factory=list)
    best_weights: dict[str, Tensor] | None = None
    optimizer: dict | None = None

    @property
    def epochs_without_progress(self) -> int:
        return self.epoch - self.progress_epoch


def _stack_scales(per_batch: list[list[Tensor]]) -> list[Tensor]:
    """Per-batch lists of per-scale features -> one (N, C, h, w) channels-last tensor per scale."""
    return [torch.cat(scale).contiguous(memory_format=torch.channels_last) for scale in zip(*per_batch, strict=True)]


def extract_features(model: FastFlowModel, batches: Iterable[Tensor], desc: str = "features") -> list[Tensor]:
    """Raw backbone features of every uint8 pixel batch, one (N, C, h, w) tensor per scale."""
    return _stack_scales([model.extract(pixels) for pixels in tqdm(batches, desc=desc, leave=False, unit="batch")])


def extract_with_noisy_copies(
    model: FastFlowModel, batches: Iterable[Tensor], sigma: float, seed: int, desc: str = "features"
) -> tuple[list[Tensor], list[Tensor]]:
    """``extract_features`` of the batches as they are and with pixel noise (``add_pixel_noise``),
    from one pass over them: each image is decoded once for both copies."""
    generator = torch.Generator().manual_seed(seed)
    clean, noisy = [], []
    for pixels in tqdm(batches, desc=desc, leave=False, unit="batch"):
        clean.append(model.extract(pixels))
        noisy.append(model.extract(add_pixel_noise(pixels, sigma, generator)))
    return _stack_scales(clean), _stack_scales(noisy)


def add_pixel_noise(pixels: Tensor, sigma: float, generator: torch.Generator) -> Tensor:
    """uint8 pixels plus Gaussian noise of ``sigma`` grey levels, rounded back to uint8 as a camera stores them."""
    noisy = pixels.float() + sigma * torch.randn(pixels.shape, generator=generator)
    return noisy.round_().clamp_(0, 255).to(torch.uint8)


def channel_noise_scales(features: list[Tensor], fraction: float) -> list[Tensor]:
    """Per scale, ``fraction`` x each channel's std over all images and positions, shaped (1, C, 1, 1).

    Why noise at all: clean features of normal images lie close to a thin manifold, and maximum
    likelihood then teaches the flow to expand the directions of tiny variance, so a change no
    inspector sees (a grey level of sensor noise, bf16 rounding) becomes a large ||z||^2. Noise
    of a known size in every direction bounds how far the flow can expand any of them.
    """
    return [fraction * f.std(dim=(0, 2, 3), keepdim=True) for f in features]


def _flow_nll(model: FastFlowModel, features: list[Tensor], exact: bool) -> Tensor:
    """``nll_loss`` of a batch of raw features through the model's norms and flows."""
    return nll_loss(*model.flow(features, with_norm_log_det=exact))


def _evaluate_nll(model: FastFlowModel, features: list[Tensor], batch_size: int, exact: bool) -> float:
    """Mean per-image NLL on held-out features (eval mode, no gradients)."""
    model.eval()
    total, count = 0.0, features[0].shape[0]
    with torch.no_grad():
        for start in range(0, count, batch_size):
            batch = [f[start : start + batch_size] for f in features]
            total += _flow_nll(model, batch, exact).item() * batch[0].shape[0]
    return total / count


def _per_position(model: FastFlowModel, nll: float) -> float:
    """NLL per feature element, a scale-free number for progress bars and logs."""
    elements = sum(math.prod(shape) for shape in model.flow_shapes)
    return nll / elements


def fit_flows(
    model: FastFlowModel,
    train_features: list[Tensor],
    val_features: list[Tensor],
    config: TrainConfig,
    exact_nll: bool = True,
    feature_noise: float = 0.0,
    noisy_features: list[Tensor] | None = None,
    state: TrainState | None = None,
    on_epoch_end: Callable[[TrainState], None] | None = None,
    progress: bool = True,
) -> TrainState:
    """Train ``model``'s norms and flows on cached features; load the best weights at the end.

    Args:
        model: the model; only its non-backbone parameters are trained.
        train_features / val_features: outputs of ``extract_features`` on normal images.
        config: optimisation and stopping settings.
        exact_nll: train on the exact NLL (``Recipe.exact_nll``), else the reference loss.
        feature_noise: std of the Gaussian noise added to each training batch's features, as a
            fraction of each channel's std over ``train_features`` (``Recipe.feature_noise``).
        noisy_features: features of the same training images with pixel noise
            (``Recipe.pixel_noise``); each epoch every image is taken clean or noisy at random.
        state: a previous ``TrainState`` to resume from (weights already loaded in ``model``).
        on_epoch_end: called after each epoch (e.g. to write a resumable checkpoint).
        progress: show a progress bar with the loss.

    Raises:
        FastFlowError: when the loss becomes NaN or infinite.
    """
    state = state or TrainState()
    parameters = [p for name, p in model.named_parameters() if not name.startswith("backbone.")]
    optimizer = torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)
    if state.optimizer is not None:
        optimizer.load_state_dict(state.optimizer)
    generator = torch.Generator()
    noise_scales = channel_noise_scales(train_features, feature_noise) if feature_noise > 0 else []
    count = train_features[0].shape[0]
    bar = tqdm(total=config.max_epochs, initial=state.epoch, desc="train", unit="epoch", disable=not progress)
    while state.epoch < config.max_epochs and state.epochs_without_progress < config.patience:
        model.train()
        # Reseeded every epoch, so a resumed run draws the same batches as an uninterrupted one.
        order = torch.randperm(count, generator=generator.manual_seed(config.seed + state.epoch))
        losses = []
        for start in range(0, count, config.batch_size):
            index = order[start : start + config.batch_size]
            batch = [f[index] for f in train_features]
            if noisy_features is not None:
                noisy = torch.rand(len(index), generator=generator) < 0.5
                batch = [torch.where(noisy.view(-1, 1, 1, 1), n[index], f) for f, n in zip(batch, noisy_features, strict=True)]
            if feature_noise > 0:
                batch = [f + scale * torch.randn(f.shape, generator=generator) for f, scale in zip(batch, noise_scales, strict=True)]
            loss = _flow_nll(model, batch, exact_nll)
            if not torch.isfinite(loss):
                raise FastFlowError(
                    f"training loss became {loss.item()} at epoch {state.epoch + 1}; the flows diverged: "
                    "lower --lr, or check that the training images are normal, readable and not blank"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        state.epoch += 1
        val_nll = _evaluate_nll(model, val_features, config.batch_size, exact_nll)
        train_nll = sum(losses) / len(losses)
        state.history.append({"epoch": state.epoch, "train_nll": train_nll, "val_nll": val_nll})
        if val_nll < state.best_val_nll:
            state.best_val_nll, state.best_epoch = val_nll, state.epoch
            state.best_weights = copy.deepcopy(model.flow_state_dict())
        gain = state.progress_val_nll - val_nll
        if not math.isfinite(gain) or _per_position(model, gain) > config.min_delta:
            state.progress_val_nll, state.progress_epoch = val_nll, state.epoch
        state.optimizer = optimizer.state_dict()
        bar.update(1)
        bar.set_postfix(
            loss=f"{_per_position(model, train_nll):.4f}",
            val=f"{_per_position(model, val_nll):.4f}",
            best=state.best_epoch,
        )
        if on_epoch_end is not None:
            on_epoch_end(state)
    bar.close()
    model.load_state_dict(state.best_weights, strict=False)
    model.eval()
    return state
