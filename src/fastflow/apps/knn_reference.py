"""The nearest-neighbour (kNN) reference the benchmark puts beside every fastflow result.

A reference, not a product feature: it answers "does the flow beat the plainest scorer on the
very same features?". Each test position's score is its distance to the nearest training
position in feature space (PatchCore without its coreset): the backbone's layers 2 and 3, each
position averaged with its 3x3 neighbours, the deeper layer upsampled to the finer grid and
concatenated. The map is upsampled to the input size and blurred as the fastflow recipe blurs
its own, and the image score is taken from the map as the recipe takes it, so the two differ in
the scorer alone.

The memory bank holds every position of every training image, unless that exceeds
``bank_limit``: then a seeded random subset of that size (said in the result), which keeps the
search time bounded on large datasets at the cost of slightly larger distances.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastflow.estimator.data import Sample, image_loader, load_samples
from fastflow.estimator.metrics import evaluate
from fastflow.model.backbones import Backbone
from fastflow.model.config import get_recipe
from fastflow.model.context import fuse_to_finest, local_average
from fastflow.model.preprocess import Preprocess
from fastflow.model.scoring import fuse_scales, image_score

__all__ = ["KnnReference", "knn_reference_metrics"]

# Timm feature indices of the two middle scales (strides 8 and 16 on ResNets and EfficientNets).
KNN_LAYERS = (2, 3)
# Queries x bank positions of one distance block: 1024 x 8192 floats (32 MiB), reused for every
# block, so the search neither allocates nor page-faults a fresh matrix each time (measured:
# docs/measurements.md#knn-search-blocks).
_QUERY_CHUNK = 1024
_BANK_CHUNK = 8192


@dataclass
class KnnReference:
    """Nearest-neighbour anomaly scorer on a backbone's layer-2/3 features.

    Args:
        backbone: a timm CNN name (``tf_efficientnet_lite0``, ``resnet18``, ...).
        weights: backbone weights (a local file, ``None`` for timm's hub, ``"random"`` in tests).
        input_size: (height, width) the images are resized to, as the fastflow model's.
        recipe: the fastflow recipe whose map blur and image score the reference copies.
        bank_limit: most training positions kept (a seeded random subset beyond it).
        batch_size: images per backbone pass.
    """

    backbone: str
    weights: str | Path | None
    input_size: tuple[int, int] = (256, 256)
    recipe: str = "improved"
    bank_limit: int = 300_000
    batch_size: int = 16

    def fit(self, samples: Sequence[Sample]) -> KnnReference:
        """Build the memory bank from the normal images among ``samples``."""
        self.extractor_ = Backbone(self.backbone, KNN_LAYERS, self.input_size, self.weights).eval()
        self.preprocess_ = Preprocess(self.input_size, self.extractor_.mean, self.extractor_.std)
        normal = [s for s in samples if s.label == 0]
        features = [self._features(batch["image"]) for batch in self._batches(normal)]
        bank = torch.cat([f.flatten(2).transpose(1, 2).reshape(-1, f.shape[1]) for f in features])
        self.bank_positions_ = len(bank)
        if len(bank) > self.bank_limit:
            keep = torch.randperm(len(bank), generator=torch.Generator().manual_seed(0))[: self.bank_limit]
            bank = bank[keep]
        self.bank_ = bank.contiguous()
        self.bank_norms_ = self.bank_.pow(2).sum(dim=1)
        return self

    def score(self, samples: Sequence[Sample]) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        """Image scores (N,), and the maps and masks of the images with pixel truth (normal
        images, anomalous ones with a mask), as ``fastflow.estimator.evaluation`` keeps them."""
        recipe = get_recipe(self.recipe)
        scores, maps, masks = [], [], []
        for batch in self._batches(samples):
            features = self._features(batch["image"])
            count, _, height, width = features.shape
            distances = self._nearest(features.flatten(2).transpose(1, 2).reshape(-1, features.shape[1]))
            grid = distances.view(count, height, width)
            amap = fuse_scales([grid], self.input_size, recipe.map_sigma)
            scores.append(image_score(amap, recipe.score_top).numpy())
            for i in range(count):
                if bool(batch["has_mask"][i]):  # normal images have an empty mask
                    masks.append(batch["mask"][i].numpy())
                    maps.append(amap[i].numpy())
        return np.concatenate(scores), maps, masks

    def _batches(self, samples: Sequence[Sample]) -> Iterator[dict[str, Any]]:
        return image_loader(list(samples), self.input_size, self.batch_size)

    def _features(self, pixels: Tensor) -> Tensor:
        """(N, 3, H, W) pixels -> (N, C2 + C3, h, w): 3x3-averaged layers 2 and 3 on layer 2's grid."""
        with torch.no_grad():
            layers = self.extractor_(self.preprocess_(pixels))
            return fuse_to_finest([local_average(f.float(), 3) for f in layers]).contiguous()

    def _nearest(self, queries: Tensor) -> Tensor:
        """Euclidean distance of each query row to its nearest bank row."""
        best = []
        block = torch.empty(_QUERY_CHUNK, _BANK_CHUNK)
        for chunk in queries.split(_QUERY_CHUNK):
            # |q - b|^2 = |q|^2 + (|b|^2 - 2 q.b): the bracket in one fused addmm pass into the
            # reused block, |q|^2 after the minimum.
            nearest = torch.full((len(chunk),), float("inf"))
            for start in range(0, len(self.bank_), _BANK_CHUNK):
                bank = self.bank_[start : start + _BANK_CHUNK]
                partial = block[: len(chunk), : len(bank)]
                torch.addmm(
                    self.bank_norms_[start : start + _BANK_CHUNK], chunk, bank.T, alpha=-2, out=partial
                )
                torch.minimum(nearest, partial.amin(dim=1), out=nearest)
            best.append((nearest + chunk.pow(2).sum(dim=1)).clamp_min(0).sqrt())
        return torch.cat(best)


def knn_reference_metrics(
    root: Path, backbone: str, weights: str | Path | None, input_size: tuple[int, int], recipe: str
) -> dict[str, float]:
    """Fit the reference on ``root``'s training images, score its test split, return the metrics
    ``fastflow test`` reports (image/pixel AUROC, F1, AUPRO), plus the bank's size."""
    reference = KnnReference(backbone, weights, input_size, recipe)
    reference.fit(load_samples(root, "train"))
    samples = load_samples(root, "test")
    scores, maps, masks = reference.score(samples)
    labels = np.array([s.label for s in samples])
    has_pixel_truth = any(mask.any() for mask in masks)
    metrics = evaluate(
        labels,
        scores,
        np.stack(masks) if has_pixel_truth else None,
        np.stack(maps) if has_pixel_truth else None,
    )
    metrics.update(bank_positions=float(reference.bank_positions_), bank_kept=float(len(reference.bank_)))
    return metrics
