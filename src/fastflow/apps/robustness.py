"""Robustness: how a trained model's scores survive changes no inspector could see.

``measure(detector, samples, names, seed)`` scores every sample once per perturbation; each row
gives image AUROC, pixel AUROC and AUPRO (normal images plus anomalous images with a mask, as
``fastflow.estimator.evaluation`` counts them), the AUROCs as deltas against ``clean`` too, and the median
normal-score drift::

    (median normal score, perturbed - median normal score, clean)
        / (median anomalous score, clean - median normal score, clean)

0 means the normal images did not move; 1 means they moved as far up as the gap that separates
the normal from the anomalous images in clean data. A change that an inspector cannot see
should leave all three near 0. ``clean`` is always the first row: the others are measured
against it. ``fastflow test RUN DATA --robustness`` and ``benchmarks/robustness.py`` print it;
``benchmarks/robust_study.py`` runs it on a validation set of painted defects.

The perturbations (pixel ones act on the decoded (3, H, W) uint8 RGB image at its own size,
before the model's resize, which happens inside the graph). Noise and JPEG are the functions
training's noisy copies use (``fastflow.estimator.augment``); noise is drawn per image from
``augment.image_generator(seed, image index)``, so a run is deterministic for a ``seed`` and
``noise2`` is ``noise1``'s noise doubled before rounding:

- ``clean``: the decoded pixels, float32 graph.
- ``noise1``, ``noise2``: Gaussian noise, sigma 1 / 2 grey levels, rounded and clipped to 0..255.
- ``shift4``: what a camera moved by 4 pixels sees: the first 4 rows and columns cropped, so
  the content moves 4 pixels up and left and the image is 4 pixels smaller each way (a 0.4 %
  zoom at 900 px, 1.5 % at 260 px, once resized to the model's input). Nothing is invented:
  filling the uncovered edge (edge padding, as an earlier version did) paints a 4-pixel smear
  that is visible on a textured part. The mask is cropped the same way at the image's full
  resolution (``fastflow.estimator.data.load_mask``), then resized to the model size (nearest, as
  ``load_mask`` resizes); moving the model-size mask instead would round 4 * 256 / 900 = 1.14
  pixels to 1.
- ``jpeg95``, ``jpeg80``: re-encoded as JPEG (Pillow, quality 95 / 80, Pillow's default 4:2:0
  chroma subsampling) and decoded again.
- ``bright3``: +3 grey levels, clipped to 255.
- ``bf16_backbone``: clean pixels; the resize and normalisation in float32, the backbone under
  ``torch.autocast("cpu", torch.bfloat16)``, its features cast back to float32 for the flows
  and the scorer. (``FastFlowModel.extract`` under autocast would also run the resize's matrix
  products in bf16, which moves the pixels themselves (measured:
  docs/measurements.md#bf16-resize); a pixel change, not the backbone's.)
- ``bf16_graph``: the whole inference graph (resize, backbone, flows, scorer) under CPU bf16
  autocast; map and score cast to float32.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from fastflow.apps import result_tables
from fastflow.core.errors import FastFlowError
from fastflow.estimator.augment import add_pixel_noise, image_generator, jpeg_round_trip
from fastflow.estimator.data import Sample, load_mask
from fastflow.estimator.detector import FastFlow
from fastflow.estimator.engines import Engine
from fastflow.estimator.metrics import aupro, image_auroc, pixel_auroc
from fastflow.model.inference import InferenceGraph

__all__ = [
    "PERTURBATIONS",
    "TABLE_ALIGN",
    "TABLE_COLUMNS",
    "Perturbation",
    "markdown_table",
    "measure",
    "perturbation_names",
    "table_rows",
]

ImageChange = Callable[[Tensor, torch.Generator], Tensor]  # one (3, H, W) uint8 image
Runner = Callable[[InferenceGraph, Tensor], tuple[Tensor, Tensor]]  # pixels -> (anomaly map, score)


# --------------------------------------------------------------------------- pixel changes


def unchanged(image: Tensor, generator: torch.Generator) -> Tensor:
    return image


def gaussian_noise(image: Tensor, generator: torch.Generator, sigma: float) -> Tensor:
    """Sensor-like noise: ``sigma`` grey levels, rounded back to uint8 as a camera would store it
    (``augment.add_pixel_noise``, as training's noisy copies)."""
    return add_pixel_noise(image, sigma, generator)


ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, Tensor)


def crop_top_left(array: ArrayOrTensor, by: int) -> ArrayOrTensor:
    """A (3, H, W) image or (H, W) mask without its first ``by`` rows and columns: the view of a
    camera moved by ``by``.

    Cropping, not ``np.roll`` or padding: wrapping would carry the bottom rows to the top and
    padding would invent pixels; either changes what the image shows, not just where it is.
    """
    return array[..., by:, by:]


def shifted(image: Tensor, generator: torch.Generator, by: int) -> Tensor:
    return crop_top_left(image, by)


def jpeg(image: Tensor, generator: torch.Generator, quality: int) -> Tensor:
    """One JPEG round trip (``augment.jpeg_round_trip``, as training's compressed copies), as when
    images pass through a camera or a storage system that compresses."""
    return jpeg_round_trip(image, quality)


def brighter(image: Tensor, generator: torch.Generator, levels: int) -> Tensor:
    """A slightly brighter light or longer exposure: ``levels`` grey levels added, clipped."""
    return (image.to(torch.int16) + levels).clamp_(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------- precisions


def run_f32(graph: InferenceGraph, pixels: Tensor) -> tuple[Tensor, Tensor]:
    amap, score, _ = graph(pixels)
    return amap, score


def run_bf16_backbone(graph: InferenceGraph, pixels: Tensor) -> tuple[Tensor, Tensor]:
    """Only the backbone in bf16: how much of the bf16 damage its rounding alone does."""
    model = graph.model
    normalised = model.preprocess(pixels)
    with torch.autocast("cpu", torch.bfloat16):
        features = model.features(normalised)
    zs, _ = model.flow(model.with_context([f.float() for f in features]))
    return graph.score_latents(zs)


def run_bf16_graph(graph: InferenceGraph, pixels: Tensor) -> tuple[Tensor, Tensor]:
    """Everything in bf16, as an engine compiled with a bf16 precision hint runs it."""
    with torch.autocast("cpu", torch.bfloat16):
        amap, score, _ = graph(pixels)
    return amap.float(), score.float()


@dataclass(frozen=True)
class Perturbation:
    """What changes: the pixels (``image``), where the content is (``moves``, masks too), or arithmetic."""

    image: ImageChange = unchanged
    moves: Callable[[np.ndarray], np.ndarray] | None = None
    run: Runner = run_f32


PERTURBATIONS: dict[str, Perturbation] = {
    "clean": Perturbation(),
    "noise1": Perturbation(partial(gaussian_noise, sigma=1.0)),
    "noise2": Perturbation(partial(gaussian_noise, sigma=2.0)),
    "shift4": Perturbation(partial(shifted, by=4), partial(crop_top_left, by=4)),
    "jpeg95": Perturbation(partial(jpeg, quality=95)),
    "jpeg80": Perturbation(partial(jpeg, quality=80)),
    "bright3": Perturbation(partial(brighter, levels=3)),
    "bf16_backbone": Perturbation(run=run_bf16_backbone),
    "bf16_graph": Perturbation(run=run_bf16_graph),
}


# --------------------------------------------------------------------------- scoring


def perturbed_pixels(images: Tensor, change: ImageChange, first_index: int, seed: int) -> Tensor:
    """(N, 3, H, W) uint8 -> the same with ``change`` applied per image, each with its own generator."""
    return torch.stack(
        [change(image, image_generator(seed, first_index + offset)) for offset, image in enumerate(images)]
    )


def moved_mask(
    sample: Sample,
    image_size: tuple[int, int],
    model_size: tuple[int, int],
    moves: Callable[[np.ndarray], np.ndarray],
) -> np.ndarray:
    """The ground truth of a moved image: moved at full resolution, then resized as ``load_mask`` does."""
    assert sample.mask is not None, "only an image with a mask has a mask to move"
    full = moves(load_mask(sample.mask, image_size).numpy())
    height, width = model_size
    small = Image.fromarray(full.astype(np.uint8) * 255, "L").resize(
        (width, height), Image.Resampling.NEAREST
    )
    return np.asarray(small) > 0


def score_test_set(
    detector: FastFlow,
    samples: list[Sample],
    perturbation: Perturbation,
    seed: int,
    engine: Engine | None = None,
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Scores of all ``samples``; maps and masks of the ones with pixel truth (normal, or with a mask).

    ``engine`` (e.g. ``detector.engine("openvino", "bf16")``) scores the pixels instead of the
    float32 graph; perturbations of the arithmetic (bf16 rows) need the graph itself.
    """
    if engine is not None and perturbation.run is not run_f32:
        raise FastFlowError(
            "the bf16 perturbations change PyTorch's arithmetic; leave them out with an engine"
        )
    graph = detector.inference_graph()
    model_size = detector.config.input_size
    scores, maps, masks = [], [], []
    done = 0
    with torch.inference_mode():
        for batch_samples, batch in detector.image_batches(samples):
            pixels = perturbed_pixels(batch["image"], perturbation.image, done, seed)
            if engine is None:
                amap, score = perturbation.run(graph, pixels)
            else:
                amap, score, _ = (torch.from_numpy(a) for a in engine(pixels))
            scores.append(score.numpy())
            for i, sample in enumerate(batch_samples):
                if sample.label == 0 or bool(batch["has_mask"][i]):
                    mask = batch["mask"][i].numpy()
                    if perturbation.moves is not None and sample.mask is not None:
                        mask = moved_mask(
                            sample, tuple(batch["image"].shape[-2:]), model_size, perturbation.moves
                        )
                    masks.append(mask)
                    maps.append(amap[i].numpy())
            done += len(batch_samples)
    return np.concatenate(scores), maps, masks


def measure(
    detector: FastFlow, samples: list[Sample], names: list[str], seed: int, engine: Engine | None = None
) -> list[dict]:
    """One row per perturbation (``clean`` first): AUROCs, their deltas and the normal-score drift;
    with ``engine``, of that engine's scores (``score_test_set``)."""
    labels = np.array([s.label for s in samples])
    rows: list[dict[str, Any]] = []
    for name in names:
        start = time.perf_counter()
        scores, maps, masks = score_test_set(detector, samples, PERTURBATIONS[name], seed, engine)
        masks_array, maps_array = np.stack(masks), np.stack(maps)
        row: dict[str, Any] = {
            "perturbation": name,
            "image_auroc": image_auroc(labels, scores),
            "pixel_auroc": pixel_auroc(masks_array, maps_array),
            "aupro": aupro(masks_array, maps_array),
            "median_normal_score": float(np.median(scores[labels == 0])),
            "median_anomalous_score": float(np.median(scores[labels == 1])),
            "seconds": round(time.perf_counter() - start, 1),
        }
        clean = rows[0] if rows else row
        gap = clean["median_anomalous_score"] - clean["median_normal_score"]
        row.update(
            delta_image_auroc=row["image_auroc"] - clean["image_auroc"],
            delta_pixel_auroc=row["pixel_auroc"] - clean["pixel_auroc"],
            normal_drift=(row["median_normal_score"] - clean["median_normal_score"]) / gap,
        )
        rows.append(row)
        print(
            f"{name}: image {row['image_auroc']:.4f} pixel {row['pixel_auroc']:.4f} "
            f"drift {row['normal_drift']:+.4f} {row['seconds']:.0f}s",
            file=sys.stderr,
            flush=True,
        )
    return rows


def perturbation_names(names: str | list[str]) -> list[str]:
    """A comma-separated list (or a list) of perturbation names, checked, ``clean`` first, no repeats."""
    listed = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    unknown = [n for n in listed if n and n not in PERTURBATIONS]
    if unknown:
        raise FastFlowError(f"unknown perturbation(s) {', '.join(unknown)}; use {', '.join(PERTURBATIONS)}")
    return ["clean"] + [n for n in dict.fromkeys(listed) if n and n != "clean"]


# ``measure``'s rows as a table: its columns, their alignment and each row's cells (``table_rows``).
TABLE_COLUMNS = [
    "perturbation",
    "image AUROC",
    "delta",
    "pixel AUROC",
    "delta",
    "median normal drift",
    "seconds",
]
TABLE_ALIGN = ["", *["right"] * 6]


def table_rows(rows: list[dict]) -> list[list[str]]:
    """``measure``'s rows as the cells of ``TABLE_COLUMNS``."""
    return [
        [
            row["perturbation"],
            f"{row['image_auroc']:.4f}",
            f"{row['delta_image_auroc']:+.4f}",
            f"{row['pixel_auroc']:.4f}",
            f"{row['delta_pixel_auroc']:+.4f}",
            f"{row['normal_drift']:+.4f}",
            f"{row['seconds']:.0f}",
        ]
        for row in rows
    ]


def markdown_table(rows: list[dict]) -> str:
    """``measure``'s rows as a markdown table."""
    return result_tables.markdown_table(TABLE_COLUMNS, table_rows(rows), TABLE_ALIGN)
