"""Pre-processing: the antialiased resize as matrix products, against PyTorch's and PIL's filters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from fastflow.model.preprocess import Preprocess, resize_antialias, resize_by_matrices, resize_matrix

SIZES = [
    ((900, 900), (256, 256)),  # MVTec-like downscale, factor 3.5
    ((100, 37), (256, 256)),  # upscale
    ((640, 480), (128, 160)),  # non-square, different factors per axis
    ((255, 257), (256, 256)),  # one axis up, one down, by less than a pixel
    ((1000, 3), (7, 5)),  # extreme factors
]


@pytest.mark.parametrize(("shape", "size"), SIZES)
def test_resize_equals_torch_antialiased_bilinear(shape, size):
    images = torch.randint(0, 256, (2, 3, *shape)).float()
    ours = resize_antialias(images, size)
    reference = F.interpolate(images, size, mode="bilinear", antialias=True, align_corners=False)
    assert ours.shape == (2, 3, *size)
    torch.testing.assert_close(ours, reference, rtol=0, atol=2e-4)  # float rounding on 0..255 values


def test_resize_matrix_rows_are_normalised_and_identity_at_same_size():
    for n, m in [(900, 256), (37, 256), (256, 256), (3, 5)]:
        matrix = resize_matrix(torch.tensor(n), m)
        assert matrix.shape == (m, n) and (matrix >= 0).all()
        torch.testing.assert_close(matrix.sum(dim=1), torch.ones(m))
    assert torch.equal(resize_matrix(torch.tensor(64), 64), torch.eye(64))


def test_same_size_is_unchanged_bit_for_bit_with_and_without_the_shortcut():
    images = torch.randint(0, 256, (1, 3, 48, 40)).float()
    assert torch.equal(resize_antialias(images, (48, 40)), images)
    assert torch.equal(resize_by_matrices(images, 48, 40), images)  # what the shortcut skips


def test_traced_resize_handles_every_input_size():
    """A trace at one size must resize other sizes too, and leave that size unchanged (exports rely on it)."""
    traced = torch.jit.trace(lambda x: resize_antialias(x, (48, 40)), torch.rand(1, 3, 48, 40) * 255)
    for shape in [(1, 3, 48, 40), (2, 3, 100, 70), (1, 3, 30, 41)]:
        images = torch.randint(0, 256, shape).float()
        assert torch.equal(traced(images), resize_antialias(images, (48, 40)))


def test_resize_is_within_one_grey_level_of_pil_bilinear():
    """PIL's BILINEAR (what load_image used before) rounds to 8 bits: at most one level apart."""
    rng = np.random.default_rng(0)
    # Smooth content plus noise, like a photo.
    base = np.kron(rng.integers(0, 256, (30, 30, 3)), np.ones((10, 10, 1)))
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    pil = np.asarray(Image.fromarray(pixels).resize((96, 80), Image.BILINEAR), dtype=np.float32)
    ours = resize_antialias(torch.from_numpy(pixels).permute(2, 0, 1)[None].float(), (80, 96))
    difference = np.abs(ours[0].permute(1, 2, 0).numpy() - pil)
    assert difference.max() <= 1.0 and difference.mean() < 0.5


def test_preprocess_scales_and_normalises_uint8_and_float_alike():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    module = Preprocess((16, 24), mean, std)
    pixels = torch.randint(0, 256, (2, 3, 40, 50), dtype=torch.uint8)
    out = module(pixels)
    expected = (
        resize_antialias(pixels.float(), (16, 24)) / 255 - torch.tensor(mean).view(1, 3, 1, 1)
    ) / torch.tensor(std).view(1, 3, 1, 1)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 16, 24)
    torch.testing.assert_close(out, expected)
    assert torch.equal(module(pixels.float()), out)
