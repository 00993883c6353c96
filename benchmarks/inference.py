"""CPU inference speed: fastflow's engines against anomalib's FastFlow, side by side in one run.

    python benchmarks/inference.py                      # resnet18, wide_resnet50_2, tf_efficientnet_lite0 at 256
    python benchmarks/inference.py --backbone resnet18 --rounds 5
    python benchmarks/inference.py --auroc RUN DATA             # bf16 check: AUROC per engine and precision

For each backbone one FastFlow model is built (ResNets: random backbone weights, as no
pretrained ResNet is reachable offline; Lite0: the shared ImageNet weights), its norms and
flows perturbed to look trained, and the *same* weights are copied into anomalib's
``FastflowModel`` (anomalib builds only ResNets and ViTs, so for Lite0 its model class gets
the Lite0 feature extractor and flows of the same shapes). Every configuration is measured in
this process, interleaved over ``--rounds`` rounds; a round's throughput is images / wall time
over whole batches, its latency the median of batch-1 calls; the table shows the best round
(another process on the machine only ever slows a round down).

fastflow's engines take uint8 pixels and include pre-processing (antialiased resize, here the
identity matmuls of a 256x256 input, and normalisation) and post-processing (map, score,
label); anomalib's models take already normalised float tensors. OpenVINO runs with the
THROUGHPUT hint for batches (the batch is split across its streams) and the LATENCY hint for
batch 1. Outputs are checked against fastflow's PyTorch fp32 graph before timing. fastflow's
rows run its default architecture (the improved recipe's positional condition, which widens
every coupling subnet); two more rows run its OpenVINO engines (f32, bf16) on the paper's
architecture, the one anomalib's twin holds, to compare the graphs at equal work.

``--table-json PATH`` also writes a results-table JSON (``docs/render.py``): for the timing, one
table with a row per configuration and a column per backbone (``img/s / batch-1 ms``); with
``--auroc``, the AUROC table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Before torch loads OpenMP: worker threads sleep at barriers instead of spinning. With another
# process on the machine, spinning (the default) made PyTorch's batch-1 latency 25x slower here
# (3.4 s instead of 0.13 s). It applies to fastflow's and anomalib's PyTorch runs alike.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fastflow import FastFlow
from fastflow.apps.result_tables import add_table_json_option, markdown_table, table_record, write_table
from fastflow.core.hardware import physical_cores
from fastflow.estimator.anomalib_import import _anomalib_key
from fastflow.estimator.engines import OnnxRuntimeEngine, OpenVinoEngine, TorchEngine
from fastflow.estimator.export import to_onnx
from fastflow.model.config import RECIPES, get_config
from fastflow.model.fastflow import FastFlowModel
from fastflow.model.inference import InferenceGraph
from fastflow.model.scoring import gaussian_blur

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support import perturb_trainable

PAPER_ROWS = {
    precision: f"paper architecture (anomalib's): fastflow openvino {precision}"
    for precision in ("f32", "bf16")
}
LITE0_WEIGHTS = (
    Path(__file__).resolve().parents[2] / "shared" / "weights" / "tf_efficientnet_lite0.safetensors"
)
Runner = Callable[[np.ndarray], object]
# A precision is offered where image and pixel AUROC stay this close to f32 (the reduced-precision issue).
AUROC_TOLERANCE = 0.005


def perturbed_model(backbone: str, size: int, **options: object) -> FastFlowModel:
    """A FastFlow model whose norms and flows look trained (``support.perturb_trainable``);
    ``options`` are ``FastFlowConfig`` fields (``benchmarks/context_cost.py``)."""
    weights = str(LITE0_WEIGHTS) if backbone == "tf_efficientnet_lite0" else "random"
    model = FastFlowModel(get_config(backbone, input_size=(size, size), **options), weights).eval()
    perturb_trainable(model, torch.Generator().manual_seed(1))
    return model


def anomalib_twin(model: FastFlowModel) -> nn.Module:
    """anomalib's ``FastflowModel`` holding ``model``'s weights (permutations as 0/1 matrices)."""
    import timm
    from anomalib.models.image.fastflow.torch_model import FastflowModel, create_fast_flow_block

    config = model.config
    if config.positional_channels or config.context_pool > 1 or config.fuse_scales:
        raise ValueError(
            "anomalib's FastflowModel has no context options (positional condition, pooling, "
            "fused scales): its twin needs a model without them"
        )
    supported = config.backbone in ("resnet18", "wide_resnet50_2")
    twin = FastflowModel(
        config.input_size,
        config.backbone if supported else "resnet18",
        pre_trained=False,
        flow_steps=config.flow_steps,
        conv3x3_only=config.conv3x3_only,
        hidden_ratio=config.hidden_ratio,
    )
    if not supported:  # same class and forward; our CNN plugged in, flows of its shapes
        twin.feature_extractor = timm.create_model(
            config.backbone, pretrained=False, features_only=True, out_indices=config.layers
        ).requires_grad_(False)
        twin.norms = nn.ModuleList(nn.LayerNorm(list(shape)) for shape in model.feature_shapes)
        twin.fast_flow_blocks = nn.ModuleList(
            create_fast_flow_block(list(shape), config.conv3x3_only, config.hidden_ratio, config.flow_steps)
            for shape in model.feature_shapes
        )
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("permutation"):  # indices idx -> matrix w[i, idx[i]] = 1, as FrEIA stores it
            value = F.one_hot(value, len(value)).float()[:, :, None, None]
        state[_anomalib_key(key)] = value
    twin.load_state_dict(state, strict=True)
    return twin.eval()


class _MapAndScore(nn.Module):
    """anomalib's eval output (an InferenceBatch) as a plain tuple, for tracing."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(images)
        return out.anomaly_map, out.pred_score


def openvino_runners(compile_model: Callable[[str], object], precision: str) -> tuple[Runner, Runner]:
    """(batch runner with the THROUGHPUT hint, batch-1 runner with the LATENCY hint)."""
    import openvino as ov

    throughput = compile_model({"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "THROUGHPUT"})
    streams = int(throughput.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    queue = ov.AsyncInferQueue(throughput, streams)

    def run_batch(images: np.ndarray) -> None:
        chunk = -(-images.shape[0] // streams)
        for start in range(0, images.shape[0], chunk):
            queue.start_async({0: images[start : start + chunk]})
        queue.wait_all()

    latency = compile_model({"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"})
    request = latency.create_infer_request()
    return run_batch, lambda image: request.infer({0: image})


def torch_runner(module: Callable) -> Runner:
    def run(images: np.ndarray) -> object:
        with torch.inference_mode():
            return module(torch.from_numpy(images))

    return run


def smooth_pixels(batch: int, size: int) -> torch.Tensor:
    """(batch, 3, size, size) uint8 test images: smooth colour fields, the same every run."""
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(batch, 3, 8, 8, generator=generator) * 255
    return F.interpolate(coarse, size=(size, size), mode="bicubic").clamp(0, 255).round().to(torch.uint8)


def build_configs(backbone: str, size: int, batch: int, workdir: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    """name -> (batch runner, batch-1 runner, input kind); plus the uint8 and normalised inputs."""
    # fastflow is timed with its default architecture (the improved recipe's context options);
    # anomalib's twin holds the weights of the paper's architecture, which is all it can hold.
    plain = perturbed_model(backbone, size)
    model = perturbed_model(backbone, size, **RECIPES["improved"].architecture)
    detector = FastFlow.from_model(model, threshold=-0.5, map_floor=-0.6)
    pixels = smooth_pixels(batch, size)
    graph = detector.inference_graph()
    normalised = model.preprocess(pixels).numpy()
    pixels = pixels.numpy()
    configs: dict[str, tuple[Runner, Runner, str]] = {}

    unfolded = InferenceGraph(model, detector.recipe_, -0.5)
    configs["fastflow torch fp32 (unfolded)"] = (torch_runner(unfolded), torch_runner(unfolded), "pixels")
    configs["fastflow torch fp32 (folded)"] = (torch_runner(graph), torch_runner(graph), "pixels")
    mixed = TorchEngine(graph, "bf16")  # bf16 flows, f32 backbone: the bf16 path that keeps the AUROC
    configs["fastflow torch bf16 flows"] = (mixed, mixed, "pixels")
    onnx = OnnxRuntimeEngine(to_onnx(graph, workdir / backbone / "onnx"), physical_cores())
    configs["fastflow onnxruntime fp32"] = (onnx, onnx, "pixels")
    xml = detector.export(workdir / backbone / "openvino", "openvino", "f32")  # the graph a user exports
    import openvino as ov

    core = ov.Core()
    configs["fastflow openvino f32"] = (
        *openvino_runners(lambda config: core.compile_model(str(xml), "CPU", config), "f32"),
        "pixels",
    )
    bf16_xml = detector.export(
        workdir / backbone / "openvino_bf16", "openvino", "bf16"
    )  # the graph a user exports
    bf16_batches, bf16_latency = (
        OpenVinoEngine(bf16_xml, "bf16"),
        OpenVinoEngine(bf16_xml, "bf16", hint="latency"),
    )
    configs["fastflow openvino bf16 (f32 pre-processing)"] = (bf16_batches, bf16_latency, "pixels")
    # The same OpenVINO engines on the paper's architecture, the one anomalib's twin holds: the graphs
    # compared at equal work (the default's positional condition widens every subnet).
    paper = FastFlow.from_model(plain, threshold=-0.5, map_floor=-0.6)
    for precision, row in PAPER_ROWS.items():
        paper_xml = paper.export(workdir / backbone / f"openvino_{precision}_paper", "openvino", precision)
        configs[row] = (
            OpenVinoEngine(paper_xml, precision),
            OpenVinoEngine(paper_xml, precision, hint="latency"),
            "pixels",
        )
    try:
        twin = anomalib_twin(plain)
    except ImportError:
        print("anomalib is not installed: fastflow engines only", file=sys.stderr)
        twin = None
    if twin is not None:
        wrapped = _MapAndScore(twin).eval()
        configs["anomalib torch fp32"] = (torch_runner(wrapped), torch_runner(wrapped), "normalised")
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            converted = ov.convert_model(
                wrapped,
                example_input=torch.from_numpy(normalised[:2]),
                input=[([-1, 3, size, size], ov.Type.f32)],
            )
        for precision in ("f32", "bf16"):
            configs[f"anomalib openvino {precision}"] = (
                *openvino_runners(lambda config: core.compile_model(converted, "CPU", config), precision),
                "normalised",
            )
        # Same weights, same function: anomalib's map (blurred as our recipe blurs it) equals ours
        # before anything is timed. anomalib itself is timed without the blur.
        with torch.no_grad():
            ours = FastFlow.from_model(plain, threshold=-0.5, map_floor=-0.6).inference_graph()(
                torch.from_numpy(pixels[:2])
            )[0]
            theirs = gaussian_blur(
                wrapped(torch.from_numpy(normalised[:2]))[0][:, 0], detector.recipe_.map_sigma
            )
        assert torch.allclose(ours, theirs, atol=1e-4), float((ours - theirs).abs().max())
    check = OpenVinoEngine(xml, "f32")(pixels[:2])[0]
    assert np.abs(check - graph(torch.from_numpy(pixels[:2]))[0].detach().numpy()).max() < 1e-4
    return configs, pixels, normalised


def measure(run: Runner, images: np.ndarray, seconds: float) -> float:
    """Images per second over whole batches, after one warm-up batch."""
    run(images)
    count, start = 0, time.perf_counter()
    while True:
        run(images)
        count += images.shape[0]
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and count >= 2 * images.shape[0]:
            return count / elapsed


def measure_latency(run: Runner, image: np.ndarray, seconds: float) -> float:
    """Median milliseconds of single-image calls, after three warm-up calls."""
    for _ in range(3):
        run(image)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        start = time.perf_counter()
        run(image)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def best_of_rounds(configs: dict, inputs: dict[str, np.ndarray], rounds: int, seconds: float) -> dict:
    """name -> (best img/s, best batch-1 ms) of ``configs`` (name -> (batch runner, batch-1 runner,
    input kind)), each timed once per round, interleaved; ``inputs`` maps an input kind to its batch."""
    results: dict = {name: [] for name in configs}
    for _ in range(rounds):
        for name, (run_batch, run_one, kind) in configs.items():
            images = inputs[kind]
            results[name].append(
                (measure(run_batch, images, seconds), measure_latency(run_one, images[:1], seconds / 2))
            )
    return {name: (max(r[0] for r in rows), min(r[1] for r in rows)) for name, rows in results.items()}


def benchmark(
    backbone: str, size: int, batch: int, rounds: int, seconds: float, workdir: Path
) -> dict[str, tuple]:
    configs, pixels, normalised = build_configs(backbone, size, batch, workdir)
    return best_of_rounds(configs, {"pixels": pixels, "normalised": normalised}, rounds, seconds)


def anomalib_aurocs(
    detector: FastFlow, batches: list[tuple[np.ndarray, dict]], labels: np.ndarray
) -> list[tuple]:
    """The same AUROC rows for anomalib's FastflowModel holding the model's weights, in OpenVINO
    f32 and bf16 (fed fastflow's pre-processed images)."""
    import openvino as ov

    try:
        twin = _MapAndScore(anomalib_twin(detector.model_)).eval()
    except (ImportError, ValueError) as error:
        print(f"no anomalib rows: {error}", file=sys.stderr)
        return []
    with torch.no_grad():
        batches = [(detector.model_.preprocess(batch["image"]).numpy(), batch) for _, batch in batches]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            size = list(detector.config.input_size)
            converted = ov.convert_model(
                twin, example_input=torch.from_numpy(batches[0][0][:2]), input=[([-1, 3, *size], ov.Type.f32)]
            )
    rows = []
    for precision in ("f32", "bf16"):
        compiled = ov.Core().compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": precision})

        def run(images: np.ndarray, compiled=compiled) -> tuple[np.ndarray, np.ndarray]:
            out = compiled(images)
            return out[0][:, 0], out[1].reshape(-1)

        rows.append(_auroc_row(f"anomalib FastflowModel, openvino {precision}", run, batches, labels))
    return rows


def _auroc_row(name: str, run: Callable, batches: list[tuple[np.ndarray, dict]], labels: np.ndarray) -> tuple:
    """(name, image AUROC, pixel AUROC, scores, seconds) of ``run`` (inputs -> maps, scores) over ``batches``."""
    from fastflow.estimator.metrics import image_auroc, pixel_auroc

    scores, maps, masks = [], [], []
    start = time.perf_counter()
    for inputs, batch in batches:
        amap, score = run(inputs)
        scores.append(score)
        for i in range(len(score)):
            if batch["label"][i] == 0 or bool(batch["has_mask"][i]):
                maps.append(amap[i])
                masks.append(batch["mask"][i].numpy())
    all_scores = np.concatenate(scores)
    return (
        name,
        image_auroc(labels, all_scores),
        pixel_auroc(np.stack(masks), np.stack(maps)),
        all_scores,
        time.perf_counter() - start,
    )


def int8_aurocs(
    detector: FastFlow, batches: list[tuple[np.ndarray, dict]], labels: np.ndarray, train_images: list[Path]
) -> list[tuple]:
    """AUROC rows for OpenVINO with the backbone quantized to int8 by NNCF post-training
    quantization (calibrated on every second training image, normal only), the rest in bf16,
    the pre-processing cut off in f32 as in the bf16 engine. Needs ``pip install nncf``."""
    try:
        import nncf
    except ImportError:
        print("no int8 rows: pip install nncf", file=sys.stderr)
        return []
    import openvino as ov

    from fastflow.estimator.engines import split_preprocessing

    core = ov.Core()
    with tempfile.TemporaryDirectory() as tmp:
        path = detector.export(tmp, "openvino", "f32")
        preprocess, rest = split_preprocessing(core.read_model(str(path)), path)
    normalise = core.compile_model(preprocess, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    calibration = [
        image[None]
        for _, batch in detector.image_batches(train_images[::2])
        for image in normalise(batch["image"].numpy())[0]
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # MIXED: asymmetric activations (the default preset's symmetric ones did not compile here).
        quantized = nncf.quantize(
            rest,
            nncf.Dataset(calibration),
            subset_size=len(calibration),
            preset=nncf.QuantizationPreset.MIXED,
            ignored_scope=nncf.IgnoredScope(patterns=[".*/flows\\..*"], validate=False),
        )
    compiled = core.compile_model(quantized, "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})

    def run(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = compiled(normalise(pixels)[0])
        return out[0], out[1]

    return [_auroc_row("openvino int8 backbone (NNCF), rest bf16", run, batches, labels)]


def speed_table(tables: dict[str, dict[str, tuple[float, float]]]) -> tuple[list[str], list[list[str]]]:
    """Per-backbone timings (backbone -> configuration -> (img/s, batch-1 ms)) as one table's
    columns and rows: a row per configuration, a cell ``img/s / ms`` per backbone (``-`` where a
    backbone lacks that configuration)."""
    names = list(dict.fromkeys(name for table in tables.values() for name in table))
    rows = [
        [
            name,
            *(
                f"{table[name][0]:.1f} / {table[name][1]:.1f}" if name in table else "-"
                for table in tables.values()
            ),
        ]
        for name in names
    ]
    return ["configuration", *tables], rows


AUROC_COLUMNS = [
    "engine",
    "image AUROC",
    "pixel AUROC",
    "max score difference vs torch f32",
    "seconds (incl. export)",
]


def auroc_rows(rows: list[tuple]) -> list[list[str]]:
    """``auroc_check``'s rows (name, image AUROC, pixel AUROC, scores, seconds) as the cells of
    ``AUROC_COLUMNS``, each AUROC with its difference from the first row's (torch f32)."""
    reference = rows[0]
    return [
        [
            name,
            f"{image:.4f} ({image - reference[1]:+.4f})",
            f"{pixel:.4f} ({pixel - reference[2]:+.4f})",
            f"{np.abs(scores - reference[3]).max():.2g}",
            f"{elapsed:.0f}",
        ]
        for name, image, pixel, scores, elapsed in rows
    ]


def auroc_check(run: Path, data: Path, table_json: Path | None = None) -> None:
    """Image and pixel AUROC of a trained model with each engine and precision, against PyTorch fp32."""
    from fastflow.estimator.data import list_images, load_samples

    detector = FastFlow.load(run)
    samples = load_samples(data, "test")
    labels = np.array([s.label for s in samples])
    batches = [
        (batch["image"].numpy(), batch) for _, batch in detector.image_batches(samples)
    ]  # decoded once
    rows = []
    for engine, precision in [
        ("torch", "f32"),
        ("onnx", "f32"),
        ("openvino", "f32"),
        ("torch", "bf16"),
        ("openvino", "bf16"),
    ]:

        def run_engine(
            pixels: np.ndarray, engine=engine, precision=precision
        ) -> tuple[np.ndarray, np.ndarray]:
            amap, score, _ = detector.engine(engine, precision)(pixels)  # the first call exports (timed)
            return amap, score

        rows.append(_auroc_row(f"{engine} {precision}", run_engine, batches, labels))
    rows += int8_aurocs(detector, batches, labels, list_images(data / "train" / "good"))
    rows += anomalib_aurocs(detector, batches, labels)
    reference = rows[0]
    title = f"AUROC on {data} ({len(samples)} test images), model {run}"
    align = ["", "right", "right", "right", "right"]
    print(f"\n### {title}\n")
    print(markdown_table(AUROC_COLUMNS, auroc_rows(rows), align))
    if table_json:
        notes = f"Each AUROC with its difference from torch f32; torch {torch.__version__}."
        write_table(
            table_json, table_record(title, AUROC_COLUMNS, auroc_rows(rows), align=align, notes=notes)
        )
    for name, image, pixel, _, _ in rows[1:]:
        verdict = (
            "within"
            if max(abs(image - reference[1]), abs(pixel - reference[2])) <= AUROC_TOLERANCE
            else "NOT within"
        )
        print(f"{name}: image and pixel AUROC {verdict} {AUROC_TOLERANCE} of torch f32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backbone",
        action="append",
        help="repeatable; default: resnet18, wide_resnet50_2, tf_efficientnet_lite0",
    )
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="minimum timing per configuration and round"
    )
    parser.add_argument(
        "--auroc",
        nargs=2,
        metavar=("RUN", "DATA"),
        type=Path,
        help="instead of timing: AUROC of a trained model per engine and precision",
    )
    add_table_json_option(parser, "the table (timing: a column per backbone, cells img/s / batch-1 ms)")
    args = parser.parse_args()
    torch.set_num_threads(physical_cores())
    if args.auroc:
        auroc_check(*args.auroc, args.table_json)
        return
    backbones = args.backbone or ["resnet18", "wide_resnet50_2", "tf_efficientnet_lite0"]
    load_at_start = os.getloadavg()[0]
    print(
        f"{physical_cores()} physical cores, torch {torch.__version__}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
        f"load average {load_at_start:.2f}; "
        f"input {args.size}x{args.size}, batch {args.batch}, best of {args.rounds} rounds"
    )
    timings: dict[str, dict[str, tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in backbones:
            table = benchmark(backbone, args.size, args.batch, args.rounds, args.seconds, Path(tmp))
            timings[backbone] = table
            print(f"\n### {backbone} @ {args.size}\n")
            columns = ["configuration", f"images/s (batch {args.batch})", "batch-1 latency (ms)"]
            cells = [
                [name, f"{throughput:.1f}", f"{latency:.1f}"] for name, (throughput, latency) in table.items()
            ]
            print(markdown_table(columns, cells, ["", "right", "right"]))
            ours = {k: v for k, v in table.items() if k.startswith("fastflow")}  # the default architecture
            fastest = max(ours, key=lambda k: ours[k][0])
            quickest = min(ours, key=lambda k: ours[k][1])
            print(
                f"\nfastest fastflow path (each passes the AUROC check, --auroc): {fastest} (throughput), "
                f"{quickest} (latency)"
            )
            goals = {
                "anomalib openvino f32": "  (goals: >= 1.5x, <= 0.7x)",
                "anomalib openvino bf16": "  (goal: >= 1.0x)",
            }
            for name in ("anomalib openvino f32", "anomalib openvino bf16", "anomalib torch fp32"):
                if name in table:
                    print(
                        f"vs {name}: throughput {ours[fastest][0] / table[name][0]:.2f}x, "
                        f"batch-1 latency {ours[quickest][1] / table[name][1]:.2f}x{goals.get(name, '')}"
                    )
            for precision, row in PAPER_ROWS.items():
                if f"anomalib openvino {precision}" not in table:
                    continue
                paper, theirs = table[row], table[f"anomalib openvino {precision}"]
                print(
                    f"equal architecture, {row} vs anomalib openvino {precision}: throughput "
                    f"{paper[0] / theirs[0]:.2f}x, batch-1 latency {paper[1] / theirs[1]:.2f}x"
                )
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    if args.table_json:
        columns, rows = speed_table(timings)
        title = (
            f"Inference speed at {args.size}x{args.size}: img/s at batch {args.batch} / batch-1 latency in ms"
        )
        notes = (
            f"Best of {args.rounds} rounds; load average {load_at_start:.2f} at the start, "
            f"{os.getloadavg()[0]:.2f} at the end; torch {torch.__version__}, {physical_cores()} physical cores."
        )
        align = ["", *["right"] * len(timings)]
        write_table(args.table_json, table_record(title, columns, rows, align=align, notes=notes))


if __name__ == "__main__":
    main()
