"""Pure functions from flow outputs to losses, anomaly maps and image scores.

Higher always means more anomalous. The anomaly map is the FastFlow reference's: per scale
``-exp(-0.5 * mean_c z^2)``, bilinearly upsampled to the input size and averaged over scales.
An optional Gaussian blur (``sigma`` in map pixels; 0 = none, as in the reference) averages out
the noise of single feature positions in the blocky upsampled grids. The image score is the
mean of the map's highest ``top_fraction`` of pixels; with 0 it is the map's maximum, as in the
reference. Which of these a model uses is its ``Recipe``.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = [
    "anomaly_map",
    "blur_radius",
    "fuse_scales",
    "gaussian_blur",
    "image_score",
    "nll_loss",
    "score_latents",
]


def nll_loss(zs: list[Tensor], log_dets: list[Tensor], reduction: str = "mean") -> Tensor:
    """Training loss: batch mean (or ``reduction="sum"``) of ``0.5 * ||z||^2 - log|det J|``, summed
    over scales. The sum of an empty batch is 0, so a process with no image in a batch still
    takes part in a distributed step."""
    total = zs[0].new_zeros(())
    for z, log_det in zip(zs, log_dets, strict=True):
        per_image = 0.5 * z.pow(2).flatten(1).sum(dim=1) - log_det.flatten(1).sum(dim=1)
        total = total + (per_image.sum() if reduction == "sum" else per_image.mean())
    return total


def anomaly_map(zs: list[Tensor], size: tuple[int, int], sigma: float = 0.0) -> Tensor:
    """Anomaly map (N, H, W) at ``size``: mean over scales of upsampled ``-p(z)``, then blurred."""
    return fuse_scales([-torch.exp(-0.5 * torch.mean(z * z, dim=1)) for z in zs], size, sigma)


def fuse_scales(maps: list[Tensor], size: tuple[int, int], sigma: float = 0.0) -> Tensor:
    """Per-scale maps (N, h, w) -> one map (N, H, W): bilinear upsampling to ``size``, mean, blur.

    Upsampling and blur are both linear along each axis, so for each scale they are one small
    matrix on each side, ``R_s @ map_s @ C_s^T`` (``_resampling``), and the mean is taken over
    those products. That equals upsampling every map to full size, averaging and blurring (to
    float rounding) at a third of the cost: the full-size blur alone was two (H, H) products per
    image. The matrices depend only on the sizes, so exported graphs hold them as constants.
    """
    height, width = size
    total: Tensor | None = None
    for m in maps:
        rows = _resampling(int(m.shape[-2]), height, sigma, m.dtype, m.device)
        columns = _resampling(int(m.shape[-1]), width, sigma, m.dtype, m.device)
        fused = rows @ m @ columns.T
        total = fused if total is None else total + fused
    assert total is not None, "no maps to fuse"
    return total / len(maps)


@functools.lru_cache(maxsize=32)
def _resampling(source: int, target: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(target, source) matrix: PyTorch's bilinear upsampling (``align_corners=False``) along one
    axis, followed by the Gaussian blur of ``gaussian_blur`` (none if ``sigma`` is 0)."""
    identity = torch.eye(source, dtype=torch.float64)
    upsampling = F.interpolate(
        identity[None, None], size=(target, source), mode="bilinear", align_corners=False
    )[0, 0]
    if sigma > 0:
        upsampling = _blur_band(target, sigma, torch.float64, torch.device("cpu")) @ upsampling
    return upsampling.to(dtype=dtype, device=device)


def gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    """Gaussian blur of maps (..., H, W), kernel radius ``4 sigma``, edges reflected; none if 0.

    Computed as ``B_H @ maps @ B_W^T`` with banded matrices that hold the kernel and the
    reflection: the map size is fixed per model, so they are built once (cached) and are
    constants in exported graphs, and two matrix products beat PyTorch's one-channel
    convolution several times over at batch 16. torchvision's blur builds its kernel from the
    input's shape at run time, which ONNX export cannot trace.
    """
    if sigma <= 0:
        return maps
    height, width = int(maps.shape[-2]), int(maps.shape[-1])
    rows = _blur_band(height, sigma, maps.dtype, maps.device)
    columns = _blur_band(width, sigma, maps.dtype, maps.device)
    return rows @ maps @ columns.T


def blur_radius(sigma: float) -> int:
    """Kernel radius of the map blur: 4 sigma, rounded (torchvision's rule)."""
    return int(4 * sigma + 0.5)


@functools.lru_cache(maxsize=16)
def _blur_band(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(size, size) matrix whose row i is the Gaussian kernel centred on i, reflected at the edges."""
    radius = blur_radius(sigma)
    steps = torch.arange(-radius, radius + 1)
    kernel = torch.exp(-0.5 * (steps.double() / sigma) ** 2)
    kernel = kernel / kernel.sum()
    source = (torch.arange(size)[:, None] + steps[None, :]).abs()
    source = torch.where(source > size - 1, 2 * (size - 1) - source, source)
    band = torch.zeros(size, size, dtype=torch.float64).scatter_add_(1, source, kernel.expand(size, -1))
    return band.to(dtype=dtype, device=device)


def image_score(amap: Tensor, top_fraction: float = 0.0) -> Tensor:
    """Image score (N,): mean of the top ``top_fraction`` of the map's pixels; its maximum if 0."""
    flat = amap.flatten(1)
    if top_fraction <= 0:
        return torch.amax(flat, dim=1)
    count = max(1, math.floor(flat.shape[1] * top_fraction))
    return flat.topk(count, dim=1).values.mean(dim=1)


def score_latents(
    zs: list[Tensor], size: tuple[int, int], sigma: float, top_fraction: float
) -> tuple[Tensor, Tensor]:
    """Latents -> (anomaly map (N, H, W) at ``size`` blurred with ``sigma``, image score (N,))."""
    amap = anomaly_map(zs, size, sigma)
    return amap, image_score(amap, top_fraction)
