"""Inference graph, folded flows and exports: ONNX Runtime and OpenVINO reproduce PyTorch's scores.

Models use random backbones (ResNet-18, Wide-ResNet-50-2) or the shared Lite0 weights at a
small non-square input, with norms and flows perturbed away from their initialisation so that
a misplaced tensor, a transposed permutation or a wrong fold changes the output.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import perturb_trainable
from torch.nn import functional as F

from fastflow import FastFlow, FastFlowError
from fastflow.apps.cli import main
from fastflow.core.hardware import cpu_has_native_bf16
from fastflow.model.config import get_config, get_recipe
from fastflow.model.fastflow import FastFlowModel
from fastflow.model.flow import FlowStack, FoldedFlow
from fastflow.model.inference import InferenceGraph, float32_threshold
from fastflow.model.scoring import anomaly_map, image_score

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

from fastflow.estimator.engines import (
    choose_engine,
    default_precision,
    exported_precision,
    load_exported,
    read_metadata,
    split_preprocessing,
)
from fastflow.estimator.export import ParityReport, check_parity, to_onnx, to_openvino, verify_export

pytestmark = pytest.mark.usefixtures("one_thread")

INPUT_SIZE = (128, 160)


def _perturb(module: torch.nn.Module, seed: int = 1) -> None:
    perturb_trainable(module, torch.Generator().manual_seed(seed))


def _detector(backbone: str, weights: str | Path = "random", threshold: float = -0.45) -> FastFlow:
    """A 'fitted' detector without training: perturbed model, threshold inside the score range."""
    model = FastFlowModel(get_config(backbone, input_size=INPUT_SIZE), weights).eval()
    _perturb(model)
    return FastFlow.from_model(model, threshold, map_floor=-0.6)


def _pixels(batch: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Photo-like uint8 images: smooth colour blobs plus noise."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 6, 7, generator=generator) * 255
    smooth = F.interpolate(coarse, size=size, mode="bicubic", align_corners=False)
    noisy = smooth + 12 * torch.randn(batch, 3, *size, generator=generator)
    return noisy.clamp(0, 255).round().to(torch.uint8)


@pytest.fixture(scope="module")
def detectors() -> dict[str, FastFlow]:
    return {}


def _get(detectors: dict[str, FastFlow], backbone: str, weights: str | Path = "random") -> FastFlow:
    if backbone not in detectors:
        detectors[backbone] = _detector(backbone, weights)
    return detectors[backbone]


# ------------------------------------------------------------------------------------ folding


@pytest.mark.parametrize(("in_place", "conv_permutation"), [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize(("channels", "kernels"), [(64, (3,)), (7, (3, 1)), (33, (1, 3))])
def test_folded_flow_equals_flow_stack(channels, kernels, in_place, conv_permutation):
    flow = FlowStack(channels, steps=6, kernels=kernels, seed=3)
    _perturb(flow)
    x = torch.randn(2, channels, 9, 11)
    with torch.no_grad():
        reference, _ = flow(x)
        folding = flow.fold(in_place=in_place, conv_permutation=conv_permutation)
        folded, log_det = folding(x)
    assert isinstance(folding, FoldedFlow) and log_det is None and folding.in_place == in_place
    assert folding.conv_permutation == conv_permutation
    assert reference.abs().max() > 1.0  # a real transformation, not ~identity
    torch.testing.assert_close(folded[:, folding.output_permutation], reference, rtol=1e-5, atol=1e-5)


def test_conv_permutation_hands_over_by_convolution_and_exactly():
    """The 0/1 convolutions replace every channel gather and give the gathers' values bit for bit."""
    flow = FlowStack(12, steps=4, seed=5)
    _perturb(flow)
    x = torch.randn(2, 12, 7, 6)
    folded = flow.fold(conv_permutation=True)
    with torch.no_grad():
        gathered, by_conv = flow.fold()(x)[0], folded(x)[0]
        graph = torch.jit.trace(lambda t: folded(t)[0], x, check_trace=False).inlined_graph
    assert "aten::index_select" not in str(graph)
    assert torch.equal(gathered, by_conv)


def test_fold_form_per_engine_and_in_place_takes_the_small_flows(tmp_path):
    """ResNet-18's flows hold 16.8 M multiply-adds per step at 256 px (above ``IN_PLACE_MAX_WORK``),
    5.2 M at 128x160 (below); only OpenVINO graphs permute by convolution, only its bf16 graph
    folds in place; the export records nothing of the form, only its precision."""
    for size, expected in (((256, 256), [False] * 3), (INPUT_SIZE, [True] * 3)):
        model = FastFlowModel(get_config("resnet18", input_size=size), "random").eval()
        assert [flow.in_place for flow in model.fold(in_place=True).flows] == expected
        assert not any(flow.in_place for flow in model.fold().flows)
    detector = _detector("resnet18")
    forms = {
        (engine, precision): [
            (flow.in_place, flow.conv_permutation)
            for flow in detector.inference_graph(engine, precision).model.flows
        ]
        for engine, precision in (
            ("torch", "f32"),
            ("torch", "bf16"),
            ("onnx", "f32"),
            ("openvino", "f32"),
            ("openvino", "bf16"),
        )
    }
    assert forms == {
        ("torch", "f32"): [(False, False)] * 3,
        ("torch", "bf16"): [(False, False)] * 3,
        ("onnx", "f32"): [(False, False)] * 3,
        ("openvino", "f32"): [(False, True)] * 3,
        ("openvino", "bf16"): [(True, False)] * 3,
    }
    assert detector.inference_graph("openvino", "bf16") is detector.inference_graph(
        "openvino", "bf16"
    )  # cached
    assert detector.inference_graph("onnx") is detector.inference_graph()  # the same form
    with pytest.raises(FastFlowError, match="precision"):
        detector.inference_graph("openvino", "int8")
    torch_engine = detector.engine("torch")
    detector.threshold_ = -0.3  # every cached graph and engine was built for the old threshold
    assert detector.inference_graph("openvino", "bf16").threshold_value == -0.3
    assert detector.inference_graph().threshold_value == -0.3 and detector.engine("torch") is not torch_engine
    detector.threshold_ = -0.45
    pixels = _pixels(2, (150, 170), 4)
    with torch.no_grad():
        split = detector.inference_graph()(pixels)
        for engine, precision in (("openvino", "f32"), ("openvino", "bf16")):
            other = detector.inference_graph(engine, precision)(pixels)
            torch.testing.assert_close(other[0], split[0], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(other[1], split[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("recipe", ["reference", "improved"])
def test_graph_folded_equals_unfolded_and_the_reference_scorer(recipe):
    model = FastFlowModel(get_config("resnet18", input_size=INPUT_SIZE), "random").eval()
    _perturb(model)
    scoring = get_recipe(recipe)
    pixels = _pixels(2, (150, 170))
    folded, unfolded = InferenceGraph(model.fold(), scoring, -0.45), InferenceGraph(model, scoring, -0.45)
    with torch.no_grad():
        zs, _ = model(pixels)
        reference = anomaly_map(zs, INPUT_SIZE, scoring.map_sigma)
        outputs = [graph(pixels) for graph in (folded, unfolded)]
    assert reference.std() > 1e-3  # the maps have structure
    expected_score = image_score(reference, scoring.score_top)
    # The improved recipe's scorer differs from the reference's (blurred map, top-share mean).
    assert (expected_score != image_score(anomaly_map(zs, INPUT_SIZE))).all() == (recipe == "improved")
    for amap, score, label in outputs:
        torch.testing.assert_close(amap, reference, rtol=0, atol=1e-5)
        torch.testing.assert_close(score, expected_score, rtol=0, atol=1e-5)
        assert torch.equal(label, (score > -0.45).long())


def test_float32_threshold_keeps_the_float64_comparison():
    threshold = 0.1  # not a float32 value
    t32 = np.float32(float32_threshold(threshold))
    assert float(t32) <= threshold < float(np.nextafter(t32, np.float32(np.inf)))
    for score in (np.float32(threshold), np.nextafter(np.float32(threshold), np.float32(-1)), t32):
        assert (score > t32) == (float(score) > threshold)


def test_detector_scores_come_from_the_inference_graph(detectors, tmp_path):
    detector = _get(detectors, "resnet18")
    images = []
    for i, batch in enumerate((_pixels(2, (150, 170), 1), _pixels(1, (96, 100), 2))):
        for j, pixels in enumerate(batch):
            path = tmp_path / f"{i}_{j}.png"
            Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(path)
            images.append(path)
    prediction = detector.detect(images)
    with torch.no_grad():
        graph = detector.inference_graph()
        expected = [graph(_pixels(2, (150, 170), 1)), graph(_pixels(1, (96, 100), 2))]
    np.testing.assert_allclose(prediction.scores, np.concatenate([e[1].numpy() for e in expected]), atol=1e-6)
    np.testing.assert_array_equal(
        prediction.labels, (prediction.scores > detector.threshold_).astype(np.int64)
    )


# ------------------------------------------------------------------------------------ exports

BACKBONES = ["resnet18", "wide_resnet50_2", "tf_efficientnet_lite0"]


@pytest.mark.parametrize("backbone", BACKBONES)
def test_onnx_and_openvino_reproduce_pytorch(backbone, detectors, lite0_weights, tmp_path):
    weights = lite0_weights if backbone == "tf_efficientnet_lite0" else "random"
    detector = _get(detectors, backbone, weights)
    graph = detector.inference_graph()
    onnx_path = to_onnx(graph, tmp_path / "onnx")
    openvino_path = to_openvino(graph, tmp_path / "openvino")
    # Dynamic batch (1 and 3) and dynamic size (the model's own, and a larger photo).
    batches = [_pixels(1, INPUT_SIZE, 3), _pixels(3, (300, 257), 4)]
    for path in (onnx_path, openvino_path):
        engine = load_exported(path)
        for pixels in batches:
            with torch.no_grad():
                amap, score, label = graph(pixels)
            out_map, out_score, out_label = engine(pixels)
            assert out_map.shape == (pixels.shape[0], *INPUT_SIZE) and out_score.shape == (pixels.shape[0],)
            assert np.abs(out_map - amap.numpy()).max() <= 1e-4, path
            assert np.abs(out_score - score.numpy()).max() <= 1e-4, path
            np.testing.assert_array_equal(out_label, label.numpy())
        assert max(check_parity(graph, path, batches[1:])) <= 1e-4
    assert amap.std() > 1e-3  # the maps have structure


def test_context_options_export_with_parity(tmp_path):
    """Neighbourhood average, fused scales and the folded positional condition trace like the rest."""
    config = get_config(
        "resnet18", input_size=INPUT_SIZE, context_pool=3, fuse_scales=True, positional_channels=8
    )
    model = FastFlowModel(config, "random").eval()
    _perturb(model)
    detector = FastFlow.from_model(model, -0.45, map_floor=-0.6)
    reloaded = FastFlow.load(detector.save(tmp_path / "run" / "model.safetensors"))
    assert reloaded.config == config
    graph = reloaded.inference_graph()
    pixels = _pixels(2, (150, 170), 8)
    with torch.no_grad():
        amap, score, _ = graph(pixels)
        np.testing.assert_allclose(detector.inference_graph()(pixels)[1].numpy(), score.numpy(), atol=1e-6)
    assert amap.std() > 1e-3
    for path in (to_onnx(graph, tmp_path / "onnx"), to_openvino(graph, tmp_path / "openvino")):
        assert max(check_parity(graph, path, [pixels])) <= 1e-4


def test_tiled_model_exports_with_parity(tmp_path):
    """Cutting tiles and stitching their features are fixed slices, constant weights and sums:
    ONNX Runtime and OpenVINO reproduce the PyTorch graph's maps and scores at any input size, and
    a bf16 engine's cut still finds the one pre-processing output (the tiles are cut after it)."""
    config = get_config(
        "resnet18", input_size=INPUT_SIZE, flow_steps=2, tile=64, tile_overlap=32, positional_channels=8
    )
    model = FastFlowModel(config, "random").eval()
    _perturb(model)
    detector = FastFlow.from_model(model, -0.45, map_floor=-0.6)
    graph = detector.inference_graph()
    batches = [_pixels(1, INPUT_SIZE, 3), _pixels(3, (300, 257), 4)]
    with torch.no_grad():
        assert graph(batches[1])[0].std() > 1e-3  # the maps have structure
    onnx_path = to_onnx(graph, tmp_path / "onnx")
    openvino_path = to_openvino(graph, tmp_path / "openvino")
    for path in (onnx_path, openvino_path):
        assert max(check_parity(graph, path, batches)) <= 1e-4
    assert read_metadata(onnx_path)["config"]["tile"] == 64
    # The two halves of the bf16 engines' cut, both in f32, are the exported graph.
    import openvino as ov

    preprocess, rest = split_preprocessing(ov.Core().read_model(str(openvino_path)))
    f32 = {"INFERENCE_PRECISION_HINT": "f32"}
    pixels = batches[1]
    halves = ov.compile_model(rest, "CPU", f32)(ov.compile_model(preprocess, "CPU", f32)(pixels.numpy())[0])
    with torch.no_grad():
        reference_map, reference_score, _ = graph(pixels)
    np.testing.assert_allclose(halves[0], reference_map.numpy(), atol=1e-4)
    np.testing.assert_allclose(halves[1], reference_score.numpy(), atol=1e-4)


def test_metadata_threshold_and_parity_failure(detectors, tmp_path):
    detector = _get(detectors, "resnet18")
    path = detector.export(tmp_path)
    meta = read_metadata(path)
    assert meta["threshold"] == detector.threshold_ and meta["config"] == detector.config.to_dict()
    assert meta["recipe"] == detector.recipe_.to_dict() and meta["map_floor"] == detector.map_floor_
    assert meta["input"]["dtype"] == "uint8" and meta["precision"] == "f32"
    assert json.loads((tmp_path / "model.json").read_text()) == meta
    # The threshold lives in the graph: labels follow it.
    _, score, label = load_exported(path)(_pixels(3, INPUT_SIZE, 5))
    np.testing.assert_array_equal(label, (score > detector.threshold_).astype(np.int64))
    # check_parity notices a model that no longer matches the export.
    detector.threshold_ = float(np.median(score))
    with pytest.raises(FastFlowError, match="other labels"):
        check_parity(detector.inference_graph(), path, [_pixels(3, INPUT_SIZE, 5)])
    detector.threshold_ = -0.45


def test_bf16_engines_run_close_to_f32(detectors, tmp_path):
    detector = _get(detectors, "resnet18")
    pixels = _pixels(2, (200, 180), 6)
    reference_map, reference_score, _ = detector.engine("torch")(pixels)
    # PyTorch: only the flows in bf16.
    amap, score, _ = detector.engine("torch", "bf16")(pixels)
    assert 0 < np.abs(amap - reference_map).max() < 0.05 and np.abs(score - reference_score).max() < 0.05
    # OpenVINO: the pre-processing cut off and run in f32 (bf16 there costs real models their
    # AUROC), the rest in bf16.
    path = detector.export(tmp_path, "openvino", precision="bf16")
    assert read_metadata(path)["precision"] == "bf16"
    # Emulated bf16 is slower than f32: a CPU without bf16 units runs the export in f32 unless asked.
    assert exported_precision(path) == ("bf16" if cpu_has_native_bf16() else "f32")
    engine = load_exported(path, precision="bf16")
    assert engine.preprocess is not None
    amap, score, _ = engine(pixels)
    low = 0 if cpu_has_native_bf16() else -1  # rounded in bf16 only where the CPU computes it
    assert low < np.abs(amap - reference_map).max() < 0.05 and np.abs(score - reference_score).max() < 0.05
    # ResNet-18's graph divides by std after the cut (OpenVINO folds it into the first
    # convolution); the numpy path for model-size images then stops before it too.
    at_size = _pixels(2, INPUT_SIZE, 9).numpy()
    assert engine.normalise is not None and not engine.normalise.divides_by_std
    np.testing.assert_allclose(engine.normalise(at_size), engine.preprocess(at_size)[0], rtol=0, atol=1e-5)
    # The two halves of the cut, both in f32, are the exported graph.
    import openvino as ov

    preprocess, rest = split_preprocessing(ov.Core().read_model(str(path)))
    halves = ov.compile_model(rest, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(
        ov.compile_model(preprocess, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(pixels.numpy())[0]
    )
    np.testing.assert_allclose(halves[0], reference_map, atol=1e-4)
    np.testing.assert_allclose(halves[1], reference_score, atol=1e-4)


def test_bf16_engine_skips_the_identity_resize_where_that_keeps_the_pixels(
    detectors, lite0_weights, tmp_path
):
    """Lite0's graph keeps the whole normalisation before the cut, so model-size images take the
    numpy path: its inputs equal the cut-off model's to 1e-5, and the scores to bf16 rounding
    (a 1e-7 change of an input can flip a bf16 rounding; measured: 5e-4 here)."""
    detector = _get(detectors, "tf_efficientnet_lite0", lite0_weights)
    engine = load_exported(detector.export(tmp_path, "openvino", precision="bf16"), "bf16")
    at_size, larger = _pixels(3, INPUT_SIZE, 10).numpy(), _pixels(1, (150, 170), 11).numpy()
    assert engine.normalise is not None and engine.normalise.divides_by_std
    assert engine.normalise.takes(at_size) and not engine.normalise.takes(larger)
    np.testing.assert_allclose(engine.normalise(at_size), engine.preprocess(at_size)[0], rtol=0, atol=1e-5)
    fast = engine(at_size)[1]
    engine.normalise = None
    assert np.abs(fast - engine(at_size)[1]).max() < 0.01


def test_default_engine_and_precision_follow_the_cpu(detectors, tmp_path, monkeypatch):
    """Many images: OpenVINO bf16 where the CPU has bf16 units, else ONNX Runtime f32; few: PyTorch f32."""
    from fastflow.estimator import engines

    detector = _get(detectors, "resnet18")
    path = detector.export(tmp_path, "openvino")
    assert read_metadata(path)["precision"] == "bf16"  # exports default to the fastest checked precision
    for native, many in ((True, ("openvino", "bf16")), (False, ("onnx", "f32"))):
        monkeypatch.setattr(engines, "cpu_has_native_bf16", lambda native=native: native)
        assert choose_engine(399, export_from=400) == ("torch", "f32")
        assert choose_engine(400, export_from=400) == many
        assert (
            default_precision("openvino") == many[1]
            and default_precision("onnx") == default_precision("torch") == "f32"
        )
        # A bf16 export runs in f32 where bf16 would be emulated; asked for explicitly, in bf16.
        assert load_exported(path).precision == many[1] and load_exported(path, "bf16").precision == "bf16"


def test_verify_export_from_python(detectors, tmp_path):
    """The check ``fastflow export`` runs, called from Python: random images in f32 without
    images, the export's own precision on images; recorded in model.json; a failure names the fix."""
    detector = _get(detectors, "resnet18")
    path = detector.export(tmp_path / "onnx")
    report = verify_export(detector, path)
    assert isinstance(report, ParityReport)
    assert (report.precision, report.against, report.images) == ("f32", "PyTorch f32", "random images")
    assert report.max_score_difference <= report.score_tolerance == 1e-4
    assert report.max_map_difference <= report.map_tolerance == 1e-4
    assert read_metadata(path)["check"] == report.to_dict()
    assert report.summary().startswith("checked in f32 against PyTorch f32 on random images")

    images = []
    for i, pixels in enumerate(_pixels(3, (140, 150), 12)):
        images.append(tmp_path / f"good{i}.png")
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(images[-1])
    bf16 = detector.export(tmp_path / "openvino", "openvino", precision="bf16")
    report = verify_export(detector, bf16, images, record=False)
    assert report.precision == default_precision("openvino") and report.images == "3 images"
    assert report.max_score_difference <= report.score_tolerance
    assert "check" not in read_metadata(bf16)

    moved = []  # images whose labels a moved threshold changes
    for i, pixels in enumerate(_pixels(3, INPUT_SIZE, 5)):
        moved.append(tmp_path / f"moved{i}.png")
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(moved[-1])
    detector.threshold_ = float(np.median(load_exported(path)(_pixels(3, INPUT_SIZE, 5))[1]))
    try:  # the model no longer matches its export
        with pytest.raises(FastFlowError, match="does not keep the model's scores: export it again"):
            verify_export(detector, path, moved)
    finally:
        detector.threshold_ = -0.45


def test_cli_export_and_predict_with_each_engine(detectors, tmp_path, capsys):
    detector = _get(detectors, "resnet18")
    run = detector.save(tmp_path / "run" / "model.safetensors").parent
    pixels = _pixels(2, (140, 150), 7)
    for i, image in enumerate(pixels):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / f"img{i}.png")
    assert main(["export", str(run), "--format", "onnx", "--output", str(tmp_path / "onnx")]) == 0
    assert "largest difference" in capsys.readouterr().out
    assert (tmp_path / "onnx" / "model.onnx").is_file() and (tmp_path / "onnx" / "model.json").is_file()
    scores = {}
    for engine, precision in (("torch", "f32"), ("onnx", "f32"), ("openvino", "f32"), ("openvino", None)):
        out = tmp_path / f"pred_{engine}_{precision}"
        asked = ["--precision", precision] if precision else []
        assert (
            main(
                [
                    "predict",
                    str(run),
                    str(tmp_path / "img*.png"),
                    "--engine",
                    engine,
                    "--output",
                    str(out),
                    *asked,
                ]
            )
            == 0
        )
        rows = json.loads((out / "predictions.json").read_text())["predictions"]
        scores[engine, precision] = np.array([row["score"] for row in rows])
        assert f"({engine}, {precision or default_precision(engine)})" in capsys.readouterr().out
    np.testing.assert_allclose(scores["onnx", "f32"], scores["torch", "f32"], atol=1e-4)
    np.testing.assert_allclose(scores["openvino", "f32"], scores["torch", "f32"], atol=1e-4)
    np.testing.assert_allclose(scores["openvino", None], scores["torch", "f32"], atol=0.05)
    # A bf16 export is checked on good images in bf16, and model.json says so.
    export = tmp_path / "openvino_export"
    assert (
        main(
            [
                "export",
                str(run),
                "--format",
                "openvino",
                "--output",
                str(export),
                "--check-images",
                str(tmp_path / "img*.png"),
            ]
        )
        == 0
    )
    check = read_metadata(export)["check"]
    assert check["precision"] == default_precision("openvino") and check["images"] == "2 images"
    assert check["max_score_difference"] <= check["score_tolerance"]
    assert check["max_map_difference"] <= check["map_tolerance"]
    assert f"checked in {check['precision']}" in capsys.readouterr().out
    assert main(["export", str(run), "--format", "tflite", "--output", str(tmp_path / "x")]) == 2
    assert "unknown export format" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ calibration


def test_exports_carry_the_calibration_and_give_the_detectors_p_values(tmp_path):
    """model.json holds the sorted calibration scores and rate; ``load_exported(...).calibration``
    turns the export's scores into the detector's p-values. Export scores differ from PyTorch's
    by up to the parity tolerance (1e-4), so a score that close to a calibration score may take
    the neighbouring rank: those are left out, and every other p-value and label must be equal."""
    tolerance = 1e-4
    detector = _detector("resnet18")
    paths = []
    for i, pixels in enumerate(_pixels(40, (140, 150), 20)):
        paths.append(tmp_path / f"{i:02d}.png")
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(paths[-1])
    detector.set_params(false_alarm_rate=0.2).calibrate(paths[:24])
    calibration = detector.calibration_
    expected = detector.detect(paths[24:])
    pixels = np.concatenate([batch["image"].numpy() for _, batch in detector.image_batches(paths[24:])])
    for form in ("onnx", "openvino"):
        path = detector.export(tmp_path / form, form, precision="f32")
        meta = read_metadata(path)
        assert meta["calibration"]["scores"] == [float(s) for s in calibration.scores]
        assert meta["false_alarm_rate"] == meta["calibration"]["false_alarm_rate"] == 0.2
        assert meta["threshold"] == detector.threshold_ == calibration.threshold()
        engine = load_exported(path)
        _, scores, labels = engine(pixels)
        p_values = engine.calibration.p_values(scores)
        assert np.abs(scores - expected.scores).max() <= tolerance
        nearest = np.abs(expected.scores[:, None].astype(np.float64) - calibration.scores[None, :]).min(
            axis=1
        )
        decided = nearest >= tolerance
        assert decided.sum() >= 12, nearest  # the comparison is not emptied by the exclusion
        np.testing.assert_array_equal(p_values[decided], expected.p_values[decided])
        np.testing.assert_array_equal(labels[decided], expected.labels[decided])
        np.testing.assert_array_equal(labels, p_values <= calibration.guaranteed_rate())
    assert len(set(expected.p_values)) >= 4  # p-values spread over the calibration's ranks


def test_an_export_without_calibration_gives_no_p_values(detectors, tmp_path):
    """Exports of older versions hold no calibration: their p-values are NaN, not invented."""
    path = _get(detectors, "resnet18").export(tmp_path)
    meta = read_metadata(path)
    del meta["calibration"]
    (tmp_path / "model.json").write_text(json.dumps(meta))
    engine = load_exported(path)
    assert engine.calibration.n == 0
    assert np.isnan(engine.calibration.p_values(engine(_pixels(2, INPUT_SIZE, 3))[1])).all()
