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

__all__ = ["Preprocess", "resize_antialias", "resize_by_matrices", "resize_matrix"]


def resize_matrix(in_size: Tensor, out_size: int) -> Tensor:
    """Weights of the antialiased bilinear resize along one axis, as an (out_size, in_size) matrix.

    Args:
        in_size: input length as a 0-d int64 tensor (a tensor, so tracing keeps it symbolic).
        out_size: output length.

    Output ``i`` is centred at ``c = (i + 0.5) * s`` input pixels, scale ``s = in / out``; input
    ``j`` gets the triangle-filter weight ``max(0, 1 - |j + 0.5 - c| / max(s, 1))`` (support
    widened by the downscaling factor: the antialias; plain bilinear when upscaling), rows
    normalised to sum 1, as in PIL and ``F.interpolate(..., antialias=True)``. Multiplied by
    ``2 * out * max(s, 1)`` the weights are integers, ``max(0, 2 max(in, out) - |out (2j + 1) -
    in (2i + 1)|)``: computed exactly in int64, with one float division for the normalisation,
    so a reduced-precision engine (bf16) cannot shift the filter taps. At ``in == out`` it is
    the identity matrix.
    """
    length = in_size.to(torch.int64)
    # A 0-d tensor end is valid (and what keeps it symbolic); torch's stubs only list numbers.
    j = torch.arange(length, dtype=torch.int64)  # type: ignore[call-overload]
    i = torch.arange(out_size, dtype=torch.int64)
    support = 2 * torch.clamp(length, min=out_size)
    distance = torch.abs((2 * j[None, :] + 1) * out_size - (2 * i[:, None] + 1) * length)
    weight = torch.clamp(support - distance, min=0).to(torch.float32)
    return weight / weight.sum(dim=1, keepdim=True)


def resize_by_matrices(images: Tensor, height: int, width: int) -> Tensor:
    """``rows @ images @ columns.T`` with ``resize_matrix`` weights: (N, C, H, W) -> (N, C, height, width)."""
    shape = torch._shape_as_tensor(images)  # symbolic under tracing: dynamic H, W
    rows = _on_device_of(images, resize_matrix(shape[2], height))
    columns = _on_device_of(images, resize_matrix(shape[3], width))
    return torch.matmul(rows, torch.matmul(images, columns.transpose(0, 1)))


def _on_device_of(images: Tensor, constant: Tensor) -> Tensor:
    """``constant`` (made on the CPU) on ``images``' device (a GPU when training there). A no-op,
    with no node in a traced graph, for CPU images, which is where the exports are traced."""
    return constant if images.device == constant.device else constant.to(images.device)


def resize_antialias(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Antialiased bilinear resize of (N, C, H, W) float ``images`` to ``size`` = (height, width).

    Equals ``F.interpolate(images, size, mode="bilinear", antialias=True, align_corners=False)``
    up to float rounding (<= 2e-4 on 0..255 values). In eager mode an image already at ``size``
    is returned as it is; a traced (exported) graph always multiplies, and its identity
    matrices give the same bits. (A size test in the graph would need an ``If`` node, and
    OpenVINO 2026.4 miscomputes the convolutions that follow one.)
    """
    if not torch.jit.is_tracing() and tuple(images.shape[-2:]) == tuple(size):
        return images
    return resize_by_matrices(images, int(size[0]), int(size[1]))


class Preprocess(nn.Module):
    """(N, 3, H, W) RGB images with values 0..255 (uint8 or float, any H, W) -> normalised model input.

    Resizes to ``size`` = (height, width) with ``resize_antialias``, divides by 255 and
    normalises with the backbone's ``mean`` / ``std`` -> (N, 3, height, width) float32.
    """

    def __init__(self, size: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        # Plain numbers, not buffers: nothing to save or load, and a model built on the meta
        # device (``load_model``) still pre-processes on the CPU.
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def forward(self, images: Tensor) -> Tensor:
        images = resize_antialias(images.to(torch.float32), self.size)
        mean = _on_device_of(images, torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1))
        std = _on_device_of(images, torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1))
        return (images / 255.0 - mean) / std
