"""fastflow: unsupervised visual anomaly detection and localization with FastFlow.

A frozen pretrained backbone feeds per-scale 2D normalizing flows trained on normal images
only; the likelihood of each feature position becomes a pixel anomaly map and an image score.
"""

from fastflow.core.errors import FastFlowError
from fastflow.estimator.detector import FastFlow, Prediction
from fastflow.estimator.engines import load_exported
from fastflow.estimator.export import check_parity, to_onnx, to_openvino, verify_export
from fastflow.estimator.model_file import load_model, save_model
from fastflow.estimator.training import TrainConfig
from fastflow.model.config import (
    PRESETS,
    RECIPES,
    FastFlowConfig,
    Recipe,
    get_config,
    get_recipe,
    list_presets,
)
from fastflow.model.fastflow import FastFlowModel

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
    "check_parity",
    "get_config",
    "get_recipe",
    "list_presets",
    "load_exported",
    "load_model",
    "save_model",
    "to_onnx",
    "to_openvino",
    "verify_export",
]


def load(path: str) -> FastFlow:
    """Load a trained detector (a RUN folder or model.safetensors); shorthand for ``FastFlow.load``."""
    return FastFlow.load(path)
