"""Invisible perturbations: sensor-like pixel noise and a JPEG round trip, in one place.

Training adds them to a second copy of every training image (``noisy_copy``), so that changes
no inspector could see do not look like defects to the flow; the robustness benchmark
(``fastflow.apps.robustness``) applies the same functions to test images to measure how well
that worked. One implementation for both, so the benchmark tests what training taught.

Images are (3, H, W) uint8 tensors on the CPU (``add_pixel_noise`` takes any shape). Noise is
drawn with ``torch.randn`` from a ``torch.Generator`` of the caller's, one per image (the
benchmark's come from ``image_generator``; training seeds its own by image position), so it
does not depend on batching, processes or the training device. JPEG is Pillow's, at the given
quality with Pillow's default 4:2:0 chroma subsampling; its pixels equal those of torchvision's
``encode_jpeg``/``decode_jpeg``, which training used before (``tests/estimator/test_augment.py``).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = ["add_pixel_noise", "image_generator", "jpeg_round_trip", "noisy_copy"]


# Odd, so that distinct seeds (< 2**32) start their images at distinct generator seeds.
_SEED_STRIDE = 0x9E3779B9


def image_generator(seed: int, index: int) -> torch.Generator:
    """The generator of image ``index``'s draws in a run seeded by ``seed`` (both >= 0): every
    image its own stream, the same whatever else is drawn, and another stream for another seed.

    torch's CPU generator keeps only the low 32 bits of its seed, so the seed and the index are
    mixed into 32 bits (``seed * _SEED_STRIDE + index``, modulo 2**32) rather than placed side by
    side in 64, where the seed would fall off.
    """
    return torch.Generator().manual_seed((seed * _SEED_STRIDE + index) % 2**32)


def add_pixel_noise(pixels: Tensor, sigma: float, generator: torch.Generator) -> Tensor:
    """uint8 pixels plus Gaussian noise of ``sigma`` grey levels, rounded back to uint8 as a camera stores them.

    The noise is ``sigma`` times one ``torch.randn`` draw of the pixels' shape, so the same
    generator state with twice the ``sigma`` gives the same noise doubled (before rounding).
    """
    noisy = pixels.float() + sigma * torch.randn(pixels.shape, generator=generator)
    return noisy.round_().clamp_(0, 255).to(torch.uint8)


def jpeg_round_trip(image: Tensor, quality: int) -> Tensor:
    """A (3, H, W) uint8 image encoded as JPEG at ``quality`` and decoded again (0: the image itself),
    as when images pass through a camera or a storage system that compresses."""
    if quality == 0:
        return image
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return torch.from_numpy(np.array(decoded.convert("RGB"))).permute(2, 0, 1).contiguous()


def noisy_copy(
    image: Tensor, sigma: float, generator: torch.Generator, jpeg_quality: int, jpeg_share: float
) -> Tensor:
    """A (3, H, W) ``image`` with pixel noise, then (a ``jpeg_share`` of the time) a JPEG round trip.

    The draws, in order: the noise, then (with ``jpeg_quality``) one uniform number that decides
    the round trip.
    """
    noisy = add_pixel_noise(image, sigma, generator)
    if jpeg_quality and torch.rand((), generator=generator) < jpeg_share:
        return jpeg_round_trip(noisy, jpeg_quality)
    return noisy
