"""Image scores (maximum or top-share mean) and the optional Gaussian blur of the anomaly map."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from torchvision.transforms.functional import gaussian_blur as torchvision_blur

from fastflow.model.scoring import anomaly_map, fuse_scales, gaussian_blur, image_score


def test_image_score_is_max_or_top_fraction_mean():
    amap = torch.arange(200, dtype=torch.float32).reshape(2, 10, 10)
    torch.testing.assert_close(image_score(amap), torch.tensor([99.0, 199.0]))
    # top 5% of 100 pixels: the 5 largest
    torch.testing.assert_close(image_score(amap, 0.05), torch.tensor([97.0, 197.0]))
    # less than one pixel rounds up to the maximum
    torch.testing.assert_close(image_score(amap, 0.001), torch.tensor([99.0, 199.0]))


def test_gaussian_blur_matches_torchvision_and_keeps_constant_maps():
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 1, 40, 57, generator=generator)
    for sigma in (0.5, 2.0, 4.0):
        radius = int(4 * sigma + 0.5)
        expected = torchvision_blur(maps, [2 * radius + 1] * 2, [sigma, sigma])
        torch.testing.assert_close(gaussian_blur(maps, sigma), expected, rtol=0, atol=1e-5)
    constant = torch.full((1, 1, 20, 30), -0.4)
    torch.testing.assert_close(gaussian_blur(constant, 4.0), constant)


@pytest.mark.parametrize("sigma", [0.0, 4.0])
def test_fused_scales_equal_upsampling_each_map_then_mean_then_blur(sigma):
    generator = torch.Generator().manual_seed(2)
    maps = [torch.randn(3, h, w, generator=generator) for h, w in ((16, 20), (8, 10), (4, 5))]
    size = (64, 80)
    upsampled = [
        F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0] for m in maps
    ]
    expected = gaussian_blur(torch.stack(upsampled).mean(dim=0), sigma)
    torch.testing.assert_close(fuse_scales(maps, size, sigma), expected, rtol=0, atol=1e-5)


def test_anomaly_map_blur_is_optional_and_smooths():
    zs = [torch.randn(2, 8, 16, 20, generator=torch.Generator().manual_seed(1)), torch.randn(2, 16, 8, 10)]
    sharp, smooth = anomaly_map(zs, (64, 80)), anomaly_map(zs, (64, 80), sigma=4.0)
    assert sharp.shape == smooth.shape == (2, 64, 80)
    assert smooth.diff(dim=-1).abs().mean() < 0.5 * sharp.diff(dim=-1).abs().mean()
    torch.testing.assert_close(smooth.mean(), sharp.mean(), rtol=0, atol=1e-2)
