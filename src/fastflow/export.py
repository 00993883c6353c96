"""Export a fitted detector to ONNX and OpenVINO IR, and run exported models.

The exported graph is ``InferenceGraph`` itself, traced: raw pixels in, ``anomaly_map``,
``score`` and ``label`` out, with the resize, the normalisation, the folded flows, the
reference scorer and the calibrated threshold inside. So the artifact alone reproduces the
Python scores (``check_parity`` measures it; the tests hold fp32 engines to 1e-4).

Input ``image``: (N, 3, H, W) uint8 RGB, N, H and W dynamic. Outputs: ``anomaly_map``
(N, height, width) float32 at the model's input size, ``score`` (N,) float32 (higher = more
anomalous) and ``label`` (N,) int64 (1 = anomalous). A ``model.json`` beside the model file
holds the config, the threshold, the precision and this description.

ONNX Runtime, OpenVINO and ONNX are optional (``pip install "fastflow[export]"``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import Tensor

from fastflow.errors import FastFlowError
from fastflow.model.inference import InferenceGraph

if TYPE_CHECKING:
    from fastflow.detector import FastFlow, ImagesLike

__all__ = [
    "ENGINES",
    "Engine",
    "OnnxRuntimeEngine",
    "OpenVinoEngine",
    "TorchEngine",
    "check_parity",
    "default_engine",
    "export_engine",
    "load_exported",
    "physical_cores",
    "read_metadata",
    "to_onnx",
    "to_openvino",
]

ENGINES = ("torch", "onnx", "openvino")
PRECISIONS = ("f32", "bf16")
INPUT_NAME = "image"
OUTPUT_NAMES = ("anomaly_map", "score", "label")
DEFAULT_OPSET = 17
_FORMAT = "fastflow-export"
_FORMAT_VERSION = 1
_INSTALL_HINT = 'install the export extra: pip install "fastflow[export]"'
_OPENVINO_BF16_WARNING = (
    "OpenVINO bf16 runs every layer in bf16 and fails fastflow's accuracy check (MVTec bottle, Lite0: "
    "image AUROC 0.99 -> 0.46); use f32, or the torch engine's bf16 (flows only)"
)


def physical_cores() -> int:
    """Physical CPU cores available to this process (hyper-threads do not speed up these kernels)."""
    try:
        available = os.sched_getaffinity(0)
        cores = set()
        for cpu in available:
            topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
            cores.add((package, core))
        return max(1, len(cores))
    except (AttributeError, OSError, ValueError):
        return max(1, (os.cpu_count() or 2) // 2)


# Images from which exporting on the fly pays off for `fastflow predict` (README, benchmark):
# ONNX export + session take 6-8 s for ResNet-18 and Lite0 on 2 cores, ONNX Runtime then saves
# about 0.02 s per 256x256 image over PyTorch: break-even near 350 images (Wide-ResNet-50-2: 60).
ONNX_MIN_IMAGES = 400


def default_engine(count: int) -> str:
    """The engine ``fastflow predict`` uses for ``count`` images when none is given.

    ONNX Runtime is the fastest exact (f32) engine measured on CPU (OpenVINO f32 is close or
    slower), but it needs an export first; for fewer than ``ONNX_MIN_IMAGES`` images, or
    without onnxruntime, PyTorch finishes sooner.
    """
    if count < ONNX_MIN_IMAGES:
        return "torch"
    try:
        __import__("onnxruntime")
        __import__("onnx")
    except ImportError:
        return "torch"
    return "onnx"


def _import(name: str) -> Any:
    try:
        return __import__(name)
    except ImportError:
        raise FastFlowError(f"the {name} package is needed for this engine or format; {_INSTALL_HINT}") from None


class Engine(Protocol):
    """Runs an inference graph: (N, 3, H, W) uint8 pixels -> (anomaly_map, score, label) as numpy."""

    def __call__(self, images: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


def _as_uint8(images: np.ndarray | Tensor) -> np.ndarray:
    array = images.numpy() if isinstance(images, Tensor) else np.asarray(images)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[1] != 3:
        raise FastFlowError(f"exported models take (N, 3, H, W) uint8 RGB images, got {array.dtype} {array.shape}")
    return np.ascontiguousarray(array)


class TorchEngine:
    """The ``InferenceGraph`` in PyTorch.

    ``precision="bf16"`` runs only the flows under CPU autocast (their convolutions in bf16);
    pre-processing, backbone and scorer stay in f32. A bf16 backbone ruins the scores of a
    trained model (MVTec bottle, Lite0: image AUROC 0.99 -> 0.55), bf16 flows alone keep image
    and pixel AUROC within 0.002 there (see the README).
    """

    name = "torch"

    def __init__(self, graph: InferenceGraph, precision: str = "f32") -> None:
        _check_precision(precision)
        self.graph, self.precision = graph.eval(), precision

    def __call__(self, images: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pixels = torch.as_tensor(images)
        with torch.inference_mode():
            if self.precision == "f32":
                amap, score, label = self.graph(pixels)
            else:
                features = self.graph.backbone(self.graph.preprocess(pixels))
                with torch.autocast("cpu", torch.bfloat16):
                    zs = self.graph.latents(features)
                amap, score, label = self.graph.score_latents([z.float() for z in zs])
        return amap.numpy(), score.numpy(), label.numpy()


class OnnxRuntimeEngine:
    """An exported ``.onnx`` model in ONNX Runtime (CPU), one intra-op thread per physical core."""

    name = "onnx"

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        ort = _import("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or physical_cores()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.precision = "f32"

    def __call__(self, images: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        amap, score, label = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: _as_uint8(images)})
        return amap, score, label


class OpenVinoEngine:
    """An exported OpenVINO IR (``model.xml``) on the CPU.

    Args:
        path: the ``.xml`` file.
        precision: ``"f32"`` or ``"bf16"`` (OpenVINO's inference precision hint; the IR holds
            f32 weights either way). bf16 fails the accuracy check (see the README): it warns.
        hint: ``"throughput"`` (several streams; a batch is split across them) or ``"latency"``
            (one stream using every core, for single images).
    """

    name = "openvino"

    def __init__(self, path: str | Path, precision: str = "f32", hint: str = "throughput") -> None:
        _check_precision(precision)
        if precision == "bf16":
            warnings.warn(_OPENVINO_BF16_WARNING, stacklevel=2)
        ov = _import("openvino")
        if hint not in ("throughput", "latency"):
            raise FastFlowError(f"unknown OpenVINO hint '{hint}'; use 'throughput' or 'latency'")
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": hint.upper()}
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.precision, self.hint = precision, hint
        self.streams = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self.queue = ov.AsyncInferQueue(self.compiled, self.streams)
        self.queue.set_callback(self._collect)
        self._results: dict[int, tuple[np.ndarray, ...]] = {}

    def _collect(self, request: Any, index: int) -> None:
        self._results[index] = tuple(np.array(request.get_output_tensor(i).data) for i in range(3))

    def __call__(self, images: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pixels = _as_uint8(images)
        chunk = -(-pixels.shape[0] // self.streams)  # one part per stream: all cores busy
        self._results = {}
        for index, start in enumerate(range(0, pixels.shape[0], chunk)):
            self.queue.start_async({0: pixels[start : start + chunk]}, index)
        self.queue.wait_all()
        parts = [self._results[i] for i in range(len(self._results))]
        amap, score, label = (np.concatenate([p[k] for p in parts]) for k in range(3))
        return amap, score, label


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise FastFlowError(f"unknown precision '{precision}'; use one of {', '.join(PRECISIONS)}")


# ---------------------------------------------------------------------------------------- export


def _metadata(detector: FastFlow, engine: str, precision: str, extra: dict[str, Any]) -> dict[str, Any]:
    from fastflow import __version__

    graph = detector.inference_graph()
    return {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "fastflow_version": __version__,
        "engine": engine,
        "precision": precision,
        "config": detector.config_.to_dict(),
        "threshold": float(detector.threshold_),
        "threshold_float32": float(graph.threshold),
        "map_floor": float(detector.map_floor_),
        "mean": list(graph.preprocess.mean.flatten().tolist()),
        "std": list(graph.preprocess.std.flatten().tolist()),
        "input": {
            "name": INPUT_NAME,
            "dtype": "uint8",
            "shape": ["batch", 3, "height", "width"],
            "layout": "NCHW, RGB, values 0..255, any height and width (resized inside)",
        },
        "outputs": {
            "anomaly_map": {"dtype": "float32", "shape": ["batch", *detector.config_.input_size]},
            "score": {"dtype": "float32", "shape": ["batch"], "meaning": "higher = more anomalous"},
            "label": {"dtype": "int64", "shape": ["batch"], "meaning": "1 = anomalous (score > threshold)"},
        },
        **extra,
    }


def _trace_to_onnx(graph: InferenceGraph, path: Path, opset: int) -> None:
    """Write ``graph`` traced to ONNX (dynamic batch, height and width) to ``path``.

    The last trace is kept on the graph (with its opset and threshold), so exporting one
    detector to both formats, or to a format and an engine, traces it once.
    """
    cache: dict[tuple[int, float], bytes] = graph.__dict__.setdefault("_onnx_traces", {})
    key = (opset, float(graph.threshold))
    if key not in cache:
        cache.clear()  # one trace at a time: it is as large as the weights
        with tempfile.TemporaryDirectory(prefix="fastflow-trace-") as tmp:
            _trace(graph, Path(tmp) / "model.onnx", opset)
            cache[key] = (Path(tmp) / "model.onnx").read_bytes()
    path.write_bytes(cache[key])


def _trace(graph: InferenceGraph, path: Path, opset: int) -> None:
    _import("onnx")
    height, width = graph.input_size
    # Not at the model's size, so a reader of the trace sees the resizing branch's shapes.
    example = torch.randint(0, 256, (2, 3, height + 16, width + 8), dtype=torch.uint8)
    axes = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, **{name: {0: "batch"} for name in OUTPUT_NAMES}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer chatter about shape arithmetic; parity is tested
        torch.onnx.export(
            graph, (example,), str(path), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
            dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=True,
        )


def _publish(staging: Path, destination: Path) -> None:
    """Move every file of ``staging`` into ``destination`` (created), replacing same-named files."""
    destination.mkdir(parents=True, exist_ok=True)
    for path in sorted(staging.iterdir()):
        os.replace(path, destination / path.name)


def _staging(destination: Path) -> tempfile.TemporaryDirectory:
    destination.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(dir=destination.parent, prefix=f".{destination.name}.")


def to_onnx(detector: FastFlow, directory: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Write ``model.onnx`` and ``model.json`` to ``directory``; returns the ``.onnx`` path.

    Run it with ONNX Runtime (``load_exported``, or any ONNX runtime: input ``image`` uint8
    (N, 3, H, W) RGB). Nothing is written unless the whole export succeeds.
    """
    directory = Path(directory)
    graph = detector.inference_graph()
    with _staging(directory) as tmp:
        _trace_to_onnx(graph, Path(tmp) / "model.onnx", opset)
        metadata = _metadata(detector, "onnx", "f32", {"model": "model.onnx", "opset": opset})
        (Path(tmp) / "model.json").write_text(json.dumps(metadata, indent=2))
        _publish(Path(tmp), directory)
    return directory / "model.onnx"


def to_openvino(detector: FastFlow, directory: str | Path, precision: str = "f32") -> Path:
    """Write OpenVINO IR (``model.xml`` + ``model.bin``) and ``model.json`` to ``directory``.

    The IR holds f32 weights. ``precision`` is the inference precision to compile it with
    (OpenVINO's ``INFERENCE_PRECISION_HINT``), recorded in ``model.json`` and used by
    ``load_exported``; "bf16" fails the accuracy check (see the README). Note that OpenVINO
    compiles in bf16 by default on CPUs that support it, so other programs must pass
    ``{"INFERENCE_PRECISION_HINT": "f32"}`` to get fastflow's scores.
    """
    _check_precision(precision)
    ov = _import("openvino")
    directory = Path(directory)
    graph = detector.inference_graph()
    with _staging(directory) as tmp:
        onnx_path = Path(tmp) / "trace" / "model.onnx"
        onnx_path.parent.mkdir()
        _trace_to_onnx(graph, onnx_path, DEFAULT_OPSET)
        model = ov.convert_model(str(onnx_path))
        model.set_rt_info(precision, ["runtime_options", "INFERENCE_PRECISION_HINT"])  # informative
        ov.save_model(model, str(Path(tmp) / "model.xml"), compress_to_fp16=False)
        shutil.rmtree(onnx_path.parent)
        metadata = _metadata(detector, "openvino", precision, {"model": "model.xml", "weights": "model.bin"})
        (Path(tmp) / "model.json").write_text(json.dumps(metadata, indent=2))
        _publish(Path(tmp), directory)
    return directory / "model.xml"


def _model_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in ("model.xml", "model.onnx") if (path / name).is_file()]
        if not found:
            raise FastFlowError(f"{path} holds no model.onnx or model.xml; pass a folder written by 'fastflow export'")
        return found[0]
    if not path.is_file():
        raise FastFlowError(f"exported model {path} does not exist; pass a folder written by 'fastflow export'")
    if path.suffix not in (".onnx", ".xml"):
        raise FastFlowError(f"{path} is neither an .onnx nor an OpenVINO .xml file")
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``model.json`` written beside an exported model (empty if there is none)."""
    meta = _model_file(path).with_suffix(".json")
    return json.loads(meta.read_text()) if meta.is_file() else {}


def load_exported(path: str | Path, precision: str | None = None, hint: str = "throughput") -> Engine:
    """An engine for an exported model: a folder from ``to_onnx`` / ``to_openvino`` or the model file.

    ``precision`` (OpenVINO only) defaults to the one recorded at export.
    """
    file = _model_file(path)
    if file.suffix == ".onnx":
        if precision not in (None, "f32"):
            raise FastFlowError("ONNX Runtime runs exported models in f32 only; use the openvino engine for bf16")
        return OnnxRuntimeEngine(file)
    return OpenVinoEngine(file, precision or read_metadata(file).get("precision", "f32"), hint)


def export_engine(detector: FastFlow, engine: str, precision: str = "f32") -> Engine:
    """Export ``detector`` to a temporary folder and load it with ``engine`` ("onnx" / "openvino")."""
    with tempfile.TemporaryDirectory(prefix="fastflow-export-") as tmp:
        if engine == "onnx":
            return load_exported(to_onnx(detector, tmp), precision)
        if engine == "openvino":
            return load_exported(to_openvino(detector, tmp, precision), precision)
    raise FastFlowError(f"unknown engine '{engine}'; use one of {', '.join(ENGINES)}")


# ---------------------------------------------------------------------------------------- parity


def _pixel_batches(detector: FastFlow, images: ImagesLike | np.ndarray | Tensor) -> Iterator[np.ndarray]:
    if isinstance(images, (np.ndarray, Tensor)):
        yield _as_uint8(images)
        return
    for _, batch in detector.raw_batches(images):
        yield batch["image"].numpy()


def check_parity(
    detector: FastFlow, exported_path: str | Path, images: ImagesLike | np.ndarray | Tensor, atol: float = 1e-4
) -> float:
    """Largest difference between the exported model's and PyTorch's fp32 maps and scores.

    Args:
        detector: the fitted detector that was exported.
        exported_path: the export folder or model file.
        images: image paths / a dataset folder, or a (N, 3, H, W) uint8 batch.
        atol: tolerance; above it (or if a label differs for a score farther than ``atol``
            from the threshold) a ``FastFlowError`` is raised.
    """
    reference = TorchEngine(detector.inference_graph())
    exported = load_exported(exported_path)
    worst = 0.0
    threshold = float(detector.inference_graph().threshold)
    for pixels in _pixel_batches(detector, images):
        ref_map, ref_score, ref_label = reference(pixels)
        out_map, out_score, out_label = exported(pixels)
        worst = max(worst, float(np.abs(out_map - ref_map).max()), float(np.abs(out_score - ref_score).max()))
        decided = np.abs(ref_score - threshold) > atol
        if not np.array_equal(out_label[decided], ref_label[decided]):
            raise FastFlowError(f"exported model {exported_path} gives other labels than PyTorch")
    if worst > atol:
        raise FastFlowError(f"exported model {exported_path} differs from PyTorch by {worst:.3g} (> {atol:g})")
    return worst
