"""Export an inference graph to ONNX and OpenVINO IR, and check an export against PyTorch.

The exported graph is ``InferenceGraph`` itself, traced: raw pixels in, ``anomaly_map``,
``score`` and ``label`` out, with the resize, the normalisation, the folded flows, the
recipe's scorer and the calibrated threshold inside. So the artifact alone reproduces the
Python scores (``check_parity`` measures it; the tests hold fp32 engines to 1e-4;
``verify_export`` runs the check ``fastflow export`` runs and records it with the export).

Input ``image``: (N, 3, H, W) uint8 RGB, N, H and W dynamic. Outputs: ``anomaly_map``
(N, height, width) float32 at the model's input size, ``score`` (N,) float32 (higher = more
anomalous) and ``label`` (N,) int64 (1 = anomalous). A ``model.json`` beside the model file
holds the config, the recipe, the threshold, the precision, this description and (from
``FastFlow.export``) the calibration: the sorted normal scores and rate the threshold came from,
which give each score its p-value outside the graph (``fastflow.estimator.calibration``).

ONNX Runtime, OpenVINO and ONNX are optional (``pip install "fastflow[export]"``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from fastflow.core.errors import FastFlowError
from fastflow.core.files import atomic_write, staged_folder
from fastflow.estimator.engines import (
    INPUT_NAME,
    OUTPUT_NAMES,
    Engine,
    TorchEngine,
    as_uint8,
    check_precision,
    exported_precision,
    import_optional,
    load_exported,
    metadata_path,
)
from fastflow.model.inference import InferenceGraph

__all__ = [
    "DEFAULT_OPSET",
    "EXPORT_PRECISIONS",
    "FittedDetector",
    "ParityReport",
    "bf16_tolerances",
    "check_parity",
    "export_engine",
    "exports_under",
    "random_pixels",
    "record_check",
    "to_onnx",
    "to_openvino",
    "verify_export",
]

DEFAULT_OPSET = 17
# The precision an export runs at unless asked otherwise: the fastest that kept the scores
# (OpenVINO bf16 with f32 pre-processing; measured: docs/measurements.md#openvino-bf16-default).
# ONNX Runtime runs f32 only.
EXPORT_PRECISIONS = {"onnx": "f32", "openvino": "bf16"}
_FORMAT = "fastflow-export"
_FORMAT_VERSION = 2


def _metadata(graph: InferenceGraph, engine: str, precision: str, extra: Mapping[str, Any]) -> dict[str, Any]:
    preprocess = graph.model.preprocess
    return {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "fastflow_version": importlib.metadata.version("fastflow"),
        "engine": engine,
        "precision": precision,
        "config": graph.model.config.to_dict(),
        "recipe": graph.recipe.to_dict(),
        "threshold_float32": float(graph.threshold),
        "mean": list(preprocess.mean),
        "std": list(preprocess.std),
        "input": {
            "name": INPUT_NAME,
            "dtype": "uint8",
            "shape": ["batch", 3, "height", "width"],
            "layout": "NCHW, RGB, values 0..255, any height and width (resized inside)",
        },
        "outputs": {
            "anomaly_map": {"dtype": "float32", "shape": ["batch", *graph.input_size]},
            "score": {"dtype": "float32", "shape": ["batch"], "meaning": "higher = more anomalous"},
            "label": {"dtype": "int64", "shape": ["batch"], "meaning": "1 = anomalous (score > threshold)"},
        },
        **extra,
    }


def _trace_to_onnx(graph: InferenceGraph, path: Path, opset: int) -> None:
    """Write ``graph`` traced to ONNX (dynamic batch, height and width) to ``path``.

    The last trace is kept on the graph (with its opset), so exporting one graph to both
    formats, or to a format and an engine, traces it once.
    """
    cache: dict[int, bytes] = graph.__dict__.setdefault("_onnx_traces", {})
    if opset not in cache:
        cache.clear()  # one trace at a time: it is as large as the weights
        with tempfile.TemporaryDirectory(prefix="fastflow-trace-") as tmp:
            _trace(graph, Path(tmp) / "model.onnx", opset)
            cache[opset] = (Path(tmp) / "model.onnx").read_bytes()
    path.write_bytes(cache[opset])


def _trace(graph: InferenceGraph, path: Path, opset: int) -> None:
    import_optional("onnx")
    height, width = graph.input_size
    # Not at the model's size, so a reader of the trace sees the resizing branch's shapes.
    example = torch.randint(0, 256, (2, 3, height + 16, width + 8), dtype=torch.uint8)
    axes = {
        INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
        **{name: {0: "batch"} for name in OUTPUT_NAMES},
    }
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer chatter about shape arithmetic; parity is tested
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
        )


def to_onnx(
    graph: InferenceGraph,
    directory: str | Path,
    extra: Mapping[str, Any] | None = None,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Write ``model.onnx`` and ``model.json`` (with ``extra`` added) to ``directory``; returns the ``.onnx`` path.

    Run it with ONNX Runtime (``load_exported``, or any ONNX runtime: input ``image`` uint8
    (N, 3, H, W) RGB). Nothing is written unless the whole export succeeds.
    """
    directory = Path(directory)
    with staged_folder(directory) as tmp:
        _trace_to_onnx(graph, tmp / "model.onnx", opset)
        metadata = _metadata(graph, "onnx", "f32", {"model": "model.onnx", "opset": opset, **(extra or {})})
        (tmp / "model.json").write_text(json.dumps(metadata, indent=2))
    return directory / "model.onnx"


def to_openvino(
    graph: InferenceGraph,
    directory: str | Path,
    precision: str = "f32",
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write OpenVINO IR (``model.xml`` + ``model.bin``) and ``model.json`` to ``directory``.

    The IR holds f32 weights. ``precision`` is the inference precision to compile it with,
    recorded in ``model.json`` and used by ``load_exported``: "bf16" runs the pre-processing
    as its own f32 model and the rest under OpenVINO's bf16 hint (``split_preprocessing``),
    which keeps the AUROC (docs/measurements.md#bf16-pre-processing). Note that OpenVINO compiles *every* layer
    in bf16 by default on CPUs that support it, which does not keep it, so other programs must
    pass ``{"INFERENCE_PRECISION_HINT": "f32"}`` or cut the graph as ``split_preprocessing`` does.
    """
    check_precision(precision)
    ov = import_optional("openvino")
    directory = Path(directory)
    with tempfile.TemporaryDirectory(prefix="fastflow-trace-") as trace, staged_folder(directory) as tmp:
        onnx_path = Path(trace) / "model.onnx"
        _trace_to_onnx(graph, onnx_path, DEFAULT_OPSET)
        model = ov.convert_model(str(onnx_path))
        model.set_rt_info(precision, ["runtime_options", "INFERENCE_PRECISION_HINT"])  # informative
        ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
        metadata = _metadata(
            graph, "openvino", precision, {"model": "model.xml", "weights": "model.bin", **(extra or {})}
        )
        (tmp / "model.json").write_text(json.dumps(metadata, indent=2))
    return directory / "model.xml"


def exports_under(folder: str | Path) -> list[Path]:
    """The folders in ``folder``, itself and two levels down (``RUN/onnx/``), that hold an export:
    a ``model.json`` of this format. ``fastflow calibrate`` names them, as they keep the threshold
    they were made with."""
    found = []
    metas = [
        meta
        for pattern in ("model.json", "*/model.json", "*/*/model.json")
        for meta in Path(folder).glob(pattern)
    ]
    for meta in sorted(metas):
        with contextlib.suppress(OSError, ValueError):
            content = json.loads(meta.read_text())
            if isinstance(content, dict) and content.get("format") == _FORMAT:
                found.append(meta.parent)
    return found


def export_engine(graph: InferenceGraph, engine: str, precision: str = "f32") -> Engine:
    """Export ``graph`` to a temporary folder and load it with ``engine`` ("onnx" / "openvino")."""
    with tempfile.TemporaryDirectory(prefix="fastflow-export-") as tmp:
        if engine == "onnx":
            return load_exported(to_onnx(graph, tmp), precision)
        if engine == "openvino":
            return load_exported(to_openvino(graph, tmp, precision), precision)
    raise FastFlowError(f"unknown engine '{engine}'; use onnx or openvino")


def check_parity(
    graph: InferenceGraph,
    exported_path: str | Path,
    batches: Iterable[np.ndarray | Tensor],
    atol: float = 1e-4,
    precision: str | None = None,
    map_atol: float | None = None,
) -> tuple[float, float]:
    """Largest (score, map) differences between the exported model and PyTorch's fp32 graph.

    Args:
        graph: the graph that was exported.
        exported_path: the export folder or model file.
        batches: (N, 3, H, W) uint8 pixel batches (e.g. ``FastFlow.pixel_batches(images)``).
        atol: tolerance for scores (and maps, unless ``map_atol``); above it (or if a label
            differs for a score farther than ``atol`` from the threshold) a ``FastFlowError``
            is raised.
        precision: the precision to run the export at (default: its own, as ``load_exported``).
        map_atol: tolerance for the maps, where it differs from the scores' (``bf16_tolerances``).
    """
    reference = TorchEngine(graph)
    exported = load_exported(exported_path, precision)
    map_atol = atol if map_atol is None else map_atol
    worst = worst_map = 0.0
    threshold = float(graph.threshold)
    for batch in batches:
        pixels = as_uint8(batch)
        ref_map, ref_score, ref_label = reference(pixels)
        out_map, out_score, out_label = exported(pixels)
        worst = max(worst, float(np.abs(out_score - ref_score).max()))
        worst_map = max(worst_map, float(np.abs(out_map - ref_map).max()))
        decided = np.abs(ref_score - threshold) > atol
        if not np.array_equal(out_label[decided], ref_label[decided]):
            raise FastFlowError(f"exported model {exported_path} gives other labels than PyTorch")
    if worst > atol or worst_map > map_atol:
        raise FastFlowError(
            f"exported model {exported_path} differs from PyTorch by {worst:.3g} in scores, "
            f"{worst_map:.3g} in maps (> {atol:g} / {map_atol:g})"
        )
    return worst, worst_map


def random_pixels(input_size: tuple[int, int], seed: int = 0) -> list[Tensor]:
    """Two batches of random uint8 images, at the model's input size and at a larger odd size
    (so the resize runs): enough to show an export computes the same graph as PyTorch."""
    height, width = input_size
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 256, (2, 3, h, w), generator=generator, dtype=torch.uint8)
        for h, w in ((height, width), (height * 2 + 3, width + 5))
    ]


def bf16_tolerances(threshold: float, normal_score: float) -> tuple[float, float]:
    """How far a bf16 engine's (scores, maps) may lie from f32's, in units of the distance from a
    typical normal score (the held-out median) to the threshold: 0.5 for scores, 2.5 for maps.

    Why this scale: what matters is whether a normal image can cross the threshold. Measured on
    default-recipe Lite0 models (40 epochs) over all their training images: OpenVINO bf16 with
    f32 pre-processing moved scores by up to 0.21 (bottle) and 0.29 (textures) of that distance
    and map pixels by up to 1.1 and 0.6, with image and pixel AUROC kept within 0.003; bf16
    everywhere moved bottle's (first 16 images) by 2.2 and 4.1 and cost it its AUROC. On random
    images (an 8-epoch bottle model) both moved scores by about 0.01 of the distance: only real
    images check a bf16 engine.
    """
    distance = abs(threshold - normal_score)
    return 0.5 * distance, 2.5 * distance


def record_check(exported_path: str | Path, check: Mapping[str, Any]) -> None:
    """Add ``check`` (what was compared, at which precision, the result) to the export's ``model.json``."""
    meta_path = metadata_path(exported_path)
    metadata = {**json.loads(meta_path.read_text()), "check": dict(check)}
    atomic_write(meta_path, lambda tmp: tmp.write_text(json.dumps(metadata, indent=2)))


class FittedDetector(Protocol):
    """What ``verify_export`` needs of a detector: a fitted ``fastflow.FastFlow`` has it all."""

    @property
    def threshold_(self) -> float: ...

    @property
    def map_floor_(self) -> float: ...

    @property
    def decision_scores_(self) -> np.ndarray: ...

    def inference_graph(self) -> InferenceGraph: ...

    def image_batches(self, X: Any) -> Iterator[tuple[list[Any], dict[str, Any]]]: ...


@dataclasses.dataclass(frozen=True)
class ParityReport:
    """What ``verify_export`` compared and found; ``to_dict()`` is the ``check`` entry it records
    in the export's ``model.json``."""

    precision: str  # the precision the export ran at: "f32" or "bf16"
    against: str  # the reference it was compared with: "PyTorch f32"
    images: str  # what both ran on: "random images" or "N images"
    max_score_difference: float
    max_map_difference: float
    score_tolerance: float
    map_tolerance: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """One line: the precision, the images, and the largest differences against their tolerances."""
        return (
            f"checked in {self.precision} against {self.against} on {self.images}: largest difference "
            f"{self.max_score_difference:.2g} in scores (tolerance {self.score_tolerance:.2g}), "
            f"{self.max_map_difference:.2g} in maps (tolerance {self.map_tolerance:.2g})"
        )


def verify_export(
    detector: FittedDetector,
    exported_path: str | Path,
    images: Any = None,
    record: bool = True,
) -> ParityReport:
    """Check an export of ``detector`` against the detector's PyTorch f32 graph, as ``fastflow
    export`` does, and (``record``) add the result to the export's ``model.json``.

    Without ``images`` the export runs in f32 on random images (``random_pixels``), to 1e-4: that
    shows it computes the same graph as PyTorch, but it cannot tell a bf16 export's rounding from a
    good export. With ``images`` (good images: files, or anything ``FastFlow.score`` takes) it runs
    at its own precision (``exported_precision``): f32 to 1e-4, bf16 to ``bf16_tolerances`` of
    the threshold and a typical normal score (the median held-out score, or the map floor of a
    detector without held-out scores).

    Args:
        detector: the fitted detector that was exported (``FastFlow.export``).
        exported_path: the export folder or model file.
        images: good images to check on; None: random images, in f32.
        record: write the result into the export's ``model.json`` (``record_check``).

    Raises:
        FastFlowError: the export does not keep the model's scores (the message says what to do).
    """
    graph = detector.inference_graph()
    batches: list[np.ndarray | Tensor]
    if images is None:
        precision, source, tolerance, map_tolerance = "f32", "random images", 1e-4, 1e-4
        batches = list(random_pixels(graph.model.config.input_size))
    else:
        precision = exported_precision(exported_path)
        loaded = [(len(samples), batch["image"]) for samples, batch in detector.image_batches(images)]
        batches, source = [pixels for _, pixels in loaded], f"{sum(n for n, _ in loaded)} images"
        held_out = detector.decision_scores_
        normal = float(np.median(held_out)) if len(held_out) else detector.map_floor_
        tolerance, map_tolerance = (
            (1e-4, 1e-4) if precision == "f32" else bf16_tolerances(detector.threshold_, normal)
        )
    try:
        worst_score, worst_map = check_parity(
            graph, exported_path, batches, tolerance, precision, map_tolerance
        )
    except FastFlowError as error:
        fix = (
            "export it with --precision f32"
            if precision == "bf16"
            else "export it again with this fastflow version"
        )
        raise FastFlowError(f"{error}; this export does not keep the model's scores: {fix}") from None
    report = ParityReport(precision, "PyTorch f32", source, worst_score, worst_map, tolerance, map_tolerance)
    if record:
        record_check(exported_path, report.to_dict())
    return report
