"""Inference engines: the inference graph in PyTorch, or an exported model in ONNX Runtime or OpenVINO.

Each engine takes (N, 3, H, W) uint8 RGB pixels and returns (anomaly_map, score, label) as
numpy arrays; ``fastflow.estimator.export`` writes the files the exported engines load. An
exported engine also holds the export's calibration (``calibration.p_values(score)``: the
p-values the detector gives). ONNX Runtime and OpenVINO are optional (``pip install "fastflow[export]"``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from fastflow.core.errors import FastFlowError
from fastflow.core.hardware import cpu_has_native_bf16, physical_cores
from fastflow.estimator.calibration import Calibration
from fastflow.model.inference import InferenceGraph

__all__ = [
    "ENGINES",
    "INPUT_NAME",
    "OUTPUT_NAMES",
    "PRECISIONS",
    "Engine",
    "ExportedEngine",
    "OnnxRuntimeEngine",
    "OpenVinoEngine",
    "TorchEngine",
    "as_uint8",
    "check_engine",
    "check_precision",
    "choose_engine",
    "default_precision",
    "exported_precision",
    "import_optional",
    "load_exported",
    "metadata_path",
    "read_metadata",
    "split_preprocessing",
]

ENGINES = ("torch", "onnx", "openvino")
PRECISIONS = ("f32", "bf16")
INPUT_NAME = "image"
OUTPUT_NAMES = ("anomaly_map", "score", "label")
_INSTALL_HINT = 'install the export extra: pip install "fastflow[export]"'
# Where the traced graph's pre-processing (``FastFlowModel.preprocess``) lives: ONNX names ops by module.
_PREPROCESS_SCOPE = "/model/preprocess/"


def import_optional(name: str) -> Any:
    try:
        return __import__(name)
    except ImportError:
        raise FastFlowError(
            f"the {name} package is needed for this engine or format; {_INSTALL_HINT}"
        ) from None


class Engine(Protocol):
    """Runs an inference graph: (N, 3, H, W) uint8 pixels -> (anomaly_map, score, label) as numpy."""

    precision: str  # what it computes in: one of PRECISIONS

    def __call__(self, images: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


class ExportedEngine(Engine, Protocol):
    """An engine of an exported model, with the calibration its ``model.json`` carries."""

    calibration: Calibration


def as_uint8(images: np.ndarray | Tensor) -> np.ndarray:
    array = images.numpy() if isinstance(images, Tensor) else np.asarray(images)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[1] != 3:
        raise FastFlowError(
            f"exported models take (N, 3, H, W) uint8 RGB images, got {array.dtype} {array.shape}"
        )
    return np.ascontiguousarray(array)


class TorchEngine:
    """The ``InferenceGraph`` in PyTorch.

    ``precision="bf16"`` runs only the flows under CPU autocast (their convolutions in bf16);
    pre-processing, backbone and scorer stay in f32: a trained flow amplifies the backbone's
    rounding, so a bf16 backbone ruins the scores (measured: docs/measurements.md#bf16-backbone).
    """

    name = "torch"

    def __init__(self, graph: InferenceGraph, precision: str = "f32") -> None:
        check_precision(precision)
        self.graph, self.precision = graph.eval(), precision

    def __call__(self, images: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pixels = torch.as_tensor(images)
        with torch.inference_mode():
            if self.precision == "f32":
                amap, score, label = self.graph(pixels)
            else:
                features = self.graph.model.extract(pixels)
                with torch.autocast("cpu", torch.bfloat16):
                    zs, _ = self.graph.model.flow(features)
                amap, score = self.graph.score_latents([z.float() for z in zs])
                label = self.graph.label(score)
        return amap.numpy(), score.numpy(), label.numpy()


class OnnxRuntimeEngine:
    """An exported ``.onnx`` model in ONNX Runtime (CPU), one intra-op thread per physical core;
    ``calibration``: the export's (from its ``model.json``), for p-values."""

    name = "onnx"

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        ort = import_optional("onnxruntime")
        self.calibration = Calibration.from_metadata(read_metadata(path))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or physical_cores()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.precision = "f32"

    def __call__(self, images: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        amap, score, label = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: as_uint8(images)})
        return amap, score, label


class OpenVinoEngine:
    """An exported OpenVINO IR (``model.xml``) on the CPU.

    Args:
        path: the ``.xml`` file.
        precision: ``"f32"`` or ``"bf16"``. With bf16 the pre-processing (resize, normalisation)
            runs as its own f32 model and the rest (backbone, flows, scorer) under OpenVINO's
            bf16 inference precision hint (``split_preprocessing`` says why). The IR holds f32
            weights either way.
        hint: ``"throughput"`` (several streams; a batch is split across them) or ``"latency"``
            (one stream using every core, for single images).

    ``calibration``: the export's (from its ``model.json``), for p-values.
    """

    name = "openvino"

    def __init__(self, path: str | Path, precision: str = "f32", hint: str = "throughput") -> None:
        check_precision(precision)
        ov = import_optional("openvino")
        if hint not in ("throughput", "latency"):
            raise FastFlowError(f"unknown OpenVINO hint '{hint}'; use 'throughput' or 'latency'")
        core = ov.Core()
        model = core.read_model(str(path))
        metadata = read_metadata(path)
        self.calibration = Calibration.from_metadata(metadata)
        self.preprocess = self.normalise = None
        if precision == "bf16":
            preprocess, model = split_preprocessing(model, path)
            self.preprocess = core.compile_model(
                preprocess, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
            )
            self.normalise = _Normalise.from_metadata(metadata, self.preprocess)
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": hint.upper()}
        self.compiled = core.compile_model(model, "CPU", config)
        self.precision, self.hint = precision, hint
        self.streams = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self.queue = ov.AsyncInferQueue(self.compiled, self.streams)
        self.queue.set_callback(self._collect)
        self.request = self.compiled.create_infer_request()  # for single-part calls, without the queue
        self._results: dict[int, tuple[np.ndarray, ...]] = {}

    def _inputs(self, pixels: np.ndarray) -> np.ndarray:
        """What the compiled model takes: the pixels, or (bf16) their f32 pre-processing."""
        if self.preprocess is None:
            return pixels
        if self.normalise is not None and self.normalise.takes(pixels):
            return self.normalise(pixels)
        return self.preprocess(pixels)[0]

    @staticmethod
    def _outputs(request: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Copies of a finished request's (anomaly map, score, label): its buffers are reused."""
        amap, score, label = (np.array(request.get_output_tensor(i).data) for i in range(3))
        return amap, score, label

    def _collect(self, request: Any, index: int) -> None:
        self._results[index] = self._outputs(request)

    def __call__(self, images: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pixels = as_uint8(images)
        chunk = -(-pixels.shape[0] // self.streams)  # one part per stream: all cores busy
        if chunk == pixels.shape[0]:  # one part (batch 1, one stream): a plain synchronous call
            self.request.infer({0: self._inputs(pixels)})
            return self._outputs(self.request)
        self._results = {}
        # Each part is pre-processed just before it starts, so the next part's pre-processing
        # overlaps the streams already running instead of keeping every core waiting.
        for index, start in enumerate(range(0, pixels.shape[0], chunk)):
            self.queue.start_async({0: self._inputs(pixels[start : start + chunk])}, index)
        self.queue.wait_all()
        parts = [self._results[i] for i in range(len(self._results))]
        amap, score, label = (np.concatenate([p[k] for p in parts]) for k in range(3))
        return amap, score, label


class _Normalise:
    """The pre-processing of images already at the model's input size, in numpy: the resize is
    then the identity, and skipping its two matrix products saves a noticeable share of a small
    model's time per image (measured: docs/measurements.md#numpy-normalisation), as
    ``resize_antialias`` skips them in eager PyTorch.

    It computes what the cut-off pre-processing model outputs, checked on a probe image when
    the engine loads: ``(pixels / 255 - mean) / std`` in f32, or ``pixels / 255 - mean`` where
    OpenVINO folded the division by ``std`` into the first convolution (ResNets), so the cut
    falls before it.
    """

    def __init__(self, size: tuple[int, int], mean: list[float], std: list[float] | None) -> None:
        self.size = size
        self.divides_by_std = std is not None
        # One multiply (casting to f32) and one in-place subtraction: faster than the four passes
        # of the formula as written, equal to it up to f32 rounding (measured:
        # docs/measurements.md#numpy-normalisation).
        mean64 = np.asarray(mean, dtype=np.float64).reshape(1, -1, 1, 1)
        std64 = (
            np.ones_like(mean64) if std is None else np.asarray(std, dtype=np.float64).reshape(1, -1, 1, 1)
        )
        self.factor = (1.0 / (255.0 * std64)).astype(np.float32)
        self.offset = (mean64 / std64).astype(np.float32)

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any], preprocess: Any) -> _Normalise | None:
        """From an export's ``model.json``: the form that gives what ``preprocess`` (the compiled
        cut-off model) gives on a probe image at the input size, or ``None`` if neither does."""
        size = metadata.get("config", {}).get("input_size")
        if size is None or "mean" not in metadata or "std" not in metadata:
            return None
        size = (int(size[0]), int(size[1]))
        probe = np.random.default_rng(0).integers(0, 256, (1, 3, *size), dtype=np.uint8)
        expected = preprocess(probe)[0]
        for std in (metadata["std"], None):
            normalise = cls(size, metadata["mean"], std)
            if expected.shape == probe.shape and np.abs(normalise(probe) - expected).max() <= 1e-5:
                return normalise
        return None

    def takes(self, pixels: np.ndarray) -> bool:
        return tuple(pixels.shape[-2:]) == self.size

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        normalised = np.multiply(pixels, self.factor, dtype=np.float32)
        normalised -= self.offset
        return normalised


def split_preprocessing(model: Any, path: str | Path = "model") -> tuple[Any, Any]:
    """An exported IR cut where the normalised image leaves the pre-processing:
    (pixels -> normalised image, normalised image -> outputs), two ``openvino.Model``.

    Why: OpenVINO's bf16 hint rounds every layer, and its CPU plugin ignores the marks that ask
    for one node to stay f32 (``disable_fp16_compression``; tested with OpenVINO 2026.4: marking
    every node changed no score). Rounding the resize's matrix products and the normalisation
    to bf16 is what cost a trained model its AUROC, while the backbone, flows and scorer in bf16
    keep it (measured: docs/measurements.md#bf16-pre-processing). So bf16 engines run the first
    model in f32 and the second in bf16.
    """
    # The pre-processing: the nodes ONNX named by its module, and the nodes OpenVINO added
    # (unscoped names) that are computed from those alone.
    inside: set[str] = set()
    for node in model.get_ordered_ops():
        name = node.get_friendly_name()
        sources = [i.get_source_output().get_node() for i in node.inputs()]
        computed = [n for n in sources if n.get_type_name() != "Constant"]
        if (
            name.startswith(_PREPROCESS_SCOPE)
            or node.get_type_name() == "Parameter"
            or (
                not name.startswith("/")
                and computed
                and all(n.get_friendly_name() in inside for n in computed)
            )
        ):
            inside.add(name)
    # Constants are no boundary: OpenVINO merges equal constants, so one of the pre-processing's
    # may feed later nodes too (a tiled model's tile indices), and both models can hold it.
    boundary = [
        output
        for node in model.get_ordered_ops()
        if node.get_friendly_name() in inside and node.get_type_name() != "Constant"
        for output in node.outputs()
        if any(
            t.get_node().get_friendly_name() not in inside and t.get_node().get_type_name() != "ShapeOf"
            for t in output.get_target_inputs()
        )
    ]
    if len(boundary) != 1:
        raise FastFlowError(
            f"{path} has no single pre-processing output to run in f32 "
            f"(found {len(boundary)}); export it again with this fastflow version"
        )
    import openvino as ov

    normalised = boundary[0]
    consumers = list(normalised.get_target_inputs())
    preprocess = ov.Model([normalised], model.get_parameters(), "preprocess")
    image = ov.opset13.parameter(
        normalised.get_partial_shape(), normalised.get_element_type(), name="normalised"
    )
    for consumer in consumers:
        consumer.replace_source_output(image.output(0))
    return preprocess, ov.Model(model.get_results(), [image], "scores")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise FastFlowError(f"unknown precision '{precision}'; use one of {', '.join(PRECISIONS)}")


def default_precision(engine: str) -> str:
    """The precision ``engine`` runs at unless asked otherwise: the fastest that keeps the scores.

    OpenVINO in bf16 (pre-processing in f32) kept image and pixel AUROC within the bound of f32
    that ``benchmarks/inference.py --auroc`` checks on bottle and textures, and the robustness
    benchmark's bounds, and was the fastest engine measured (docs/measurements.md#openvino-bf16-default),
    so it is OpenVINO's default where the CPU computes bf16 natively. PyTorch and ONNX Runtime
    default to f32: PyTorch's bf16 flows barely pay on a CPU, and ONNX Runtime has no bf16 CPU
    kernels for these layers.
    """
    check_engine(engine)
    return "bf16" if engine == "openvino" and cpu_has_native_bf16() else "f32"


def choose_engine(count: int, export_from: int) -> tuple[str, str]:
    """(engine, precision) for scoring ``count`` images: the fastest installed that keeps the scores.

    Below ``export_from`` images, PyTorch f32: the exported engines need an export first (a few
    seconds), which only many images repay. From there on, OpenVINO bf16 where the CPU computes
    bf16 natively and OpenVINO is installed, else ONNX Runtime f32 (the fastest exact engine)
    where it is installed, else PyTorch.
    """
    if count < export_from:
        return "torch", "f32"
    if cpu_has_native_bf16() and _installed("openvino"):
        return "openvino", "bf16"
    if _installed("onnx"):
        return "onnx", "f32"
    return "torch", "f32"


def _installed(engine: str) -> bool:
    modules = {"onnx": ("onnxruntime", "onnx"), "openvino": ("openvino", "onnx")}[engine]
    try:
        for module in modules:
            __import__(module)
    except ImportError:
        return False
    return True


def check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise FastFlowError(f"unknown engine '{engine}'; use one of {', '.join(ENGINES)}")


def _model_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in ("model.xml", "model.onnx") if (path / name).is_file()]
        if not found:
            raise FastFlowError(
                f"{path} holds no model.onnx or model.xml; pass a folder written by 'fastflow export'"
            )
        return found[0]
    if not path.is_file():
        raise FastFlowError(
            f"exported model {path} does not exist; pass a folder written by 'fastflow export'"
        )
    if path.suffix not in (".onnx", ".xml"):
        raise FastFlowError(f"{path} is neither an .onnx nor an OpenVINO .xml file")
    return path


def metadata_path(path: str | Path) -> Path:
    """Where the ``model.json`` of an exported model (folder or model file) lies."""
    return _model_file(path).with_suffix(".json")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``model.json`` written beside an exported model (empty if there is none)."""
    meta = metadata_path(path)
    return json.loads(meta.read_text()) if meta.is_file() else {}


def load_exported(path: str | Path, precision: str | None = None, hint: str = "throughput") -> ExportedEngine:
    """An engine for an exported model: a folder from ``to_onnx`` / ``to_openvino`` or the model file.

    Its ``calibration`` (from ``model.json``) gives the detector's p-values:
    ``engine.calibration.p_values(score)``. ``precision`` (OpenVINO only) defaults to the one
    recorded at export, except that a bf16 export runs in f32 on a CPU without native bf16
    (emulated bf16 is slower than f32).
    """
    file = _model_file(path)
    if file.suffix == ".onnx":
        if precision not in (None, "f32"):
            raise FastFlowError(
                "ONNX Runtime runs exported models in f32 only; use the openvino engine for bf16"
            )
        return OnnxRuntimeEngine(file)
    return OpenVinoEngine(file, precision or exported_precision(file), hint)


def exported_precision(path: str | Path) -> str:
    """The precision an exported model runs at by default here: the one recorded at export,
    except f32 for a bf16 export on a CPU without bf16 units."""
    file = _model_file(path)
    recorded = "f32" if file.suffix == ".onnx" else read_metadata(file).get("precision", "f32")
    return recorded if recorded == "f32" or cpu_has_native_bf16() else "f32"
