"""Tests for fastflow.estimator.metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import f1_score, roc_auc_score

from fastflow.estimator.metrics import (
    aupro,
    clopper_pearson,
    evaluate,
    f1_max,
    image_auroc,
    pixel_auroc,
    pixel_f1_max,
)

# --------------------------------------------------------------------------- AUROC


def test_image_auroc_matches_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = rng.normal(size=200) + labels
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_image_auroc_accepts_torch():
    labels = torch.tensor([0, 0, 1, 1])
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8], requires_grad=True)
    assert image_auroc(labels, scores) == pytest.approx(0.75)


def test_pixel_auroc_matches_sklearn():
    rng = np.random.default_rng(1)
    masks = rng.random((5, 16, 16)) > 0.8
    amaps = rng.random((5, 16, 16)) + 0.5 * masks
    expected = roc_auc_score(masks.ravel(), amaps.ravel())
    assert pixel_auroc(masks, amaps) == pytest.approx(expected, abs=1e-12)
    # (N, 1, H, W) model outputs are accepted too.
    assert pixel_auroc(masks[:, None], torch.from_numpy(amaps)[:, None]) == pytest.approx(expected)


def test_auroc_single_class_raises():
    with pytest.raises(ValueError, match="both normal"):
        image_auroc([1, 1, 1], [0.1, 0.2, 0.3])


# --------------------------------------------------------------------------- F1-max


def _brute_f1_max(labels, scores):
    best = 0.0
    for t in np.unique(scores):
        best = max(best, f1_score(labels, scores >= t, zero_division=0))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_f1_max_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    scores = np.round(rng.normal(size=60) + labels, 1)  # rounding creates ties
    f1, thr = f1_max(labels, scores)
    assert f1 == pytest.approx(_brute_f1_max(labels, scores), abs=1e-12)
    # The returned threshold reproduces the F1 (score >= threshold -> anomalous).
    assert f1_score(labels, scores >= thr) == pytest.approx(f1, abs=1e-12)


def test_f1_max_perfect_separation():
    f1, thr = f1_max([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9])
    assert f1 == 1.0
    assert thr == pytest.approx(0.7)


def test_pixel_f1_max_is_flattened_f1_max():
    rng = np.random.default_rng(3)
    masks = rng.random((3, 8, 8)) > 0.7
    amaps = rng.random((3, 8, 8)) + 0.3 * masks
    assert pixel_f1_max(masks, amaps) == f1_max(masks.ravel(), amaps.ravel())


# --------------------------------------------------------------------------- AUPRO


def test_aupro_hand_worked_example():
    # Two images of shape 1x7; region A (3 px) in image 0, region B (1 px) in
    # image 1; 4 + 6 = 10 normal pixels, so every normal pixel is 0.1 FPR.
    masks = np.array(
        [
            [[1, 1, 1, 0, 0, 0, 0]],
            [[1, 0, 0, 0, 0, 0, 0]],
        ]
    )
    amaps = np.array(
        [
            #  A    A    A   n    n    n    n
            [[0.9, 0.6, 0.2, 0.7, 0.5, 0.1, 0.1]],
            #  B    n    n    n    n    n    n
            [[0.5, 0.8, 0.5, 0.4, 0.1, 0.1, 0.1]],
        ]
    )
    # Sweep thresholds t downwards (pixel positive iff score >= t):
    #   start      : FPR 0.0, A 0/3, B 0/1 -> PRO 0
    #   t = 0.9    : FPR 0.0, A 1/3, B 0   -> PRO 1/6
    #   t = 0.8    : FPR 0.1,                 PRO 1/6
    #   t = 0.7    : FPR 0.2,                 PRO 1/6
    #   t = 0.6    : FPR 0.2, A 2/3, B 0   -> PRO 1/3
    #   t = 0.5    : FPR 0.4, A 2/3, B 1   -> PRO 5/6   (2 normals + B at 0.5)
    #   ... beyond FPR 0.3, irrelevant.
    # PRO at FPR 0.3, interpolated on (0.2, 1/3)-(0.4, 5/6): 1/3 + 0.5 * 1/2 = 7/12.
    # Area: [0, 0.2] at 1/6            -> 0.2 * 1/6               = 8/240
    #       [0.2, 0.3] from 1/3 to 7/12 -> 0.1 * (1/3 + 7/12) / 2 = 11/240
    # Total 19/240, normalized by 0.3 -> 19/72.
    assert aupro(masks, amaps) == pytest.approx(19 / 72, abs=1e-9)


def test_aupro_uses_eight_connectivity():
    # (0,1)-(1,2) touch diagonally: one 3-pixel region with 8-connectivity
    # (two regions of sizes 2 and 1 with 4-connectivity).
    masks = np.array([[[1, 1, 0], [0, 0, 1], [0, 0, 0]]])
    amaps = np.array([[[0.5, 0.5, 0.7], [0.1, 0.1, 0.9], [0.1, 0.1, 0.1]]])
    # 6 normal pixels; one normal at 0.7, the rest at 0.1.
    # Curve: (0, 0) -> t=0.9: (0, 1/3) -> t=0.7: (1/6, 1/3) -> t=0.5: (1/6, 1) -> t=0.1: (1, 1)
    # Area to 0.3: 1/6 * 1/3 + (0.3 - 1/6) * 1 = 0.3 - 1/9 -> normalized 1 - 10/27 = 17/27.
    # (4-connectivity would give PRO 1/2 on the first step and 13/18 overall.)
    assert aupro(masks, amaps) == pytest.approx(17 / 27, abs=1e-9)


def test_aupro_perfect_detector_is_one():
    rng = np.random.default_rng(4)
    masks = np.zeros((3, 16, 16), dtype=bool)
    masks[0, 2:5, 3:9] = True
    masks[1, 10:12, 10:11] = True
    masks[2, 0:8, 0:8] = True
    amaps = np.where(masks, 1.0 + rng.random(masks.shape), rng.random(masks.shape))
    assert aupro(masks, amaps) == pytest.approx(1.0, abs=1e-12)


def test_aupro_region_undetected_until_fpr_above_limit():
    # One region with scores below 40% of the normal pixels: PRO stays 0 for
    # all FPR <= 0.3, so the normalized area is 0.
    masks = np.zeros((1, 1, 11), dtype=bool)
    masks[0, 0, 0] = True
    amaps = np.array([[[0.55, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]]])
    assert aupro(masks, amaps) == pytest.approx(0.0, abs=1e-12)
    # With FPR limit 0.5 the region is found at FPR 0.4 (t = 0.55): area
    # 0.1 * 1 over [0.4, 0.5] -> normalized 0.1 / 0.5 = 0.2.
    assert aupro(masks, amaps, fpr_limit=0.5) == pytest.approx(0.2, abs=1e-12)


def test_aupro_averages_per_region_not_per_pixel():
    # Region A: 1 pixel, detected first. Region B: 9 pixels, scored below 40%
    # of normal pixels, i.e. zero overlap until FPR > 0.3.
    masks = np.zeros((2, 5, 5), dtype=bool)
    masks[0, 0, 0] = True  # A
    masks[1, 1:4, 1:4] = True  # B
    amaps = np.zeros((2, 5, 5))
    normal_idx = np.flatnonzero(~masks.ravel())
    amaps.ravel()[normal_idx] = np.linspace(1.0, 0.0, normal_idx.size)  # distinct, in [0, 1]
    amaps[0, 0, 0] = 2.0  # A above every normal pixel
    amaps[1, 1:4, 1:4] = 0.5  # B: ~50% of normals score higher
    # Region-weighted PRO = (1 + 0) / 2 = 0.5 on [0, 0.3] -> AUPRO 0.5.
    # Pixel-weighted overlap would be 1/10 -> 0.1.
    assert aupro(masks, amaps) == pytest.approx(0.5, abs=1e-12)


def _reference_aupro(masks, amaps, fpr_limit=0.3):
    """Slow, direct transcription of the definition."""
    regions = []
    for i in range(masks.shape[0]):
        lab, n = ndimage.label(masks[i], structure=np.ones((3, 3)))
        for r in range(1, n + 1):
            sel = np.zeros(masks.shape, dtype=bool)
            sel[i] = lab == r
            regions.append(sel)
    normal = ~masks.astype(bool)
    xs, ys = [0.0], [0.0]
    for t in np.sort(np.unique(amaps))[::-1]:
        pred = amaps >= t
        xs.append(pred[normal].mean())
        ys.append(np.mean([pred[r].mean() for r in regions]))
    area = 0.0
    for x0, x1, y0, y1 in zip(xs[:-1], xs[1:], ys[:-1], ys[1:]):
        if x1 <= fpr_limit:
            area += (x1 - x0) * (y0 + y1) / 2
        elif x0 < fpr_limit:
            y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            area += (fpr_limit - x0) * (y0 + y_lim) / 2
            break
        else:
            break
    return area / fpr_limit


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("decimals", [1, 2, None])
def test_aupro_matches_reference(seed, decimals):
    rng = np.random.default_rng(seed)
    # Blob-shaped masks with several regions of varied sizes.
    masks = ndimage.gaussian_filter(rng.random((3, 12, 12)), sigma=(0, 1.2, 1.2)) > 0.56
    masks[0, 0, 0] = True  # guarantee at least one region
    amaps = rng.random(masks.shape) + 0.4 * masks
    if decimals is not None:
        amaps = np.round(amaps, decimals)  # many ties
    for limit in (0.3, 0.05, 1.0):
        assert aupro(masks, amaps, fpr_limit=limit) == pytest.approx(
            _reference_aupro(masks, amaps, limit), abs=1e-9
        )


def test_aupro_requires_regions():
    with pytest.raises(ValueError, match="anomalous region"):
        aupro(np.zeros((2, 4, 4)), np.random.default_rng(0).random((2, 4, 4)))


def test_aupro_validates_shapes_and_limit():
    with pytest.raises(ValueError, match="same shape"):
        aupro(np.ones((1, 4, 4)), np.ones((1, 4, 5)))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(np.ones((1, 4, 4)), np.ones((1, 4, 4)), fpr_limit=0.0)


# --------------------------------------------------------------------------- threshold / evaluate


def test_clopper_pearson_interval():
    """Known exact intervals (2 of 10: 0.0252-0.5561; 0 of 10: 0-0.3085, the rule of three's
    neighbour), and the interval narrows around the rate as the images grow."""
    assert clopper_pearson(2, 10) == pytest.approx((0.0252107, 0.5560955), abs=1e-6)
    assert clopper_pearson(0, 10) == pytest.approx((0.0, 0.3084971), abs=1e-6)
    low, high = clopper_pearson(200, 1000)
    assert low < 0.2 < high and high - low < 0.06
    assert clopper_pearson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="between 0 and total"):
        clopper_pearson(3, 2)


def test_evaluate_image_only():
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.6, 0.5, 0.9])
    out = evaluate(labels, scores)
    assert set(out) == {"image_auroc", "image_f1", "image_f1_threshold"}
    assert all(type(v) is float for v in out.values())
    assert out["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert (out["image_f1"], out["image_f1_threshold"]) == f1_max(labels, scores)


def test_evaluate_with_masks():
    rng = np.random.default_rng(5)
    labels = np.array([0, 1, 0, 1])
    scores = np.array([0.2, 0.8, 0.3, 0.7])
    masks = np.zeros((2, 8, 8), dtype=bool)  # only the images with masks
    masks[0, 2:4, 2:4] = True
    masks[1, 5:7, 1:3] = True
    amaps = rng.random(masks.shape) + masks
    out = evaluate(labels, scores, masks, amaps)
    assert set(out) == {
        "image_auroc",
        "image_f1",
        "image_f1_threshold",
        "pixel_auroc",
        "pixel_f1",
        "pixel_f1_threshold",
        "aupro",
    }
    assert all(type(v) is float for v in out.values())
    assert out["image_auroc"] == 1.0
    assert out["pixel_auroc"] == pytest.approx(pixel_auroc(masks, amaps))
    assert out["aupro"] == pytest.approx(aupro(masks, amaps))
    assert (out["pixel_f1"], out["pixel_f1_threshold"]) == pixel_f1_max(masks, amaps)


def test_evaluate_single_class_raises():
    with pytest.raises(ValueError, match="both normal .* and anomalous"):
        evaluate([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="only anomalous"):
        evaluate([1, 1], [0.1, 0.2])
