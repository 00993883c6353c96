"""Image scores: the maximum (reference) or the mean of the map's top share of pixels."""

from __future__ import annotations

import torch

from fastflow.scoring import image_score


def test_image_score_is_max_or_top_fraction_mean():
    amap = torch.arange(200, dtype=torch.float32).reshape(2, 10, 10)
    torch.testing.assert_close(image_score(amap), torch.tensor([99.0, 199.0]))
    # top 5% of 100 pixels: the 5 largest
    torch.testing.assert_close(image_score(amap, 0.05), torch.tensor([97.0, 197.0]))
    # less than one pixel rounds up to the maximum
    torch.testing.assert_close(image_score(amap, 0.001), torch.tensor([99.0, 199.0]))
