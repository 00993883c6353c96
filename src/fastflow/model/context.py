"""Context for the flows beyond one feature position: neighbourhood, other scales, position.

A FastFlow flow sees each scale's feature map through convolutions, but the paper's model gives
it no more than that. The detectors that localise best add context before or beside the flow
(``FastFlowConfig.context_pool``, ``fuse_scales``, ``positional_channels``):

- ``local_average``: each position averaged with its k x k neighbours (PatchCore, MSFlow), so a
  defect a few pixels wide changes the features of a whole neighbourhood, and a single noisy
  position changes them less;
- ``fuse_to_finest``: deeper scales brought to the finest grid and joined, so one flow models
  all scales of a position together instead of separate maps averaged at the end;
- ``positional_encoding``: a fixed sinusoidal map of where a position is (CFlow-AD, MSFlow),
  a condition of the coupling subnets, so the flow can learn that a rim and a centre differ.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["fuse_to_finest", "local_average", "positional_encoding"]


def local_average(feature: Tensor, size: int) -> Tensor:
    """(N, C, h, w) -> the mean of each position's ``size`` x ``size`` neighbourhood, same shape.

    At the borders only the positions inside the map are averaged (no zero padding pulling the
    edge towards 0, which would make every border look unusual). ``size`` 1 returns ``feature``.
    """
    if size == 1:
        return feature
    return F.avg_pool2d(feature, size, stride=1, padding=size // 2, count_include_pad=False)


def fuse_to_finest(maps: list[Tensor]) -> Tensor:
    """Per-scale maps (N, C_k, h_k, w_k) -> one (N, sum C_k, h, w) map on the finest grid.

    Coarser maps are upsampled bilinearly (``align_corners=False``, as the anomaly map is), then
    all are concatenated along channels.
    """
    height, width = max((m.shape[-2:] for m in maps), key=lambda hw: hw[0] * hw[1])
    resized = [
        m
        if m.shape[-2:] == (height, width)
        else F.interpolate(m, size=(height, width), mode="bilinear", align_corners=False)
        for m in maps
    ]
    return torch.cat(resized, dim=1)


@functools.lru_cache(maxsize=64)
def positional_encoding(channels: int, height: int, width: int) -> Tensor:
    """A 2D sinusoidal encoding (1, channels, height, width): half the channels code the column,
    half the row, each as sin/cos pairs of geometrically spaced frequencies (Vaswani et al.).

    ``channels`` must be a multiple of 4. Positions are counted in grid cells, so every scale's
    encoding varies at the scale of its own grid. Computed once per shape and shared (every
    training batch and inference call asks for it): read it, never write into it.
    """
    if channels % 4 or channels <= 0:
        raise ValueError(f"positional encoding channels must be a positive multiple of 4, got {channels}")
    quarter = channels // 4
    frequencies = torch.exp(torch.arange(quarter, dtype=torch.float64) * (-math.log(10000.0) / quarter))
    columns = torch.arange(width, dtype=torch.float64)[None, :] * frequencies[:, None]  # (quarter, w)
    rows = torch.arange(height, dtype=torch.float64)[None, :] * frequencies[:, None]  # (quarter, h)
    column_code = torch.cat((columns.sin(), columns.cos()))[:, None, :].expand(-1, height, -1)
    row_code = torch.cat((rows.sin(), rows.cos()))[:, :, None].expand(-1, -1, width)
    return torch.cat((column_code, row_code)).unsqueeze(0).float()
