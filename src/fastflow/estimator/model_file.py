"""Model files: safetensors tensors + JSON metadata, written atomically, never pickled.

One file holds everything needed to score offline: the backbone's weights (so loading never
touches a model hub), the flows, the architecture config and whatever the estimator stores
(threshold, training history). A format version guards against files from other releases.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from fastflow.core.errors import FastFlowError
from fastflow.core.files import atomic_write
from fastflow.model.backbones import RANDOM_WEIGHTS
from fastflow.model.config import FastFlowConfig
from fastflow.model.fastflow import FastFlowModel

__all__ = ["FORMAT_VERSION", "build_model", "load_model", "read_model_file", "save_model"]

FORMAT_VERSION = 4
_FORMAT_NAME = "fastflow-model"
# Format 3 kept the scoring settings in the model config and the loss in the training settings.
_SCORING_IN_CONFIG_VERSION = 3
# What a recipe written before a field existed did instead: no training noise, and the preset's
# input size (the file's config holds the size it was trained at either way).
_RECIPE_BEFORE_FIELDS = {
    "feature_noise": 0.0,
    "pixel_noise": 0.0,
    "pixel_jpeg": 0,
    "input_size_from_data": False,
}


def save_model(
    path: str | Path,
    model: FastFlowModel,
    extra: dict[str, Any] | None = None,
    tensors: dict[str, Tensor] | None = None,
) -> Path:
    """Write ``model`` (all weights + config) and JSON-able ``extra`` to ``path`` atomically.

    ``tensors`` adds named tensors beside the model's (e.g. optimizer state in a resumable
    training checkpoint); they come back from ``read_model_file``.
    """
    state = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    state.update({f"extra.{k}": v.detach().cpu().contiguous() for k, v in (tensors or {}).items()})
    metadata = {
        "format": _FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(model.config.to_dict()),
        "extra": json.dumps(extra or {}),
    }
    return atomic_write(Path(path), lambda tmp: save_file(state, str(tmp), metadata=metadata))


def read_model_file(
    path: str | Path,
) -> tuple[FastFlowConfig, dict[str, Tensor], dict[str, Any], dict[str, Tensor]]:
    """Validate and read a model file: (config, model state, extra metadata, extra tensors)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FastFlowError(
            f"model file {path} does not exist; pass a RUN folder or a .safetensors file from 'fastflow train'"
        )
    try:
        state = load_file(str(path))
        with open(path, "rb") as handle:
            header_size = int.from_bytes(handle.read(8), "little")
            metadata = json.loads(handle.read(header_size)).get("__metadata__", {})
    except (SafetensorError, OSError, ValueError) as error:
        raise FastFlowError(
            f"model file {path} is corrupt or not a safetensors file ({error}); retrain or copy the file again"
        ) from None
    if metadata.get("format") != _FORMAT_NAME:
        raise FastFlowError(
            f"{path} is not a fastflow model file; pass the model.safetensors written by 'fastflow train'"
        )
    version = metadata.get("format_version")
    if version not in (str(FORMAT_VERSION), str(_SCORING_IN_CONFIG_VERSION)):
        raise FastFlowError(
            f"model file {path} has format version {metadata.get('format_version')}, this fastflow reads "
            f"version {FORMAT_VERSION}; use the fastflow release that wrote it or retrain"
        )
    try:
        config_fields = json.loads(metadata["config"])
        extra = json.loads(metadata.get("extra", "{}"))
        if version == str(_SCORING_IN_CONFIG_VERSION):
            extra = _recipe_from_version_3(config_fields, extra)
        if "recipe" in extra:  # files written before training noise (or data-shaped inputs) existed had none
            extra["recipe"] = {**_RECIPE_BEFORE_FIELDS, **extra["recipe"]}
        config = FastFlowConfig.from_dict(config_fields)
    except (KeyError, ValueError, TypeError) as error:
        raise FastFlowError(f"model file {path} has a broken config ({error}); retrain the model") from None
    model_state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    extra_tensors = {k.removeprefix("extra."): v for k, v in state.items() if k.startswith("extra.")}
    return config, model_state, extra, extra_tensors


def _recipe_from_version_3(config_fields: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Move a format-3 file's scoring (config) and loss (training settings) into its recipe."""
    training = dict(extra.get("training", {}))
    recipe = {
        "name": str(extra.get("recipe", "improved")),
        "exact_nll": bool(training.pop("exact_nll", True) is not False),
        "map_sigma": config_fields.pop("map_sigma", 0.0),
        "score_top": config_fields.pop("score_top", 0.0),
    }
    return {**extra, "recipe": recipe, "training": training}


def load_model(path: str | Path) -> tuple[FastFlowModel, dict[str, Any]]:
    """Load a model file written by ``save_model``: the model (eval mode) and its extra metadata.

    Needs no network and no weights file: the backbone's weights are inside.
    """
    config, state, extra, _ = read_model_file(path)
    return build_model(config, state, path), extra


def build_model(config: FastFlowConfig, state: dict[str, Tensor], path: str | Path) -> FastFlowModel:
    """The model (eval mode) of ``read_model_file``'s config and state; ``path`` names the file in errors."""
    with torch.device("meta"):  # skip random init: every tensor comes from the file
        model = FastFlowModel(config, weights=RANDOM_WEIGHTS)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise FastFlowError(
            f"weights in model file {path} do not fit its config ({detail}); retrain the model"
        ) from None
    return model.use_channels_last().eval()
