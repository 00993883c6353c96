"""The inference graph: raw image pixels in, anomaly map, image score and label out.

``InferenceGraph`` is the one definition of inference. ``FastFlow`` runs it in Python (engine
"torch"), and ``fastflow.estimator.export`` traces this very module to ONNX and OpenVINO, so every
engine computes the same function: ``FastFlowModel.extract`` (resize + normalise -> frozen
backbone) -> ``FastFlowModel.flow`` (norms -> flows, latent ``z``) -> ``score_latents`` (the
recipe's anomaly map and image score) -> label (score above the calibrated threshold, which
is stored in the graph).
"""

from __future__ import annotations

from typing import cast

import numpy as np
import torch
from torch import Tensor, nn

from fastflow.model.config import Recipe
from fastflow.model.fastflow import FastFlowModel

__all__ = ["InferenceGraph", "float32_threshold"]


def float32_threshold(threshold: float) -> float:
    """The largest float32 <= ``threshold``: for float32 scores ``s``, ``s > it`` iff ``s > threshold``."""
    value = np.float32(threshold)
    if float(value) > threshold:
        value = np.nextafter(value, np.float32(-np.inf))
    return float(value)


class InferenceGraph(nn.Module):
    """Raw images -> (anomaly_map, score, label), the function every inference engine runs.

    Args:
        model: a trained ``FastFlowModel``, usually ``model.fold()`` (the same latents, less work).
        recipe: how latents become a map and a score (``map_sigma``, ``score_top``).
        threshold: calibrated deployment threshold; label = score > threshold.

    ``forward(images)``: (N, 3, H, W) RGB, uint8 or float with values 0..255, any H, W ->
    ``anomaly_map`` (N, height, width) float32 at the model's input size, ``score`` (N,) float32
    (higher = more anomalous), ``label`` (N,) int64 (1 = anomalous).
    """

    threshold: Tensor

    def __init__(self, model: FastFlowModel, recipe: Recipe, threshold: float) -> None:
        super().__init__()
        recipe.check_fits(model.config.input_size)
        self.model = model
        self.recipe = recipe
        self.input_size = cast("tuple[int, int]", tuple(model.config.input_size))
        self.threshold_value = float(threshold)  # as given; the buffer holds its float32 equivalent
        self.register_buffer("threshold", torch.tensor(float32_threshold(threshold), dtype=torch.float32))
        self.eval()

    def score_latents(self, zs: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Latents -> (anomaly_map (N, height, width), score (N,)) with the recipe's scorer."""
        return self.recipe.score_latents(zs, self.input_size)

    def label(self, score: Tensor) -> Tensor:
        """1 where ``score`` is above the stored threshold, else 0 (int64)."""
        return (score > self.threshold).to(torch.int64)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(N, 3, H, W) pixels 0..255 -> anomaly_map (N, height, width), score (N,), label (N,)."""
        zs, _ = self.model(images)
        amap, score = self.score_latents(zs)
        return amap, score, self.label(score)
