"""Model configurations and the table of published presets.

A preset is data, not code: adding a backbone means adding one row to ``PRESETS``, and every
parametrized test then covers it. Any timm CNN that is not in the table still works through
``get_config``, which falls back to the generic CNN recipe (``features_only`` at ``layers``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Any

from fastflow.errors import FastFlowError

__all__ = ["PRESETS", "RECIPES", "FastFlowConfig", "Recipe", "get_config", "get_recipe", "list_presets"]


@dataclass(frozen=True)
class FastFlowConfig:
    """Everything that defines a FastFlow model's architecture.

    Args:
        backbone: timm model name.
        layers: CNN stage indices (timm ``out_indices``) or, for vision transformers, the
            block indices whose tokens (after the final norm) feed the flows.
        input_size: model input ``(height, width)``; any size, square or not.
        flow_steps: coupling steps per flow.
        hidden_ratio: subnet hidden channels = ``hidden_ratio`` x subnet input channels.
        conv3x3_only: use 3x3 kernels in every step instead of alternating 3x3 / 1x1.
        clamp: soft clamp of the coupling log-scale, ``clamp * tanh(0.1 * s)``.
        score_top: share of the anomaly map's highest pixels averaged into the image score
            (0: the maximum, as in the reference).
        map_sigma: standard deviation, in input pixels, of a Gaussian blur of the anomaly map
            (0: none, as in the reference).
    """

    backbone: str
    layers: tuple[int, ...] = (1, 2, 3)
    input_size: tuple[int, int] = (256, 256)
    flow_steps: int = 8
    hidden_ratio: float = 1.0
    conv3x3_only: bool = False
    clamp: float = 2.0
    score_top: float = 0.001
    map_sigma: float = 4.0

    def __post_init__(self) -> None:
        # Normalise lists from JSON/YAML into tuples so configs compare and hash equal.
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        object.__setattr__(self, "input_size", tuple(int(i) for i in self.input_size))
        if len(self.input_size) != 2 or min(self.input_size) < 16:
            raise ValueError(f"input_size must be (height, width) with both >= 16, got {self.input_size}")
        if not self.layers:
            raise ValueError("layers must name at least one backbone stage or block")
        if self.flow_steps < 1:
            raise ValueError(f"flow_steps must be >= 1, got {self.flow_steps}")
        if self.hidden_ratio <= 0:
            raise ValueError(f"hidden_ratio must be > 0, got {self.hidden_ratio}")
        if self.clamp <= 0:
            raise ValueError(f"clamp must be > 0, got {self.clamp}")
        if not 0 <= self.score_top < 1:
            raise ValueError(f"score_top must be in [0, 1), got {self.score_top}")
        # The blur reflects the map at its edges, which needs the radius 4 sigma inside the map.
        if self.map_sigma < 0 or int(4 * self.map_sigma + 0.5) >= min(self.input_size):
            raise ValueError(f"map_sigma must be >= 0 and 4 x map_sigma below the input size, got {self.map_sigma}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FastFlowConfig:
        """Inverse of ``to_dict``; unknown keys are an error so a typo never goes unnoticed."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}; valid keys: {sorted(known)}")
        return cls(**data)


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
    # Stages 1-3 (strides 4-16); adding the stride-32 stage lost on faint painted textures
    # defects (benchmarks/recipe_study.py).
    "tf_efficientnet_lite0": FastFlowConfig("tf_efficientnet_lite0", (1, 2, 3), (256, 256), 8, 1.0),
}


@dataclass(frozen=True)
class Recipe:
    """A named bundle of settings on top of the presets.

    ``model``: ``FastFlowConfig`` fields (scoring) for every backbone; ``training``:
    ``TrainConfig`` fields. Features (layers, input size) stay with the presets.
    """

    description: str
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    training: dict[str, Any] = dataclasses.field(default_factory=dict)


RECIPES: dict[str, Recipe] = {
    # What the presets and the defaults of FastFlowConfig / TrainConfig hold; chosen on painted
    # defects of held-out normal images (benchmarks/recipe_study.py), never on test images.
    "improved": Recipe(
        "exact NLL loss, anomaly map blurred (sigma 4 px), image score = mean of the map's top 0.1%",
        model={"score_top": 0.001, "map_sigma": 4.0},
        training={"exact_nll": True},
    ),
    # The paper / anomalib recipe, kept so published numbers can be reproduced.
    "reference": Recipe(
        "FastFlow paper and anomalib: loss without the norm's log-det, unblurred map, image score = map maximum",
        model={"score_top": 0.0, "map_sigma": 0.0},
        training={"exact_nll": False},
    ),
}


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; a clear error listing the valid names otherwise."""
    if name not in RECIPES:
        raise FastFlowError(f"unknown recipe '{name}'; use one of {', '.join(RECIPES)}")
    return RECIPES[name]


def list_presets(pattern: str = "*") -> list[str]:
    """Preset names matching a shell-style ``pattern``, sorted."""
    return sorted(name for name in PRESETS if fnmatch.fnmatch(name, pattern))


def get_config(backbone: str, recipe: str = "improved", **overrides: Any) -> FastFlowConfig:
    """Config for ``backbone``: its preset if it has one, else the generic CNN recipe.

    ``recipe`` (``RECIPES``) sets its fields; ``overrides`` then replace single fields
    (``input_size=(240, 320)``, ``flow_steps=4``); ``None`` values are ignored so CLI options
    that were not given keep the preset's value.
    """
    base = PRESETS.get(backbone, FastFlowConfig(backbone))
    changes = {**get_recipe(recipe).model, **{k: v for k, v in overrides.items() if v is not None}}
    return dataclasses.replace(base, **changes)
