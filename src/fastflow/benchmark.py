"""``fastflow benchmark``: datasets x backbones (x seeds) -> the seed's tables in markdown.

Each run trains on a category's normal images and tests on its test split exactly as
``fastflow train`` / ``fastflow test`` do, writes one JSON file, and the tables (image AUROC,
pixel AUROC, image F1, pixel F1, AUPRO) get one row per category, one column per backbone,
and an Average row. With several seeds a cell shows the mean and the spread (min-max).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastflow.detector import FastFlow
from fastflow.evaluation import evaluate_detector
from fastflow.io import atomic_write
from fastflow.train import TrainConfig

__all__ = ["BenchmarkRun", "TABLE_METRICS", "markdown_tables", "run_benchmark"]

TABLE_METRICS = {
    "image_auroc": "Image AUROC",
    "pixel_auroc": "Pixel AUROC",
    "image_f1": "Image F1",
    "pixel_f1": "Pixel F1",
    "aupro": "AUPRO",
}


@dataclass(frozen=True)
class BenchmarkRun:
    """One trained and tested model: where, with what, and its metrics."""

    category: str
    backbone: str
    seed: int
    metrics: dict[str, float]


def run_benchmark(
    datasets: Iterable[Path],
    backbones: Iterable[str],
    output: Path,
    *,
    weights: dict[str, str | Path | None],
    seeds: Iterable[int] = (0,),
    training: TrainConfig | None = None,
    **overrides: Any,
) -> list[BenchmarkRun]:
    """Train and test every (dataset, backbone, seed); write ``output/<cat>__<backbone>__seed<k>.json``."""
    runs = []
    for dataset in datasets:
        for backbone in backbones:
            for seed in seeds:
                config = TrainConfig(**{**vars(training or TrainConfig()), "seed": seed})
                detector = FastFlow(backbone, weights=weights.get(backbone), training=config, **overrides)
                detector.fit(dataset)
                metrics = evaluate_detector(detector, dataset).metrics
                run = BenchmarkRun(Path(dataset).name, backbone, seed, metrics)
                record = {**vars(run), "epochs": len(detector.history_), "best_epoch": detector.best_epoch_}
                name = f"{run.category}__{backbone}__seed{seed}.json"
                atomic_write(output / name, lambda tmp, r=record: tmp.write_text(json.dumps(r, indent=2)))
                runs.append(run)
    return runs


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def markdown_tables(runs: list[BenchmarkRun]) -> str:
    """One markdown table per metric: categories x backbones, with an Average row."""
    categories = list(dict.fromkeys(r.category for r in runs))
    backbones = list(dict.fromkeys(r.backbone for r in runs))
    blocks = []
    for key, title in TABLE_METRICS.items():
        lines = [f"### {title}", "", "| category | " + " | ".join(backbones) + " |", "|---" * (len(backbones) + 1) + "|"]
        per_backbone_means: dict[str, list[float]] = {b: [] for b in backbones}
        for category in categories:
            cells = []
            for backbone in backbones:
                values = [r.metrics[key] for r in runs if r.category == category and r.backbone == backbone and key in r.metrics]
                cells.append(_cell(values) if values else "-")
                if values:
                    per_backbone_means[backbone].append(statistics.mean(values))
            lines.append(f"| {category} | " + " | ".join(cells) + " |")
        averages = [f"{statistics.mean(v):.3f}" if v else "-" for v in per_backbone_means.values()]
        lines.append("| **Average** | " + " | ".join(averages) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"
