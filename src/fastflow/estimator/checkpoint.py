"""The resumable training checkpoint (``last.safetensors`` in a run folder).

A model file (``fastflow.estimator.model_file``) of the current weights, plus what training
needs to go on where it stopped: the best epoch's weights (``best.*`` tensors), the optimiser's
state (``optim.<parameter index>.<name>`` tensors and the ``param_groups`` in the metadata) and
the loop's ``TrainState`` numbers and history, with the training settings and the recipe. The
state is ``fastflow.estimator.training.TrainState``, which the training loop owns;
``FastFlow.fit(..., checkpoint=path)`` writes this file after every epoch and resumes from it.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from fastflow.core.errors import FastFlowError
from fastflow.estimator.model_file import build_model, read_model_file, save_model
from fastflow.estimator.training import TrainConfig, TrainState
from fastflow.model.config import FastFlowConfig, Recipe
from fastflow.model.fastflow import FastFlowModel

__all__ = ["load_checkpoint", "save_checkpoint"]


def save_checkpoint(
    path: Path, model: FastFlowModel, state: TrainState, training: TrainConfig, recipe: Recipe
) -> None:
    """Write the resumable checkpoint at ``path``, atomically: current weights, best weights,
    optimizer state and history, with the training settings and recipe it was trained with."""
    tensors = {f"best.{k}": v for k, v in (state.best_weights or {}).items()}
    optimizer = state.optimizer or {"state": {}, "param_groups": []}
    for index, values in optimizer["state"].items():
        for key, value in values.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value)
    extra = {
        "epoch": state.epoch,
        "best_epoch": state.best_epoch,
        "best_val_nll": state.best_val_nll if math.isfinite(state.best_val_nll) else None,
        "progress_epoch": state.progress_epoch,
        "progress_val_nll": state.progress_val_nll if math.isfinite(state.progress_val_nll) else None,
        "history": state.history,
        "param_groups": optimizer["param_groups"],
        "training": asdict(training),
        "recipe": recipe.to_dict(),
    }
    save_model(path, model, extra, tensors)


def load_checkpoint(path: Path, config: FastFlowConfig, recipe: Recipe) -> tuple[FastFlowModel, TrainState]:
    """Model and training state from a checkpoint written by ``save_checkpoint``; a
    ``FastFlowError`` if it was trained with another config, loss or training noise than
    ``config`` and ``recipe`` ask for."""
    saved_config, weights, extra, tensors = read_model_file(path)
    saved_recipe = Recipe.from_dict(extra["recipe"])

    def training_noise(r: Recipe) -> tuple:
        return r.exact_nll, r.feature_noise, r.pixel_noise, r.pixel_jpeg, r.pixel_jpeg_share

    if saved_config != config or training_noise(saved_recipe) != training_noise(recipe):
        raise FastFlowError(
            f"checkpoint {path} was trained with a different model config, loss or training noise ({saved_config}, {saved_recipe}); "
            "resume with the same options or use a new --output folder"
        )
    model = build_model(saved_config, weights, path)
    best = {k.removeprefix("best."): v for k, v in tensors.items() if k.startswith("best.")}
    optimizer_state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            optimizer_state.setdefault(int(index), {})[name] = value
    state = TrainState(
        epoch=extra["epoch"],
        best_epoch=extra["best_epoch"],
        best_val_nll=_finite_or_inf(extra["best_val_nll"]),
        progress_epoch=extra["progress_epoch"],
        progress_val_nll=_finite_or_inf(extra["progress_val_nll"]),
        history=extra["history"],
        best_weights=best or None,
        optimizer={"state": optimizer_state, "param_groups": extra["param_groups"]},
    )
    return model, state


def _finite_or_inf(value: float | None) -> float:
    """JSON has no infinity: ``None`` stands for "no value yet"."""
    return math.inf if value is None else float(value)
