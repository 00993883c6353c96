"""Evaluation metrics for anomaly detection and localization.

All functions are pure and operate on numpy arrays (torch tensors are accepted
and converted). Conventions used throughout:

* scores / anomaly maps: higher = more anomalous;
* labels: 1 = anomalous, 0 = normal;
* masks: boolean or 0/1 arrays of shape ``(N, H, W)``; anomaly maps are float
  arrays of the same shape. A singleton channel axis ``(N, 1, H, W)`` is
  squeezed so model outputs can be passed directly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

__all__ = [
    "aupro",
    "clopper_pearson",
    "evaluate",
    "f1_max",
    "image_auroc",
    "pixel_auroc",
    "pixel_f1_max",
    "pro_area",
    "pro_curve",
]

# 8-connectivity: diagonal neighbours belong to the same defect region, as in
# the MVTec AD evaluation protocol.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _to_numpy(x: Any) -> np.ndarray:
    """Convert arrays/tensors to numpy; tensors may live on GPU or need grad."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _binary_labels(labels: Any, name: str = "labels") -> np.ndarray:
    """Flatten and validate 0/1 (or boolean) labels, returned as bool."""
    arr = _to_numpy(labels).ravel()
    if arr.dtype != bool:
        if not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name} must contain only 0/1 (or boolean) values")
        arr = arr.astype(bool)
    return arr


def _finite_scores(scores: Any, name: str = "scores") -> np.ndarray:
    """Flatten scores; NaN/inf would silently corrupt ranking-based metrics."""
    arr = _to_numpy(scores).ravel()
    if arr.size and not np.isfinite(arr).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return arr


def _paired(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    y = _binary_labels(labels)
    s = _finite_scores(scores)
    if y.shape != s.shape:
        raise ValueError(
            f"labels and scores must have the same number of elements, got {y.size} and {s.size}"
        )
    if y.size == 0:
        raise ValueError("labels and scores are empty")
    return y, s


def _require_both_classes(y: np.ndarray, what: str) -> None:
    """AUROC is undefined with a single class; fail with an actionable message."""
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        present = "anomalous (1)" if n_pos else "normal (0)"
        raise ValueError(
            f"{what} requires both normal (0) and anomalous (1) samples, "
            f"but only {present} samples are present"
        )


def _maps(masks: Any, amaps: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate/normalise masks and anomaly maps to matching (N, H, W) arrays."""
    m = _to_numpy(masks)
    a = _to_numpy(amaps)
    for arr_name, arr in (("masks", m), ("amaps", a)):
        if arr.ndim not in (2, 3, 4) or (arr.ndim == 4 and arr.shape[1] != 1):
            raise ValueError(f"{arr_name} must have shape (N, H, W), got {arr.shape}")
    m = m[:, 0] if m.ndim == 4 else (m[None] if m.ndim == 2 else m)
    a = a[:, 0] if a.ndim == 4 else (a[None] if a.ndim == 2 else a)
    if m.shape != a.shape:
        raise ValueError(f"masks {m.shape} and amaps {a.shape} must have the same shape")
    m = _binary_labels(m, "masks").reshape(a.shape)
    _finite_scores(a, "amaps")
    return m, a


def image_auroc(labels: Any, scores: Any) -> float:
    """Image-level AUROC: threshold-free ranking quality of per-image scores."""
    y, s = _paired(labels, scores)
    _require_both_classes(y, "image_auroc")
    return float(roc_auc_score(y, s))


def pixel_auroc(masks: Any, amaps: Any) -> float:
    """Pixel-level AUROC over all pixels of all images (dominated by large defects)."""
    m, a = _maps(masks, amaps)
    y = m.ravel()
    _require_both_classes(y, "pixel_auroc")
    return float(roc_auc_score(y, a.ravel()))


def f1_max(labels: Any, scores: Any) -> tuple[float, float]:
    """Best F1 over all thresholds and the threshold reaching it.

    An upper bound on what a tuned operating point can achieve; the threshold
    means "predict anomalous when score >= threshold".
    """
    y, s = _paired(labels, scores)
    if not y.any():
        raise ValueError("f1_max requires at least one anomalous (1) sample")
    precision, recall, thresholds = precision_recall_curve(y, s)
    # The last PR point (precision=1, recall=0) has no threshold: drop it.
    precision, recall = precision[:-1], recall[:-1]
    denom = precision + recall
    f1 = np.divide(2.0 * precision * recall, denom, out=np.zeros_like(denom, dtype=float), where=denom > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def pixel_f1_max(masks: Any, amaps: Any) -> tuple[float, float]:
    """Pixel-level F1-max: :func:`f1_max` on flattened masks and anomaly maps."""
    m, a = _maps(masks, amaps)
    return f1_max(m.ravel(), a.ravel())


def pro_curve(masks: Any, amaps: Any, fpr_limit: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """The per-region-overlap (PRO) curve up to ``fpr_limit``: (fpr, pro) arrays from (0, 0).

    Regions are the 8-connected components of each ground-truth mask; the FPR is measured
    on the normal pixels of all images. The curve is swept exactly over every distinct
    score, and the PRO value at ``fpr_limit`` is linearly interpolated, so the curve ends
    there (or earlier, if every normal pixel is covered before it). :func:`aupro` is its area.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    m, a = _maps(masks, amaps)

    # Label regions per image (components must not span images), with
    # globally unique ids; 0 stays "normal".
    region_ids = np.zeros(m.shape, dtype=np.int64)
    n_regions = 0
    for i in range(m.shape[0]):
        lab, n = ndimage.label(m[i], structure=_EIGHT_CONNECTED)
        if n:
            region_ids[i] = np.where(lab > 0, lab + n_regions, 0)
            n_regions += n
    if n_regions == 0:
        raise ValueError("aupro requires at least one anomalous region in masks, but all masks are empty")

    ids = region_ids.ravel()
    normal = ids == 0
    n_normal = int(normal.sum())
    if n_normal == 0:
        raise ValueError("aupro requires normal pixels to measure the false positive rate")

    # Each anomalous pixel contributes 1 / (|region| * n_regions) to the mean
    # overlap once it exceeds the threshold; each normal pixel contributes one
    # false positive.
    sizes = np.bincount(ids, minlength=n_regions + 1).astype(np.float64)
    pro_weight = np.zeros(n_regions + 1, dtype=np.float64)
    pro_weight[1:] = 1.0 / (sizes[1:] * n_regions)

    scores = a.ravel()
    order = np.argsort(scores, kind="stable")[::-1]  # descending
    s_sorted = scores[order]
    ids_sorted = ids[order]
    del order

    fp = np.cumsum(ids_sorted == 0, dtype=np.int64)
    pro = np.cumsum(pro_weight[ids_sorted])
    # Only the end of each run of equal scores is a reachable operating point.
    last = np.flatnonzero(np.append(s_sorted[1:] != s_sorted[:-1], True))
    fpr = np.concatenate(([0.0], fp[last] / n_normal))
    pro = np.concatenate(([0.0], np.minimum(pro[last], 1.0)))

    # Keep points with fpr <= limit, then add the interpolated point at the limit.
    k = int(np.searchsorted(fpr, fpr_limit, side="right"))  # fpr[k-1] <= limit < fpr[k]
    x = fpr[:k]
    y = pro[:k]
    if k < fpr.size and x[-1] < fpr_limit:
        x0, x1, y0, y1 = fpr[k - 1], fpr[k], pro[k - 1], pro[k]
        y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        x = np.append(x, fpr_limit)
        y = np.append(y, y_lim)
    return x, y


def aupro(masks: Any, amaps: Any, fpr_limit: float = 0.3) -> float:
    """Normalized area under the per-region-overlap (PRO) curve up to ``fpr_limit``.

    Unlike pixel AUROC, every connected defect region counts equally, so small
    defects are not drowned out by large ones (Bergmann et al., MVTec AD).
    The trapezoidal area under :func:`pro_curve` is divided by ``fpr_limit`` so
    that a perfect detector scores 1.0.
    """
    return pro_area(*pro_curve(masks, amaps, fpr_limit), fpr_limit)


def pro_area(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float = 0.3) -> float:
    """AUPRO of a curve from :func:`pro_curve` at the same ``fpr_limit``: its trapezoidal area / ``fpr_limit``."""
    return float(np.sum((fpr[1:] - fpr[:-1]) * (pro[1:] + pro[:-1]) * 0.5)) / fpr_limit


def clopper_pearson(count: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) confidence interval of a rate measured as ``count`` of ``total``
    (e.g. false calls among normal test images): it covers the true rate with at least
    ``confidence``, however few the images; (0, 1) where ``total`` is 0."""
    if not 0 <= count <= total:
        raise ValueError(f"count must be between 0 and total, got {count} of {total}")
    if total == 0:
        return 0.0, 1.0
    from scipy.stats import binomtest

    interval = binomtest(count, total).proportion_ci(confidence_level=confidence, method="exact")
    return float(interval.low), float(interval.high)


def evaluate(
    labels: Any,
    scores: Any,
    masks: Any | None = None,
    amaps: Any | None = None,
    pro: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, float]:
    """Standard image-level (and optionally pixel-level) metrics as plain floats.

    ``masks``/``amaps`` should cover only images that have ground-truth masks;
    the caller selects those. ``pro``: their :func:`pro_curve`, where the caller has it
    already, so the costliest pixel sweep is not done twice.
    """
    y, s = _paired(labels, scores)
    _require_both_classes(y, "evaluate")
    f1, thr = f1_max(y, s)
    out: dict[str, float] = {
        "image_auroc": image_auroc(y, s),
        "image_f1": f1,
        "image_f1_threshold": thr,
    }
    if (masks is None) != (amaps is None):
        raise ValueError("masks and amaps must be given together")
    if masks is not None:
        m, a = _maps(masks, amaps)
        pf1, pthr = pixel_f1_max(m, a)
        out.update(
            pixel_auroc=pixel_auroc(m, a),
            pixel_f1=pf1,
            pixel_f1_threshold=pthr,
            aupro=aupro(m, a) if pro is None else pro_area(*pro),
        )
    return {k: float(v) for k, v in out.items()}
