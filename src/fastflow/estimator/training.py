"""Training the flows: a plain PyTorch loop on cached backbone features.

The backbone is frozen and images are not augmented, so its features
(``FastFlowModel.extract`` of the uint8 pixels, the same path inference takes) are computed
once and reused every epoch; this makes an epoch cost only the flows. The model trains on its
own device (``TrainConfig.device``); the caches stay in CPU memory or on disk, and each batch
moves to the device as it is used. Model selection uses
the NLL on held-out *normal* images, never a test metric: the best epoch's weights are kept,
and training stops once that NLL has not improved for ``patience`` epochs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from fastflow.core.errors import FastFlowError, is_integer, is_real, require
from fastflow.core.hardware import DEVICE_CHOICES, cpu_has_native_bf16, is_device_name
from fastflow.estimator import distributed
from fastflow.estimator.augment import image_generator, noisy_copy
from fastflow.estimator.feature_cache import FeatureCache
from fastflow.model.config import REFERENCE_EPOCHS, Recipe
from fastflow.model.fastflow import FastFlowModel
from fastflow.model.scoring import nll_loss

__all__ = [
    "FLOW_PRECISIONS",
    "BatchNll",
    "TrainConfig",
    "TrainState",
    "channel_noise_scales",
    "extract_features",
    "fit_flows",
    "learning_rate",
    "resolve_flow_precision",
    "resolve_micro_batch_size",
]


_log = logging.getLogger(__name__)

FLOW_PRECISIONS = ("auto", "float32", "bfloat16")


# Feature elements one forward/backward pass of the flows may take: 8 images of resnet18 at
# 256x256 (458,752 elements each), the micro-batch that kept its training on thousands of images
# at a low, flat peak RSS (measured: docs/measurements.md#micro-batch-memory).
MICRO_BATCH_ELEMENTS = 8 * 458_752


def resolve_micro_batch_size(
    requested: int | None, flow_shapes: Iterable[tuple[int, ...]], batch_size: int
) -> int:
    """Images per forward/backward pass: ``requested``, or (None) the fewest equal passes over a
    batch of ``batch_size`` that each stay within ``MICRO_BATCH_ELEMENTS`` feature elements (at
    least one image a pass).

    Why automatic: the flows' activations grow with the feature elements of a pass, and their
    many small operations run faster in fewer, larger passes, so one fixed count wastes either the
    speed of small models or the memory of large ones. At 256x256 and batch 32: resnet18 8 images
    a pass, Lite0 (167,936 elements an image) 16, wide_resnet50_2 (1,835,008) 2.
    """
    if requested is not None:
        return requested
    per_image = sum(math.prod(shape) for shape in flow_shapes)
    passes = math.ceil(batch_size / max(1, MICRO_BATCH_ELEMENTS // per_image))
    return math.ceil(batch_size / passes)


def resolve_flow_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` -> bfloat16 where the hardware computes it natively (AMX or AVX-512 bf16 on a CPU,
    bf16 support on a GPU), float32 elsewhere, where bf16 would be emulated and slower; else as given.

    bf16 flows kept the scores where checked (bottle AUROC and the robustness benchmark against
    float32 at equal epochs; docs/measurements.md#bf16-training) and train several times faster.
    """
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings: Adam, lr 1e-3, wd 1e-5 as in the reference; batch size and length
    left to the recipe (``Recipe.batch_size``, ``Recipe.step_budget``) unless given here.

    Invalid values raise ``FastFlowError`` at construction, naming the setting and its valid
    range, so a bad option stops a run before any image is read.
    """

    # None: the recipe's step budget in epochs of the training split (``resolve_budget``).
    max_epochs: int | None = None
    batch_size: int | None = None  # None: the recipe's
    # Images per forward/backward pass: a batch's gradients are summed over its micro-batches, so
    # this bounds the memory of the flows' activations, which grows with every image of a pass
    # (measured: docs/measurements.md#micro-batch-memory), without changing what is learnt (up to
    # float rounding). None: as many images as fit MICRO_BATCH_ELEMENTS (resolve_micro_batch_size).
    micro_batch_size: int | None = None
    lr: float = 1e-3
    weight_decay: float = 1e-5
    patience: int = 10
    min_delta: float = 1e-3  # held-out NLL gain (nats per feature element) that counts as progress
    seed: int = 0
    # Arithmetic of the flows' training passes: "bfloat16" (autocast) is several times faster on
    # CPUs with AMX or AVX-512 bf16; held-out NLL, selection and the saved model stay float32.
    # "auto": bfloat16 where the hardware has it (resolve_flow_precision).
    flow_precision: str = "auto"
    # Where the backbone pass and the flows run: "auto" (a CUDA GPU where PyTorch sees one, else
    # the CPU), "cpu", "cuda" or "cuda:N" (fastflow.core.hardware.resolve_device). The fitted model
    # comes back on the CPU either way, as a loaded one does.
    device: str = "auto"

    def __post_init__(self) -> None:
        checks = {
            "max_epochs": (
                self.max_epochs is None or (is_integer(self.max_epochs) and self.max_epochs >= 1),
                "an integer >= 1 or None (the recipe's step budget)",
            ),
            "batch_size": (
                self.batch_size is None or (is_integer(self.batch_size) and self.batch_size >= 1),
                "an integer >= 1 or None (the recipe's)",
            ),
            "micro_batch_size": (
                self.micro_batch_size is None
                or (is_integer(self.micro_batch_size) and self.micro_batch_size >= 1),
                "an integer >= 1 or None (automatic)",
            ),
            "lr": (is_real(self.lr) and self.lr > 0, "a number > 0"),
            "weight_decay": (is_real(self.weight_decay) and self.weight_decay >= 0, "a number >= 0"),
            "patience": (is_integer(self.patience) and self.patience >= 1, "an integer >= 1"),
            "min_delta": (is_real(self.min_delta) and self.min_delta >= 0, "a number >= 0"),
            "seed": (is_integer(self.seed) and self.seed >= 0, "an integer >= 0"),
            "flow_precision": (self.flow_precision in FLOW_PRECISIONS, " or ".join(FLOW_PRECISIONS)),
            "device": (is_device_name(self.device), DEVICE_CHOICES),
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


def resolve_budget(config: TrainConfig, recipe: Recipe, count: int) -> TrainConfig:
    """``config`` with its open batch size and epoch count filled in from ``recipe`` for a
    training split of ``count`` images.

    The recipe's budget counts optimiser steps, not epochs: the flows' fit depends on how many
    updates they get, and an epoch of 1,000 images is ten times one of 100. Epochs are the steps
    rounded up to whole epochs (at least one), so held-out selection still runs once an epoch.
    """
    batch_size = recipe.batch_size if config.batch_size is None else config.batch_size
    epochs = config.max_epochs
    if epochs is None:
        steps_per_epoch = math.ceil(max(count, 1) / batch_size)
        budget = recipe.step_budget
        epochs = REFERENCE_EPOCHS if budget is None else max(1, math.ceil(budget / steps_per_epoch))
    return dataclasses.replace(config, batch_size=batch_size, max_epochs=epochs)


def learning_rate(schedule: str, peak: float, step: int, total_steps: int) -> float:
    """The learning rate of optimiser step ``step`` (from 0) of ``total_steps``.

    ``"constant"``: ``peak`` throughout (the reference). ``"cosine"``: ``peak`` decayed along half a
    cosine to 0 at the end of the epoch budget, so the flows settle by the budget's last epochs
    instead of still moving at full speed when the budget ends. A function of the step alone, so
    a resumed run continues the same schedule.
    """
    if schedule == "constant":
        return peak
    return peak * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))


def extract_features(
    model: FastFlowModel,
    batches: Iterable[tuple[list[int], Tensor]],
    cache: FeatureCache,
    noisy: FeatureCache | None = None,
    sigma: float = 0.0,
    seed: int = 0,
    desc: str = "features",
    jpeg_quality: int = 0,
    jpeg_share: float = 1.0,
) -> None:
    """Write the raw backbone features of every (positions, uint8 pixels) batch into ``cache``.

    With ``noisy``, the same images with pixel noise of ``sigma`` grey levels go into it from the
    same pass, each image decoded once for both; with ``jpeg_quality``, a ``jpeg_share`` of the
    noisy images then take a JPEG round trip at that quality (``fastflow.estimator.augment.noisy_copy``).
    Each image's noise (and whether it is compressed) is drawn from its own generator
    (``image_generator(seed, position)``), so it does not depend on how the images are batched
    or shared between processes, and another ``seed`` draws other noise.
    """
    device = _device_of(model)
    for positions, pixels in tqdm(
        batches, desc=desc, leave=False, unit="batch", disable=not distributed.is_main()
    ):
        cache.write(positions, model.extract(pixels.to(device)))
        if noisy is not None:
            # Noise drawn on the CPU: the same noisy images whatever the training device.
            noisy_pixels = torch.stack(
                [
                    noisy_copy(
                        image,
                        sigma,
                        image_generator(seed, position),
                        jpeg_quality,
                        jpeg_share,
                    )
                    for image, position in zip(pixels, positions, strict=True)
                ]
            )
            noisy.write(positions, model.extract(noisy_pixels.to(device)))


def _device_of(model: nn.Module) -> torch.device:
    """The device ``model``'s parameters are on (where its batches must go)."""
    return next(model.parameters()).device


def channel_noise_scales(features: FeatureCache, fraction: float) -> list[Tensor]:
    """Per scale, ``fraction`` x each channel's std over all images and positions, shaped (1, C, 1, 1).

    Why noise at all: clean features of normal images lie close to a thin manifold, and maximum
    likelihood then teaches the flow to expand the directions of tiny variance, so a change no
    inspector sees (a grey level of sensor noise, bf16 rounding) becomes a large ||z||^2. Noise
    of a known size in every direction bounds how far the flow can expand any of them.
    """
    return [fraction * std for std in features.channel_std()]


class BatchNll(nn.Module):
    """Summed per-image NLL of a batch of raw features through ``model``'s norms and flows.

    A module, so that ``DistributedDataParallel`` can wrap it and all-reduce the gradients of
    the flows (the frozen backbone has none).
    """

    def __init__(self, model: FastFlowModel, exact: bool, precision: str = "float32") -> None:
        super().__init__()
        self.model, self.exact, self.precision = model, exact, precision

    def forward(self, features: list[Tensor]) -> Tensor:
        # bfloat16 runs the flows' convolutions under autocast; the loss is summed in float32.
        autocast = (
            torch.autocast(features[0].device.type, dtype=torch.bfloat16)
            if self.precision == "bfloat16"
            else contextlib.nullcontext()
        )
        with autocast:
            zs, log_dets = self.model.flow(features, with_norm_log_det=self.exact)
        # Unfolded flows always return their log-determinants (only folded ones return None).
        dets = [d.float() for d in log_dets if d is not None]
        return nll_loss([z.float() for z in zs], dets, reduction="sum")


def _evaluate_nll(model: FastFlowModel, features: FeatureCache, batch_size: int, exact: bool) -> float:
    """Mean per-image NLL on held-out features (eval mode, no gradients); each rank scores its
    contiguous share and the sums are added, so every rank gets the same number."""
    model.eval()
    loss, device = BatchNll(model, exact), _device_of(model)
    count, ranks = len(features), distributed.world_size()
    share = math.ceil(count / ranks)
    first, last = distributed.rank() * share, min(count, (distributed.rank() + 1) * share)
    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for start in range(first, last, batch_size):
            batch = [f.to(device) for f in features.slice(start, min(start + batch_size, last))]
            total += loss(batch).double().cpu()
    return distributed.all_reduce_sum(total).item() / count


def _per_position(model: FastFlowModel, nll: float) -> float:
    """NLL per feature element, a scale-free number for progress bars and logs."""
    elements = sum(math.prod(shape) for shape in model.flow_shapes)
    return nll / elements


def _training_batch(
    positions: Tensor,
    features: FeatureCache,
    noisy_features: FeatureCache | None,
    noise_scales: list[Tensor],
    generator: torch.Generator,
    device: torch.device,
) -> list[Tensor]:
    """This rank's share (every ``world_size``-th image) of one global batch, with its training
    noise, on ``device``.

    The random draws (which images are taken noisy, the feature noise) are made on the CPU for
    the whole global batch on every rank and then shared out, so N processes, on any device,
    train on exactly the batches one process would.
    """
    ranks, me = distributed.world_size(), distributed.rank()
    mine = positions[me::ranks]
    batch = features.read(mine)
    if noisy_features is not None:
        take_noisy = (torch.rand(len(positions), generator=generator) < 0.5)[me::ranks]
        if take_noisy.any():
            for clean, noisy in zip(batch, noisy_features.read(mine[take_noisy]), strict=True):
                clean[take_noisy] = noisy
    batch = [f.to(device) for f in batch]
    for index, scale in enumerate(noise_scales):
        noise = torch.randn((len(positions), *batch[index].shape[1:]), generator=generator)[me::ranks]
        batch[index] = batch[index] + (scale * noise).to(device)
    return batch


def _accumulate_gradients(
    loss_of: nn.Module, batch: list[Tensor], micro_batch_size: int, weight: float
) -> Tensor:
    """Backward ``weight`` x the summed NLL of ``batch``, one micro-batch at a time; returns that loss.

    ``weight`` is (processes / global batch size): DDP averages the processes' gradients, which
    brings the sum back to the global batch mean. Under DDP only the last micro-batch
    all-reduces (``no_sync`` before it); a process with no image in the batch still runs one
    (empty) pass, so every process takes part in that all-reduce.
    """
    count = batch[0].shape[0]
    starts = list(range(0, max(count, 1), micro_batch_size))
    total = torch.zeros((), dtype=torch.float64)
    for index, start in enumerate(starts):
        last = index == len(starts) - 1
        sync = (
            contextlib.nullcontext()
            if last or not isinstance(loss_of, DistributedDataParallel)
            else loss_of.no_sync()
        )
        with sync:
            loss = loss_of([f[start : start + micro_batch_size] for f in batch]) * weight
            loss.backward()
        total += loss.detach().double().cpu()
    return total


def fit_flows(
    model: FastFlowModel,
    train_features: FeatureCache,
    val_features: FeatureCache,
    config: TrainConfig,
    exact_nll: bool = True,
    feature_noise: float = 0.0,
    noisy_features: FeatureCache | None = None,
    state: TrainState | None = None,
    on_epoch_end: Callable[[TrainState], None] | None = None,
    progress: bool = True,
    lr_schedule: str = "constant",
) -> TrainState:
    """Train ``model``'s norms and flows on cached features; load the best weights at the end.

    The model trains on the device it is on (its batches are moved there). Under
    ``torch.distributed`` (``fastflow.estimator.distributed``) every rank runs this with the same caches
    and seed: each takes every N-th image of each global batch of ``config.batch_size``,
    gradients are all-reduced by ``DistributedDataParallel`` (each rank's loss is its share of
    the global batch mean), and the held-out NLL is summed over ranks, so every rank selects
    the same epoch and stops at the same time as one process would.

    Args:
        model: the model; only its non-backbone parameters are trained.
        train_features / val_features: features of normal images (``extract_features``).
        config: optimisation and stopping settings, batch size and epochs filled in (``resolve_budget``).
        exact_nll: train on the exact NLL (``Recipe.exact_nll``), else the reference loss.
        feature_noise: std of the Gaussian noise added to each training batch's features, as a
            fraction of each channel's std over ``train_features`` (``Recipe.feature_noise``).
        noisy_features: features of the same training images with pixel noise
            (``Recipe.pixel_noise``); each epoch every image is taken clean or noisy at random.
        state: a previous ``TrainState`` to resume from (weights already loaded in ``model``).
        on_epoch_end: called after each epoch (e.g. to write a resumable checkpoint).
        progress: show a progress bar with the loss.
        lr_schedule: how the learning rate moves over the epoch budget (``learning_rate``;
            ``Recipe.lr_schedule``).

    Raises:
        FastFlowError: when the loss becomes NaN or infinite, or a global batch is smaller
            than the number of processes.
    """
    if config.batch_size is None or config.max_epochs is None:
        raise ValueError("fit_flows needs a batch size and an epoch count: resolve_budget fills them in")
    ranks = distributed.world_size()
    if config.batch_size < ranks:
        raise FastFlowError(
            f"--batch-size {config.batch_size} is smaller than the {ranks} processes; use at least {ranks}"
        )
    state = state or TrainState()
    parameters = [p for name, p in model.named_parameters() if not name.startswith("backbone.")]
    optimizer = torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)
    if state.optimizer is not None:
        optimizer.load_state_dict(state.optimizer)
    device = _device_of(model)
    precision = resolve_flow_precision(config.flow_precision, device)
    micro_batch_size = resolve_micro_batch_size(config.micro_batch_size, model.flow_shapes, config.batch_size)
    _log.info(
        "flows train on %s in %s (--flow-precision %s), %d images a forward/backward pass",
        device,
        precision,
        config.flow_precision,
        micro_batch_size,
    )
    loss_of: nn.Module = BatchNll(model, exact_nll, precision)
    if ranks > 1:
        # Ranks hold identical frozen backbones: no buffer broadcast at every step (DDP's one at the start only).
        # Gradients as views of DDP's buckets: no copy, and no stride mismatch with channels-last weights.
        loss_of = DistributedDataParallel(
            loss_of,
            device_ids=[device.index] if device.type == "cuda" else None,
            process_group=distributed.group(device),
            forward_sync_buffers=False,
            gradient_as_bucket_view=True,
        )
    generator = torch.Generator()
    noise_scales = channel_noise_scales(train_features, feature_noise) if feature_noise > 0 else []
    count = len(train_features)
    steps_per_epoch = math.ceil(count / config.batch_size)
    show = progress and distributed.is_main()
    bar = tqdm(total=config.max_epochs, initial=state.epoch, desc="train", unit="epoch", disable=not show)
    while state.epoch < config.max_epochs and state.epochs_without_progress < config.patience:
        model.train()
        # Reseeded every epoch, so a resumed run draws the same batches as an uninterrupted one.
        order = torch.randperm(count, generator=generator.manual_seed(config.seed + state.epoch))
        losses = []
        for index, start in enumerate(range(0, count, config.batch_size)):
            positions = order[start : start + config.batch_size]
            step = state.epoch * steps_per_epoch + index
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(lr_schedule, config.lr, step, config.max_epochs * steps_per_epoch)
            batch = _training_batch(
                positions, train_features, noisy_features, noise_scales, generator, device
            )
            optimizer.zero_grad(set_to_none=True)
            loss = _accumulate_gradients(loss_of, batch, micro_batch_size, ranks / len(positions))
            batch_nll = distributed.all_reduce_sum(loss / ranks).item()
            if not math.isfinite(batch_nll):
                raise FastFlowError(
                    f"training loss became {batch_nll} at epoch {state.epoch + 1}; the flows diverged: "
                    "lower --lr, or check that the training images are normal, readable and not blank"
                )
            optimizer.step()
            losses.append(batch_nll)
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
    if state.best_weights is not None:
        model.load_state_dict(state.best_weights, strict=False)
    model.eval()
    return state
