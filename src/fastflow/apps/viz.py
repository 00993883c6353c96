"""Heat-map pictures: anomaly maps blended over the input image, and binary masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["heat_colors", "heat_scale_hex", "mask_outline", "overlay", "save_mask", "save_overlay"]

# Anchor colours of a perceptual dark-to-bright ramp (black-purple-red-orange-yellow).
_RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)


def heat_colors(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (H, W) to RGB uint8 (H, W, 3) along the ramp."""
    position = np.clip(values, 0.0, 1.0) * (len(_RAMP) - 1)
    low = np.floor(position).astype(int).clip(0, len(_RAMP) - 2)
    weight = (position - low)[..., None]
    return ((1 - weight) * _RAMP[low] + weight * _RAMP[low + 1]).astype(np.uint8)


def heat_scale_hex() -> list[str]:
    """The ramp's anchor colours as CSS hex, evenly spaced from 0 to 1: a legend drawn as a
    linear gradient through them shows exactly the colours ``heat_colors`` gives."""
    return ["#" + "".join(f"{int(c):02x}" for c in anchor) for anchor in _RAMP]


def mask_outline(
    mask: np.ndarray, size: tuple[int, int], color: tuple[int, int, int] = (0, 255, 255)
) -> Image.Image:
    """The boundary of a (h, w) bool mask at the anomaly map's resolution, drawn in ``color`` on
    a transparent RGBA picture of ``size`` (W, H), to lay over an overlay.

    The boundary is the mask's cells with a 4-neighbour outside it (the image border counts as
    outside), taken at map resolution and enlarged by nearest-neighbour resizing as the mask
    picture is: the line follows the mask picture's edge exactly and is one map cell wide,
    thick enough to see however far the page shrinks a large image.
    """
    padded = np.pad(mask, 1, constant_values=False)
    inside = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    edge = mask & ~inside
    rgba = np.zeros((*mask.shape, 4), dtype=np.uint8)
    rgba[edge] = (*color, 255)
    return Image.fromarray(rgba, "RGBA").resize(size, Image.Resampling.NEAREST)


def overlay(
    image: Image.Image, amap: np.ndarray, floor: float, ceiling: float, alpha: float = 0.5
) -> Image.Image:
    """Blend the anomaly map over ``image``; ``floor`` maps to dark, ``ceiling`` (the threshold) to bright.

    A fixed range (from held-out normal images) rather than per-image min-max keeps pictures
    comparable: a normal image stays dark instead of having its noise stretched to full colour.
    """
    scaled = (amap - floor) / max(ceiling - floor, 1e-12)
    heat = Image.fromarray(heat_colors(scaled)).resize(image.size, Image.Resampling.BILINEAR)
    return Image.blend(image.convert("RGB"), heat, alpha)


def save_overlay(path: Path, pixels: np.ndarray, amap: np.ndarray, floor: float, ceiling: float) -> None:
    """Write the overlay of ``amap`` on the decoded image ``pixels`` ((H, W, 3) uint8 RGB, its own size) as PNG."""
    overlay(Image.fromarray(pixels), amap, floor, ceiling).save(path)


def save_mask(path: Path, amap: np.ndarray, threshold: float, size: tuple[int, int]) -> None:
    """Write the binary mask ``amap > threshold`` (white = anomalous) at ``size`` (W, H) as PNG."""
    mask = Image.fromarray(((amap > threshold) * 255).astype(np.uint8))
    mask.resize(size, Image.Resampling.NEAREST).save(path)
