"""Evaluating a fitted detector on a labelled test set (the seed's four tables plus AUPRO).

Pixel metrics use every image that has a ground truth: normal images (an empty mask) and
anomalous images with a mask; anomalous images without a mask count at image level only.
Beside the F1-optimal thresholds (an upper bound, chosen on the test labels) the report gives
precision/recall/F1 at the deployment threshold calibrated on normal images, and what a line
counts: the false-call rate (normal images flagged) and the escape rate (anomalous images
passed), each with its exact 95 % interval (``Rate``), also at other target false-alarm rates
of the same calibration (``rates_at``). On request the report keeps the PRO curve behind
AUPRO, for plotting (``fastflow.apps.report``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import precision_recall_fscore_support

from fastflow.core.errors import FastFlowError
from fastflow.estimator.calibration import Calibration, p_value_json
from fastflow.estimator.data import load_samples
from fastflow.estimator.detector import FastFlow
from fastflow.estimator.metrics import clopper_pearson, evaluate, pro_curve

__all__ = ["EvaluationReport", "Rate", "escapes", "evaluate_detector", "false_calls", "rates_at"]


@dataclass
class EvaluationReport:
    """Metrics (floats in 0..1), one row per test image and, if asked for, the PRO curve
    (fpr, pro) up to FPR 0.3 (``None`` without pixel ground truth)."""

    metrics: dict[str, float]
    images: list[dict[str, Any]] = field(default_factory=list)
    pro_curve: tuple[np.ndarray, np.ndarray] | None = None


@dataclass(frozen=True)
class Rate:
    """``count`` of ``total`` images (false calls among normal ones, escapes among anomalous
    ones), with the exact (Clopper-Pearson) 95 % interval of the rate behind it."""

    count: int
    total: int

    @property
    def value(self) -> float:
        return self.count / self.total if self.total else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        return clopper_pearson(self.count, self.total)

    def to_dict(self) -> dict[str, Any]:
        low, high = self.interval
        return {"count": self.count, "total": self.total, "rate": self.value, "low": low, "high": high}


def false_calls(images: list[dict[str, Any]], threshold: float | None = None) -> Rate:
    """Normal images (``label`` 0) flagged: ``predicted`` 1, or score above ``threshold`` where given."""
    normal = [row for row in images if row["label"] == 0]
    return Rate(sum(_flagged(row, threshold) for row in normal), len(normal))


def escapes(images: list[dict[str, Any]], threshold: float | None = None, defect: str | None = None) -> Rate:
    """Anomalous images (of type ``defect``, or all) passed: ``predicted`` 0, or score at or below ``threshold``."""
    anomalous = [row for row in images if row["label"] == 1 and defect in (None, row["defect"])]
    return Rate(sum(not _flagged(row, threshold) for row in anomalous), len(anomalous))


def _flagged(row: dict[str, Any], threshold: float | None) -> bool:
    return bool(row["predicted"]) if threshold is None else row["score"] > threshold


def rates_at(images: list[dict[str, Any]], calibration: Calibration, rate: float) -> dict[str, Any]:
    """The test set's false calls and escapes at the threshold ``calibration`` gives for ``rate``,
    beside what it guarantees: one row of the benchmark's table of target rates."""
    threshold = calibration.threshold(rate)
    low, high = calibration.realised_range(rate)
    return {
        "target": rate,
        "calibration_images": calibration.n,
        "threshold": threshold,
        "guaranteed": calibration.guaranteed_rate(rate),
        "realised_low": low,
        "realised_high": high,
        "too_few": calibration.too_few(rate) is not None,
        "false_calls": false_calls(images, threshold).to_dict(),
        "escapes": escapes(images, threshold).to_dict(),
    }


def evaluate_detector(detector: FastFlow, data: str | Path, keep_pro_curve: bool = False) -> EvaluationReport:
    """Score every test image of ``data`` (MVTec or folder layout) and compute the metrics.

    ``keep_pro_curve`` also keeps the PRO curve, thinned to about 1000 points: the pixel maps
    are gone once this returns, and the exact curve has a point per distinct pixel score.
    """
    samples = load_samples(Path(data), "test")
    labels = np.array([s.label for s in samples])
    if labels.min() == labels.max():
        raise FastFlowError(
            f"test set {data} has only {'anomalous' if labels[0] else 'normal'} images; "
            "evaluation needs both normal and anomalous test images"
        )
    scores, masks, maps, rows = [], [], [], []
    for batch_samples, prediction, batch in detector.iter_predictions(samples):
        scores.append(prediction.scores)
        for i, sample in enumerate(batch_samples):
            if sample.label == 0 or bool(batch["has_mask"][i]):
                masks.append(batch["mask"][i].numpy())
                maps.append(prediction.maps[i])
            rows.append(
                {
                    "path": str(sample.path),
                    "defect": sample.defect,
                    "label": sample.label,
                    "score": float(prediction.scores[i]),
                    "p_value": p_value_json(prediction.p_values[i]),
                    "predicted": int(prediction.labels[i]),
                }
            )
    all_scores = np.concatenate(scores)
    has_pixel_truth = any(mask.any() for mask in masks)
    pixel_masks = np.stack(masks) if has_pixel_truth else None
    pixel_maps = np.stack(maps) if has_pixel_truth else None
    exact_curve = pro_curve(pixel_masks, pixel_maps) if keep_pro_curve and has_pixel_truth else None
    metrics = evaluate(labels, all_scores, pixel_masks, pixel_maps, exact_curve)
    curve = None if exact_curve is None else _thinned(*exact_curve)
    predicted = (all_scores > detector.threshold_).astype(int)
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, predicted, average="binary", zero_division=0
    )
    metrics.update(
        deploy_threshold=float(detector.threshold_),
        deploy_precision=float(precision),
        deploy_recall=float(recall),
        deploy_f1=float(f1),
        deploy_false_call_rate=false_calls(rows).value,
        deploy_escape_rate=escapes(rows).value,
    )
    return EvaluationReport(metrics, rows, curve)


def _thinned(fpr: np.ndarray, pro: np.ndarray, points: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """The curve's start, its last point at or below each of ``points`` even FPR steps, and its
    end: on a plot the same line as the exact curve, in kilobytes instead of a point per pixel."""
    steps = np.linspace(0.0, fpr[-1], points + 1)
    keep = np.unique(np.concatenate(([0], np.searchsorted(fpr, steps, side="right") - 1, [fpr.size - 1])))
    return fpr[keep], pro[keep]
