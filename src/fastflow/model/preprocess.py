"""Image pre-processing as a module: antialiased bilinear resize, scaling to 0..1, normalisation.

Training, Python inference and the exported ONNX / OpenVINO graphs all run this one module, so
an exported artifact sees exactly the pixels Python sees. The resize is the antialiased
bilinear filter of ``F.interpolate(..., mode="bilinear", antialias=True)`` (PIL's and
torchvision's ``BILINEAR`` on downscaling), written as two matrix products with per-size
weight matrices. Unlike ``F.interpolate(antialias=True)`` this formulation exports
to ONNX and OpenVINO with dynamic input height and width and gives the same numbers there
(ONNX has no antialiased resize before opset 18 and PyTorch's exporter does not emit it;
OpenVINO's own antialiased ``Interpolate`` differs by up to ~0.9 grey levels).

The weight matrices are computed from the input's shape with tensor ops only, so a traced graph
recomputes them for every input size instead of freezing the size seen at export.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["Preprocess", "resize_antialias", "resize_matrix"]


def resize_matrix(in_size: Tensor, out_size: int) -> Tensor:
    """Weights of the antialiased bilinear resize along one axis, as an (out_size, in_size) matrix.

    Args:
        in_size: input length as a 0-d int64 tensor (a tensor, so tracing keeps it symbolic).
        out_size: output length.

    Row ``i`` holds the normalised triangle-filter weights of output ``i``: output centre
    ``c = (i + 0.5) * s`` with scale ``s = in / out``, filter support ``max(s, 1)`` (widened by
    the downscaling factor: the antialias; plain bilinear when upscaling), taps from
    ``floor(c - support + 0.5)`` to ``floor(c + support + 0.5)`` clipped to the image, as in
    PIL and ``F.interpolate(..., antialias=True)``. At ``in == out`` it is the identity matrix.
    """
    length = in_size.to(torch.float32)
    scale = length / out_size
    support = torch.clamp(scale, min=1.0)
    center = (torch.arange(out_size, dtype=torch.float32) + 0.5) * scale  # (out,)
    start = torch.clamp(torch.floor(center - support + 0.5), min=0.0)
    stop = torch.minimum(torch.floor(center + support + 0.5), length)
    position = torch.arange(in_size, dtype=torch.float32)  # (in,)
    weight = torch.clamp(1.0 - torch.abs(position[None, :] - center[:, None] + 0.5) / support, min=0.0)
    inside = (position[None, :] >= start[:, None]) & (position[None, :] < stop[:, None])
    weight = torch.where(inside, weight, torch.zeros_like(weight))
    return weight / weight.sum(dim=1, keepdim=True)


def resize_antialias(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Antialiased bilinear resize of (N, C, H, W) float ``images`` to ``size`` = (height, width).

    Two matrix products, ``rows @ images @ columns.T``. Equals ``F.interpolate(images, size,
    mode="bilinear", antialias=True, align_corners=False)`` up to float rounding (<= 1e-4 on
    0..255 values); an image already at ``size`` comes back unchanged, bit for bit.
    """
    if not torch.jit.is_tracing() and tuple(images.shape[-2:]) == tuple(size):
        return images  # what the identity matrices would give, bit for bit, without the work
    shape = torch._shape_as_tensor(images)  # stays symbolic under tracing: dynamic H, W
    rows = resize_matrix(shape[2], size[0])  # (height, H)
    columns = resize_matrix(shape[3], size[1])  # (width, W)
    return torch.matmul(rows, torch.matmul(images, columns.transpose(0, 1)))


class Preprocess(nn.Module):
    """(N, 3, H, W) RGB images with values 0..255 (uint8 or float, any H, W) -> normalised model input.

    Resizes to ``size`` = (height, width) with ``resize_antialias``, divides by 255 and
    normalises with the backbone's ``mean`` / ``std`` -> (N, 3, height, width) float32.
    """

    def __init__(self, size: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        std_t = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        mean_t = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("mean", mean_t, persistent=False)
        self.register_buffer("std", std_t, persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        images = resize_antialias(images.to(torch.float32), self.size)
        return (images / 255.0 - self.mean) / self.std
