"""Pure functions from flow outputs to losses, anomaly maps and image scores.

Higher always means more anomalous. The anomaly map is the FastFlow reference's: per scale
``-exp(-0.5 * mean_c z^2)``, bilinearly upsampled to the input size and averaged over scales.
An optional Gaussian blur (``sigma`` in map pixels; 0 = none, as in the reference) averages out
the noise of single feature positions in the blocky upsampled grids. The image score is the
mean of the map's highest ``top_fraction`` of pixels; with 0 it is the map's maximum, as in the
reference. ``benchmarks/recipe_study.py`` measured both choices on painted defects.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["anomaly_map", "gaussian_blur", "image_score", "nll_loss"]


def nll_loss(zs: list[Tensor], log_dets: list[Tensor]) -> Tensor:
    """Training loss: batch mean of ``0.5 * ||z||^2 - log|det J|``, summed over scales."""
    total = zs[0].new_zeros(())
    for z, log_det in zip(zs, log_dets, strict=True):
        per_image = 0.5 * z.pow(2).flatten(1).sum(dim=1) - log_det.flatten(1).sum(dim=1)
        total = total + per_image.mean()
    return total


def anomaly_map(zs: list[Tensor], size: tuple[int, int], sigma: float = 0.0) -> Tensor:
    """Anomaly map (N, H, W) at ``size``: mean over scales of upsampled ``-p(z)``, then blurred."""
    maps = []
    for z in zs:
        likelihood = torch.exp(-0.5 * torch.mean(z * z, dim=1, keepdim=True))
        maps.append(F.interpolate(-likelihood, size=size, mode="bilinear", align_corners=False))
    amap = torch.cat(maps, dim=1).mean(dim=1, keepdim=True)
    return gaussian_blur(amap, sigma)[:, 0] if sigma > 0 else amap[:, 0]


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (N, 1, H, W), kernel radius ``4 sigma``, edges reflected.

    Written here rather than taken from torchvision: its kernel is built from the input's
    shape at run time, which ONNX export cannot trace; this one is a constant.
    """
    radius = int(4 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    padded = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    rows = F.conv2d(padded, kernel.view(1, 1, -1, 1))
    return F.conv2d(rows, kernel.view(1, 1, 1, -1))


def image_score(amap: Tensor, top_fraction: float = 0.0) -> Tensor:
    """Image score (N,): mean of the top ``top_fraction`` of the map's pixels; its maximum if 0."""
    flat = amap.flatten(1)
    if top_fraction <= 0:
        return torch.amax(flat, dim=1)
    count = max(1, math.floor(flat.shape[1] * top_fraction))
    return flat.topk(count, dim=1).values.mean(dim=1)
