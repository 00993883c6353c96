"""Model configurations and the table of published presets.

A preset is data, not code: adding a backbone means adding one row to ``PRESETS``, and every
parametrized test then covers it. Any timm CNN that is not in the table still works through
``get_config``, which falls back to the generic CNN recipe (``features_only`` at ``layers``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from fastflow.core.errors import FastFlowError, is_integer, is_real, require
from fastflow.model.flow import PERMUTATIONS
from fastflow.model.scoring import blur_radius, score_latents
from fastflow.model.tiling import ALIGN

__all__ = [
    "PRESETS",
    "RECIPES",
    "REFERENCE_EPOCHS",
    "FastFlowConfig",
    "Recipe",
    "get_config",
    "get_recipe",
    "input_size_for",
    "list_presets",
    "median_aspect",
]


@dataclass(frozen=True)
class FastFlowConfig:
    """Everything that defines a FastFlow model's architecture (scoring lives in ``Recipe``).

    Args:
        backbone: timm model name.
        layers: CNN stage indices (timm ``out_indices``) or, for vision transformers, the
            block indices whose tokens (after the final norm) feed the flows.
        input_size: model input ``(height, width)``; any size, square or not.
        flow_steps: coupling steps per flow.
        hidden_ratio: subnet hidden channels = ``hidden_ratio`` x subnet input channels.
        conv3x3_only: use 3x3 kernels in every step instead of alternating 3x3 / 1x1.
        clamp: soft clamp of the coupling log-scale, ``clamp * tanh(0.1 * s)``.
        context_pool: each feature position averaged with its ``k`` x ``k`` neighbours before
            the norm (odd ``k``; 1: none, as in the paper). ``fastflow.model.context`` says why.
        fuse_scales: bring the deeper scales to the finest grid and join them (after their
            norms), so one flow models all scales; False: one flow per scale (paper).
        positional_channels: channels of a sinusoidal positional encoding given to every
            coupling subnet as a condition (a multiple of 4; 0: none, as in the paper).
        permutation: each coupling step's channel permutation: ``"random"`` (the paper's) or
            ``"swap"`` (the two halves trade places), which folded inference runs without a
            channel gather (``fastflow.model.flow.CouplingStep``).
        tile: side, in input pixels, of the square tiles the backbone sees (0: the whole input
            at once). With tiles, ``input_size`` is the whole working image's size: the
            backbone's features of the tiles are stitched into one grid of the whole image,
            which the flows and the scorer see as they would an untiled one
            (``fastflow.model.tiling``). A multiple of 32, at most each side of ``input_size``
            (itself then multiples of 32); CNN backbones only.
        tile_overlap: pixels shared by neighbouring tiles, whose features are blended across
            them (a multiple of 32 below ``tile``; 0 without tiles).
    """

    backbone: str
    layers: tuple[int, ...] = (1, 2, 3)
    input_size: tuple[int, int] = (256, 256)
    flow_steps: int = 8
    hidden_ratio: float = 1.0
    conv3x3_only: bool = False
    clamp: float = 2.0
    context_pool: int = 1
    fuse_scales: bool = False
    positional_channels: int = 0
    permutation: str = "random"
    tile: int = 0
    tile_overlap: int = 0

    def __post_init__(self) -> None:
        # Normalise lists from JSON/YAML into tuples so configs compare and hash equal.
        object.__setattr__(self, "layers", _int_tuple("layers", self.layers))
        object.__setattr__(self, "input_size", _int_tuple("input_size", self.input_size))
        require(
            len(self.input_size) == 2 and min(self.input_size) >= 16,
            "input_size",
            "(height, width), both >= 16",
            self.input_size,
        )
        require(bool(self.layers), "layers", "at least one backbone stage or block", self.layers)
        require(
            is_integer(self.flow_steps) and self.flow_steps >= 1,
            "flow_steps",
            "an integer >= 1",
            self.flow_steps,
        )
        require(
            is_real(self.hidden_ratio) and self.hidden_ratio > 0,
            "hidden_ratio",
            "a number > 0",
            self.hidden_ratio,
        )
        require(is_real(self.clamp) and self.clamp > 0, "clamp", "a number > 0", self.clamp)
        require(
            is_integer(self.context_pool) and self.context_pool >= 1 and self.context_pool % 2 == 1,
            "context_pool",
            "an odd integer >= 1",
            self.context_pool,
        )
        require(isinstance(self.fuse_scales, bool), "fuse_scales", "true or false", self.fuse_scales)
        require(
            is_integer(self.positional_channels)
            and self.positional_channels >= 0
            and self.positional_channels % 4 == 0,
            "positional_channels",
            "a multiple of 4 >= 0",
            self.positional_channels,
        )
        require(self.permutation in PERMUTATIONS, "permutation", " or ".join(PERMUTATIONS), self.permutation)
        self._check_tiling()

    def _check_tiling(self) -> None:
        """Tiles and their overlaps in whole multiples of 32 px (``tiling.ALIGN``): the CNN
        presets' feature strides are 4, 8, 16 and 32 (timm's ``feature_info.reduction()`` of
        resnet18, wide_resnet50_2 and tf_efficientnet_lite0), so then every scale's cells of a
        tile fall exactly on cells of the whole image's grid. (CNN backbones only: checked where
        the backbone is known, ``FastFlowModel``.)"""
        require(
            is_integer(self.tile) and (self.tile == 0 or (self.tile >= ALIGN and self.tile % ALIGN == 0)),
            "tile",
            f"0 (no tiling) or a multiple of {ALIGN}",
            self.tile,
        )
        require(
            is_integer(self.tile_overlap) and self.tile_overlap >= 0 and self.tile_overlap % ALIGN == 0,
            "tile_overlap",
            f"a multiple of {ALIGN} >= 0",
            self.tile_overlap,
        )
        if self.tile == 0:
            require(self.tile_overlap == 0, "tile_overlap", "0 without tiling (tile 0)", self.tile_overlap)
            return
        require(self.tile_overlap < self.tile, "tile_overlap", f"below tile ({self.tile})", self.tile_overlap)
        require(
            all(side % ALIGN == 0 for side in self.input_size),
            "input_size",
            f"multiples of {ALIGN} with tiling (tile {self.tile}), the whole working size, e.g. "
            f"{tuple(-(-side // ALIGN) * ALIGN for side in self.input_size)}",
            self.input_size,
        )
        require(
            self.tile <= min(self.input_size),
            "tile",
            f"at most each side of input_size {self.input_size}",
            self.tile,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return _as_json(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FastFlowConfig:
        """Inverse of ``to_dict``; unknown keys are an error so a typo never goes unnoticed."""
        return _from_dict(cls, data)


def _int_tuple(name: str, values: Any) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in values)
    except (TypeError, ValueError):
        raise FastFlowError(f"{name} must be a list of integers, got {values!r}") from None


def _as_json(config: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def _from_dict(cls: type, data: dict[str, Any]) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise FastFlowError(f"unknown {cls.__name__} keys {sorted(unknown)}; valid keys: {sorted(known)}")
    return cls(**data)


# The architecture fields a recipe may set (``Recipe.architecture``): context for the flows,
# never the backbone, its layers or the input size, which belong to the user's model.
CONTEXT_OPTIONS = ("context_pool", "fuse_scales", "positional_channels", "permutation")
# How the learning rate moves over the epoch budget (``fastflow.estimator.training.learning_rate``).
LR_SCHEDULES = ("constant", "cosine")
# Epochs a recipe without a step budget trains for (the reference's fixed length).
REFERENCE_EPOCHS = 100

PRESETS: dict[str, FastFlowConfig] = {
    # The paper's official ResNet-18 configuration (3x3 kernels only).
    "resnet18": FastFlowConfig("resnet18", (1, 2, 3), (256, 256), 8, 1.0, conv3x3_only=True),
    "wide_resnet50_2": FastFlowConfig("wide_resnet50_2", (1, 2, 3), (256, 256), 8, 1.0),
    # Vision transformers: one scale, tokens after block 7 (DeiT) / 40 (CaiT) + final norm (paper Table 6).
    "deit_base_distilled_patch16_384": FastFlowConfig(
        "deit_base_distilled_patch16_384", (7,), (384, 384), 20, 0.16
    ),
    "cait_m48_448": FastFlowConfig("cait_m48_448", (40,), (448, 448), 20, 0.16),
    # Beyond the reference: a light CNN whose ImageNet weights ship with the project's tests.
    "tf_efficientnet_lite0": FastFlowConfig("tf_efficientnet_lite0", (1, 2, 3), (256, 256), 8, 1.0),
}


@dataclass(frozen=True)
class Recipe:
    """How a model is trained and scored, on top of its architecture; saved in the model file.

    The defaults are the improved recipe, chosen on painted defects of held-out normal images
    (``benchmarks/recipe_study.py``; its training noise with ``benchmarks/robust_study.py``),
    never on test images.

    Args:
        name: the recipe's name in ``RECIPES`` (or a user's own label).
        exact_nll: train on the exact NLL of the normalised features, counting the LayerNorm
            affine's log-determinant. The reference loss omits it and so rewards shrinking the
            LayerNorm scale, a direction that lowers the NLL without modelling the features better.
        feature_noise: during training, Gaussian noise of this many standard deviations (each
            channel's, over the training features) is added to every batch of backbone features,
            so the flow cannot learn to expand directions in which normal features barely vary
            (``fastflow.estimator.training.channel_noise_scales``). 0: none, as in the reference.
        pixel_noise: std, in grey levels, of sensor-like Gaussian noise added to a second copy
            of every training image (features cached for both); each epoch every image is seen
            clean or noisy at random. Without it a flow trained on camera-clean images learns to
            expand the directions in which they barely vary, and one grey level of sensor noise
            (or bf16 rounding) then looks like a defect. 0: no noisy copy, as in the reference.
        pixel_jpeg: JPEG quality of a round trip the noisy copy takes after its noise (0: none),
            as a camera compresses what its sensor saw, so that compression does not look like a
            defect either.
        pixel_jpeg_share: share of the noisy copies that take the JPEG round trip (each image's
            own draw); the others stay plain noisy, so sensor noise is still seen uncompressed.
        map_sigma: standard deviation, in input pixels, of a Gaussian blur of the anomaly map
            (0: none). Its radius ``blur_radius(map_sigma)`` must stay inside the map.
        score_top: share of the anomaly map's highest pixels averaged into the image score
            (0: the map's maximum).
        lr_schedule: ``"constant"`` learning rate (the reference) or ``"cosine"`` decay to 0 at
            the end of the epoch budget (``fastflow.estimator.training.learning_rate``), so the
            flows settle before the budget ends instead of moving at full speed to its last step.
        batch_size: training images per optimiser step, where ``TrainConfig`` leaves it open.
        step_budget: optimiser steps a training run takes, where ``TrainConfig`` gives no epoch
            count: converted into epochs of the training split (``resolve_budget``), so a dataset
            of 100 images and one of 1,000 get the same number of updates and the same schedule,
            and time to a model stops growing with the folder. ``None``: the reference's fixed
            ``REFERENCE_EPOCHS``.
        input_size_from_data: when a detector is built from a CNN's name without an input size,
            give the model the training images' aspect ratio at the preset's pixel count
            (``input_size_for``) instead of squeezing every image to the preset's square: a
            1130x460 photograph squeezed to 256x256 loses 4.4x of its width, and small defects
            with it. False: the preset's size, as in the paper. Only ``fit`` reads it: a saved
            model holds the size it was trained at.
        architecture: context options of ``FastFlowConfig`` (``CONTEXT_OPTIONS``) this recipe
            puts on top of a backbone's preset when a detector is built from a backbone name;
            options given to the detector win, and a whole ``FastFlowConfig`` is used as given.
            The default, a 16-channel sinusoidal position given to every coupling subnet, lets the
            flow learn that a part's rim and its centre look different: on validation
            (``benchmarks/robust_study.py``) it lifted pixel AUROC and AUPRO and shrank the worst
            drop under shift and JPEG, for little extra inference time (measured:
            docs/measurements.md#positional-condition).
            Empty: the preset's architecture, as in the paper.
        description: one line for ``fastflow presets``.
    """

    name: str = "improved"
    exact_nll: bool = True
    feature_noise: float = 0.1
    pixel_noise: float = 3.0
    pixel_jpeg: int = 75
    pixel_jpeg_share: float = 0.25
    map_sigma: float = 4.0
    score_top: float = 0.001
    lr_schedule: str = "cosine"
    batch_size: int = 8
    step_budget: int | None = 1000
    input_size_from_data: bool = True
    architecture: dict[str, Any] = field(default_factory=lambda: {"positional_channels": 16})
    description: str = ""

    def __post_init__(self) -> None:
        require(isinstance(self.exact_nll, bool), "exact_nll", "true or false", self.exact_nll)
        require(
            is_real(self.feature_noise) and self.feature_noise >= 0,
            "feature_noise",
            "a number >= 0",
            self.feature_noise,
        )
        require(
            is_real(self.pixel_noise) and self.pixel_noise >= 0,
            "pixel_noise",
            "a number >= 0 (grey levels)",
            self.pixel_noise,
        )
        require(
            isinstance(self.pixel_jpeg, int)
            and not isinstance(self.pixel_jpeg, bool)
            and (self.pixel_jpeg == 0 or 1 <= self.pixel_jpeg <= 100),
            "pixel_jpeg",
            "0 (none) or a JPEG quality from 1 to 100",
            self.pixel_jpeg,
        )
        require(
            self.pixel_jpeg == 0 or self.pixel_noise > 0,
            "pixel_jpeg",
            "0 unless pixel_noise > 0 (the JPEG round trip is applied to the noisy copy)",
            self.pixel_jpeg,
        )
        require(
            is_real(self.pixel_jpeg_share) and 0 < self.pixel_jpeg_share <= 1,
            "pixel_jpeg_share",
            "in (0, 1]",
            self.pixel_jpeg_share,
        )
        require(is_real(self.map_sigma) and self.map_sigma >= 0, "map_sigma", "a number >= 0", self.map_sigma)
        require(is_real(self.score_top) and 0 <= self.score_top < 1, "score_top", "in [0, 1)", self.score_top)
        require(self.lr_schedule in LR_SCHEDULES, "lr_schedule", " or ".join(LR_SCHEDULES), self.lr_schedule)
        require(
            is_integer(self.batch_size) and self.batch_size >= 1,
            "batch_size",
            "an integer >= 1",
            self.batch_size,
        )
        require(
            self.step_budget is None or (is_integer(self.step_budget) and self.step_budget >= 1),
            "step_budget",
            "an integer >= 1 or None (REFERENCE_EPOCHS epochs)",
            self.step_budget,
        )
        require(
            isinstance(self.input_size_from_data, bool),
            "input_size_from_data",
            "true or false",
            self.input_size_from_data,
        )
        require(
            isinstance(self.architecture, dict) and set(self.architecture) <= set(CONTEXT_OPTIONS),
            "architecture",
            f"a mapping of {', '.join(CONTEXT_OPTIONS)}",
            self.architecture,
        )
        FastFlowConfig("any", **self.architecture)  # checks the values

    def check_fits(self, input_size: tuple[int, int]) -> None:
        """The blur reflects the map at its edges, which needs its radius inside the map."""
        require(
            blur_radius(self.map_sigma) < min(input_size),
            "map_sigma",
            f"below {min(input_size) / 4:g} for input size {tuple(input_size)} (4 x sigma inside the map)",
            self.map_sigma,
        )

    def score_latents(self, zs: list[Tensor], size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Latents -> (anomaly map (N, H, W) at ``size``, image score (N,)) the recipe's way."""
        return score_latents(zs, size, self.map_sigma, self.score_top)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return _as_json(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        """Inverse of ``to_dict``; unknown keys are an error. Training keys a file of an older
        fastflow lacks take the values it was trained with, so a refit of it trains the same way."""
        return _from_dict(cls, {**_BEFORE_TRAINING_KEYS, **data})


# Recipe keys added after model files existed, with the behaviour those files were trained with.
_BEFORE_TRAINING_KEYS: dict[str, Any] = {"lr_schedule": "constant", "batch_size": 32, "step_budget": None}

RECIPES: dict[str, Recipe] = {
    "improved": Recipe(
        "improved",
        description="exact NLL loss, trained on clean and noisy (sigma 3 grey levels; a quarter of them then "
        "JPEG-compressed at quality 75) copies of each image "
        "with feature noise 0.1 std, a 16-channel positional condition in every coupling, "
        "anomaly map blurred (sigma 4 px), image score = mean of the map's top 0.1%, "
        "input at the training images' aspect ratio (the preset's pixel count), "
        "1,000 steps of batch 8 with a cosine learning rate",
    ),
    # The paper / anomalib recipe, kept so published numbers can be reproduced.
    "reference": Recipe(
        "reference",
        exact_nll=False,
        feature_noise=0.0,
        pixel_noise=0.0,
        pixel_jpeg=0,
        map_sigma=0.0,
        score_top=0.0,
        lr_schedule="constant",
        batch_size=32,
        step_budget=None,
        input_size_from_data=False,
        architecture={},
        description="FastFlow paper and anomalib: loss without the norm's log-det, unblurred map, image score = map maximum, "
        "the preset's square input, batch 32 at a constant learning rate for 100 epochs",
    ),
    # The default until the step budget, kept so the results it was measured with can be reproduced.
    "improved-100-epochs": Recipe(
        "improved-100-epochs",
        lr_schedule="constant",
        batch_size=32,
        step_budget=None,
        description="the improved recipe as it was before the step budget: batch 32 at a constant learning rate "
        "for 100 epochs, whatever the number of images",
    ),
}


def get_recipe(recipe: str | Recipe) -> Recipe:
    """``recipe`` itself, or the recipe called so in ``RECIPES``; a clear error listing the valid names otherwise."""
    if isinstance(recipe, Recipe):
        return recipe
    if recipe not in RECIPES:
        raise FastFlowError(f"unknown recipe '{recipe}'; use one of {', '.join(RECIPES)}")
    return RECIPES[recipe]


def list_presets(pattern: str = "*") -> list[str]:
    """Preset names matching a shell-style ``pattern``, sorted."""
    return sorted(name for name in PRESETS if fnmatch.fnmatch(name, pattern))


def get_config(backbone: str, **overrides: Any) -> FastFlowConfig:
    """Config for ``backbone``: its preset if it has one, else the generic CNN config.

    ``overrides`` replace single fields (``input_size=(240, 320)``, ``flow_steps=4``); ``None``
    values are ignored so CLI options that were not given keep the preset's value.
    """
    base = PRESETS.get(backbone, FastFlowConfig(backbone))
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


def median_aspect(image_sizes: Sequence[tuple[int, int]]) -> float:
    """Median height / width of ``(height, width)`` sizes, taken on the logarithms so that 2:1 and
    1:2 weigh alike, and a few odd sizes in a folder do not move it (unlike a mean)."""
    require(
        len(image_sizes) > 0 and all(len(s) == 2 and min(s) > 0 for s in image_sizes),
        "image_sizes",
        "a non-empty list of positive (height, width)",
        image_sizes,
    )
    return math.exp(statistics.median(math.log(h / w) for h, w in image_sizes))


def input_size_for(
    image_sizes: Sequence[tuple[int, int]], pixels: int, multiple: int = 32
) -> tuple[int, int]:
    """Model input ``(height, width)`` for images of ``image_sizes`` (each ``(height, width)``):
    their median aspect ratio (``median_aspect``; a folder of mixed sizes gets one size, that of
    its typical image) at about ``pixels`` pixels, each side rounded to the nearest multiple of
    ``multiple`` (at least ``multiple``).

    Keeping the pixel count of the preset's square keeps the cost of an image (backbone pass,
    flows, cache) where it was, while a wide photograph keeps its proportions instead of being
    squeezed. Square images give the square back exactly: ``(256, 256)`` at 65,536 pixels.

    Why 32: the CNN presets' stages (1, 2, 3) have strides 4, 8 and 16 (timm's
    ``feature_info.reduction()`` of resnet18, wide_resnet50_2 and tf_efficientnet_lite0), and
    stage 4, which ``layers`` may add, 32. A side that is a multiple of a stage's stride is tiled
    exactly by its feature grid; otherwise the grid's last row or column lies partly on padding
    (250 px give 63 positions at stride 4, the last one half outside), and the map stretched back
    to the input no longer lines up. 16 would do for the default stages; 32 does for every stage
    of these backbones, and costs at most 16 px of exactness on a side.
    """
    require(is_integer(pixels) and pixels >= 1, "pixels", "an integer >= 1", pixels)
    require(is_integer(multiple) and multiple >= 1, "multiple", "an integer >= 1", multiple)
    aspect = median_aspect(image_sizes)
    height, width = math.sqrt(pixels * aspect), math.sqrt(pixels / aspect)
    return _round_to(height, multiple), _round_to(width, multiple)


def _round_to(side: float, multiple: int) -> int:
    return max(multiple, round(side / multiple) * multiple)
