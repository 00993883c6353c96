"""Pure functions from flow outputs to losses, anomaly maps and image scores.

Higher always means more anomalous. ``reference`` reproduces the FastFlow reference scorer:
per scale ``-exp(-0.5 * mean_c z^2)``, bilinearly upsampled to the input size and averaged
over scales; the image score is the map's maximum.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["anomaly_map", "image_score", "nll_loss"]


def nll_loss(zs: list[Tensor], log_dets: list[Tensor]) -> Tensor:
    """Training loss: batch mean of ``0.5 * ||z||^2 - log|det J|``, summed over scales."""
    total = zs[0].new_zeros(())
    for z, log_det in zip(zs, log_dets, strict=True):
        per_image = 0.5 * z.pow(2).flatten(1).sum(dim=1) - log_det.flatten(1).sum(dim=1)
        total = total + per_image.mean()
    return total


def anomaly_map(zs: list[Tensor], size: tuple[int, int]) -> Tensor:
    """Reference anomaly map (N, H, W) at ``size``: mean over scales of upsampled ``-p(z)``."""
    maps = []
    for z in zs:
        likelihood = torch.exp(-0.5 * z.pow(2).mean(dim=1, keepdim=True))
        maps.append(F.interpolate(-likelihood, size=size, mode="bilinear", align_corners=False))
    return torch.stack(maps, dim=-1).mean(dim=-1).squeeze(1)


def image_score(amap: Tensor) -> Tensor:
    """Image score (N,): the anomaly map's maximum, as in the reference."""
    return amap.flatten(1).amax(dim=1)
