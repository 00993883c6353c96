"""fastflow: unsupervised visual anomaly detection and localization with FastFlow.

A frozen pretrained backbone feeds per-scale 2D normalizing flows trained on normal images
only; the likelihood of each feature position becomes a pixel anomaly map and an image score.
"""

from fastflow.detector import FastFlow, Prediction
from fastflow.errors import FastFlowError
from fastflow.io import load_model, save_model
from fastflow.model.fastflow import FastFlowModel
from fastflow.presets import PRESETS, RECIPES, FastFlowConfig, Recipe, get_config, get_recipe, list_presets
from fastflow.train import TrainConfig

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "RECIPES",
    "FastFlow",
    "FastFlowConfig",
    "FastFlowError",
    "FastFlowModel",
    "Prediction",
    "Recipe",
    "TrainConfig",
    "get_config",
    "get_recipe",
    "list_presets",
    "load_model",
    "save_model",
]


def load(path: str) -> FastFlow:
    """Load a trained detector (a RUN folder or model.safetensors); shorthand for ``FastFlow.load``."""
    return FastFlow.load(path)
