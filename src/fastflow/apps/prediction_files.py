"""Writing predictions to disk: per-image scores, p-values and labels, heat-map overlays, binary masks.

Each input is decoded once, by the loader that feeds the model, and results are assembled in a
staged folder (``fastflow.core.files.staged_folder``) that replaces the files in the destination
only once every image succeeded, so a bad input (its one-line error raised when its turn comes)
never leaves half-written output behind.
"""

from __future__ import annotations

import csv
import glob
import json
from pathlib import Path

import numpy as np

from fastflow.apps.viz import save_mask, save_overlay
from fastflow.core.errors import FastFlowError
from fastflow.core.files import staged_folder
from fastflow.estimator.calibration import p_value_json
from fastflow.estimator.data import ShapeLimits, check_shapes, list_images
from fastflow.estimator.detector import FastFlow, ImagesLike, as_samples

__all__ = ["expand_inputs", "write_predictions"]

# The shape limits 'fastflow predict' and 'fastflow serve' apply by default.
DEFAULT_LIMITS = ShapeLimits()


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Image files, folders (their images) and glob patterns -> a sorted list of image paths."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = list_images(path)
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
        if not found:
            raise FastFlowError(
                f"no images found for input '{item}'; pass image files, a folder of images or a glob"
            )
        paths.extend(found)
    return paths


def _unique_names(paths: list[Path]) -> list[str]:
    """Readable, collision-free file stems: ``<folder>_<stem>`` (MVTec test sets reuse stems)."""
    names, seen = [], set()
    for path in paths:
        base = f"{path.parent.name}_{path.stem}" if path.parent.name else path.stem
        name, counter = base, 1
        while name in seen:
            counter += 1
            name = f"{base}_{counter}"
        seen.add(name)
        names.append(name)
    return names


def write_predictions(
    detector: FastFlow,
    images: ImagesLike,
    output: Path,
    engine: str = "torch",
    precision: str = "f32",
    limits: ShapeLimits = DEFAULT_LIMITS,
) -> list[dict]:
    """Score ``images`` and write ``overlays/``, ``masks/``, ``predictions.csv`` and ``.json`` to ``output``.

    Each row: path, score, p-value (empty / null without calibration scores), label, pictures;
    the JSON also says which threshold and calibration gave the labels and p-values.

    ``engine`` / ``precision``: see ``FastFlow.engine``. Each image is decoded once, to score
    it; the pictures and the mask's size come from those pixels. A file that cannot be decoded
    stops the run with its one-line error, and the staged folder is dropped. Before anything is
    scored, every image's size (from its header) is checked against ``limits``, as ``fastflow
    serve`` checks uploads: the first too small or too elongated image stops the run.
    """
    samples = as_samples(images)
    if not samples:
        raise FastFlowError("no images to score; pass image files, a folder of images or a glob")
    check_shapes(samples, limits)
    names = _unique_names([s.path for s in samples])
    rows: list[dict] = []
    with staged_folder(output) as tmp:
        (tmp / "overlays").mkdir()
        (tmp / "masks").mkdir()
        for batch_samples, prediction, batch in detector.iter_predictions(samples, engine, precision):
            for i, sample in enumerate(batch_samples):
                name = names[len(rows)]
                amap, pixels = (
                    prediction.maps[i],
                    np.ascontiguousarray(batch["image"][i].permute(1, 2, 0).numpy()),
                )
                height, width = pixels.shape[:2]
                save_overlay(
                    tmp / "overlays" / f"{name}.png", pixels, amap, detector.map_floor_, detector.threshold_
                )
                save_mask(tmp / "masks" / f"{name}.png", amap, detector.threshold_, (width, height))
                rows.append(
                    {
                        "path": str(sample.path),
                        "score": float(prediction.scores[i]),
                        "p_value": p_value_json(prediction.p_values[i]),
                        "label": "anomalous" if prediction.labels[i] else "normal",
                        "overlay": f"overlays/{name}.png",
                        "mask": f"masks/{name}.png",
                    }
                )
        with open(tmp / "predictions.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        summary = {
            "threshold": detector.threshold_,
            **detector.calibration_.summary(),
            "predictions": rows,
        }
        (tmp / "predictions.json").write_text(json.dumps(summary, indent=2))
    return rows
