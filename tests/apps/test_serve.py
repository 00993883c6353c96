"""``fastflow serve``: served scores equal ``fastflow predict``'s, bad uploads get a 4xx JSON error and
the next request is served, the API key, the CLI's checks, and the web page in a real headless
Chromium.

The model is a small random-backbone detector with perturbed flows (no training), calibrated
on the test images at a false-alarm rate of 0.5 so that its threshold splits them and both
verdicts occur. Requests go through FastAPI's
in-process client, except the browser test, which runs uvicorn on a loopback port.
"""

from __future__ import annotations

import base64
import io
import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import bad_requests, calibrated_run, loopback_server, serve_images

from fastflow import FastFlow
from fastflow.apps.cli import main
from fastflow.apps.prediction_files import write_predictions
from fastflow.model.config import get_config
from fastflow.model.fastflow import FastFlowModel

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from fastflow.apps.serve import MicroBatcher, ServeConfig, ServedModel, create_app, load_served

pytestmark = pytest.mark.usefixtures("one_thread")

ARTIFACTS = Path(
    os.environ.get("FASTFLOW_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts")
)
KEY = "line-7-secret"


RATE = 0.5


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return serve_images(tmp_path_factory.mktemp("serve") / "data")


@pytest.fixture(scope="module")
def run(images: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved detector calibrated on ``images`` at a false-alarm rate of 0.5: its threshold is
    their 6th smallest score (ceil(11 * 0.5)), so 4 of the 10 score above it."""
    return calibrated_run(images, tmp_path_factory.mktemp("serve") / "run", RATE)


def _post(client: TestClient, data: bytes, content_type: str = "image/png", query: str = "", **headers: str):
    return client.post(f"/predict{query}", content=data, headers={"content-type": content_type, **headers})


def _predicted(run: Path, images: list[Path], engine: str, output: Path) -> dict[str, dict]:
    """``fastflow predict``'s rows, by image path."""
    rows = write_predictions(FastFlow.load(run), images, output, engine)
    return {row["path"]: row for row in rows}


@pytest.mark.parametrize("engine", ["torch", "onnx"])
def test_served_scores_equal_predicts(engine: str, run: Path, images: list[Path], tmp_path: Path) -> None:
    if engine == "onnx":
        pytest.importorskip("onnxruntime")
    expected = _predicted(run, images, engine, tmp_path / "predict")
    app = create_app(load_served(run, engine), ServeConfig(max_batch=8, batch_wait_ms=50))
    with TestClient(app) as client, ThreadPoolExecutor(2 * len(images)) as pool:
        responses = list(
            pool.map(lambda p: _post(client, p.read_bytes(), "application/octet-stream"), images * 2)
        )
    bodies = [r.json() for r in responses]
    assert all(r.status_code == 200 for r in responses), bodies
    worst = max(abs(b["score"] - expected[str(p)]["score"]) for p, b in zip(images * 2, bodies))
    assert worst <= 1e-5
    assert [b["label"] for b in bodies] == [expected[str(p)]["label"] for p in images * 2]
    assert [b["p_value"] for b in bodies] == [expected[str(p)]["p_value"] for p in images * 2]
    assert all(b["false_alarm_rate"] == RATE and b["calibration_images"] == len(images) for b in bodies)
    assert {b["label"] for b in bodies} == {"normal", "anomalous"}
    assert [(b["width"], b["height"]) for b in bodies] == [Image.open(p).size for p in images * 2]
    assert all(b["engine"] == engine and b["model"] == "run" for b in bodies)
    for body in bodies:  # a batch never mixes sizes
        same_size = sum((o["width"], o["height"]) == (body["width"], body["height"]) for o in bodies)
        assert body["batch_size"] <= same_size


def test_queued_images_share_one_engine_call_per_size() -> None:
    """Deterministic micro-batching: images queued before the engine thread starts are taken
    together (up to max_batch) and scored in one call per image size, each getting its own row."""
    calls: list[tuple[int, ...]] = []

    def engine(pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        calls.append(tuple(pixels.shape))
        scores = pixels.float().mean(dim=(1, 2, 3)).numpy()
        return np.zeros((len(pixels), 4, 4)), scores, (scores > 100).astype(np.int64)

    batcher = MicroBatcher(engine, max_batch=8, wait_s=0.0)
    sizes = [(3, 8, 8), (3, 8, 6), (3, 8, 8), (3, 8, 8), (3, 8, 6)]
    futures = [batcher.submit(torch.full(size, 10 * i, dtype=torch.uint8)) for i, size in enumerate(sizes)]
    batcher.start()
    results = [future.result(timeout=10) for future in futures]
    batcher.stop()
    assert sorted(calls) == [(2, 3, 8, 6), (3, 3, 8, 8)]
    assert [r.score for r in results] == [10.0 * i for i in range(5)]
    assert [r.batch_size for r in results] == [3, 2, 3, 3, 2]
    assert batcher.calls == 2


def test_default_engine_is_predicts_choice_for_many_images(run: Path) -> None:
    from fastflow.estimator.engines import choose_engine

    served = load_served(run)
    assert (served.engine_name, served.precision) == choose_engine(10**9, 400)


@pytest.fixture(scope="module")
def client(run: Path) -> TestClient:
    app = create_app(load_served(run, "torch"), ServeConfig(max_body_bytes=2**20, batch_wait_ms=0))
    with TestClient(app) as test_client:
        yield test_client


def test_bad_uploads_get_a_4xx_error_and_the_next_request_is_served(
    client: TestClient, images: list[Path]
) -> None:
    good = images[0].read_bytes()
    reference = _post(client, good).json()
    for name, (body, content_type, query, status, words) in bad_requests(good, 2**20).items():
        response = _post(client, body, content_type, query)
        assert response.status_code == status, (name, response.text)
        error = response.json()["error"]
        assert words in error and "\n" not in error, (name, error)
        after = _post(client, good)
        assert after.status_code == 200 and after.json()["score"] == reference["score"], name


def test_an_engine_failure_is_a_500_json_error(images: list[Path]) -> None:
    def engine(pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise RuntimeError("out of memory\nat some kernel")

    served = ServedModel("broken", engine, "torch", "f32", 0.0, 0.0)
    with TestClient(create_app(served, ServeConfig(batch_wait_ms=0))) as broken:
        response = _post(broken, images[0].read_bytes())
    assert response.status_code == 500
    assert response.json() == {"error": "the engine failed on this image (out of memory); please report it"}


def test_image_over_the_pixel_limit_is_refused(run: Path, images: list[Path]) -> None:
    app = create_app(load_served(run, "torch"), ServeConfig(max_pixels=200 * 200))
    with TestClient(app) as small:
        response = _post(small, images[0].read_bytes())
    assert response.status_code == 400 and "over the limit of 40000 pixels" in response.json()["error"]


def test_multipart_upload_with_heatmap_matches_predicts_pictures(
    client: TestClient, run: Path, images: list[Path], tmp_path: Path
) -> None:
    path = images[-1]
    expected = _predicted(run, [path], "torch", tmp_path / "predict")[str(path)]
    response = client.post("/predict?heatmap=1", files={"file": (path.name, path.read_bytes(), "image/jpeg")})
    body = response.json()
    assert response.status_code == 200 and abs(body["score"] - expected["score"]) <= 1e-5
    overlay = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["overlay_png"]))))
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask_png"]))))
    predicted_overlay = np.asarray(Image.open(tmp_path / "predict" / expected["overlay"]))
    predicted_mask = np.asarray(Image.open(tmp_path / "predict" / expected["mask"]))
    assert overlay.shape == predicted_overlay.shape and mask.shape == predicted_mask.shape
    assert np.abs(overlay.astype(int) - predicted_overlay).max() <= 1
    assert (mask == predicted_mask).mean() > 0.999


def test_health_and_model(client: TestClient, run: Path) -> None:
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "run"
    model = client.get("/model").json()
    detector = FastFlow.load(run)
    assert (
        model["threshold"] == detector.threshold_
        and model["engine"] == "torch"
        and model["precision"] == "f32"
    )
    assert model["config"]["input_size"] == [96, 80] and model["recipe"]["name"] == detector.recipe_.name
    assert (model["false_alarm_rate"], model["calibration_images"]) == (RATE, 10)
    assert model["guaranteed_false_alarm_rate"] == pytest.approx(5 / 11)
    assert model["fastflow_version"]
    assert client.get("/").text.startswith("<!doctype html>")


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.5, 0.75, 0.95])
def test_a_request_labels_at_its_own_false_alarm_rate(
    client: TestClient, run: Path, images: list[Path], rate: float
) -> None:
    """?false_alarm_rate=a: the threshold the stored calibration gives for a, the label at it,
    and what it guarantees; the score and its p-value do not change."""
    calibration = FastFlow.load(run).calibration_
    threshold = calibration.threshold(rate)
    labels = []
    for path in images:
        own = _post(client, path.read_bytes()).json()
        body = _post(client, path.read_bytes(), query=f"?false_alarm_rate={rate}").json()
        assert (body["score"], body["p_value"]) == (own["score"], own["p_value"])
        assert (body["threshold"], body["false_alarm_rate"]) == (threshold, rate)
        assert body["guaranteed_false_alarm_rate"] == calibration.guaranteed_rate(rate)
        assert body["label"] == ("anomalous" if body["score"] > threshold else "normal")
        assert (body["label"] == "anomalous") == (body["p_value"] <= calibration.guaranteed_rate(rate))
        labels.append(body["label"])
    # The images are the calibration images: floor(11 a) - 1 of them lie above the threshold.
    assert labels.count("anomalous") == max(math.floor(rate * 11), 1) - 1


@pytest.mark.parametrize("value", ["0", "1", "-0.01", "1.5", "nan", "inf", "often", ""])
def test_a_false_alarm_rate_out_of_range_is_a_422_naming_it(
    client: TestClient, images: list[Path], value: str
) -> None:
    response = _post(client, images[0].read_bytes(), query=f"?false_alarm_rate={value}")
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert "false_alarm_rate" in error and "\n" not in error


def test_a_model_without_calibration_scores_refuses_a_rate(images: list[Path], tmp_path: Path) -> None:
    model = FastFlowModel(get_config("resnet18", input_size=(96, 80), flow_steps=2), "random").eval()
    FastFlow.from_model(model, 0.0).save(tmp_path / "model.safetensors")
    with TestClient(create_app(load_served(tmp_path, "torch"), ServeConfig(batch_wait_ms=0))) as plain:
        own = _post(plain, images[0].read_bytes()).json()
        refused = _post(plain, images[0].read_bytes(), query="?false_alarm_rate=0.1")
    assert own["p_value"] is None and own["false_alarm_rate"] is None
    assert refused.status_code == 422
    assert "false_alarm_rate needs calibration scores" in refused.json()["error"]


def test_a_served_export_gives_the_runs_p_values_and_rates(
    run: Path, images: list[Path], tmp_path: Path
) -> None:
    pytest.importorskip("onnxruntime")
    export = FastFlow.load(run).export(tmp_path / "onnx").parent
    answers = {}
    for name, path in (("run", run), ("export", export)):
        with TestClient(create_app(load_served(path, "onnx"), ServeConfig(batch_wait_ms=0))) as served:
            answers[name] = [
                _post(served, p.read_bytes(), query="?false_alarm_rate=0.25").json() for p in images
            ]
    for ours, theirs in zip(answers["run"], answers["export"], strict=True):
        assert abs(ours["score"] - theirs["score"]) <= 1e-6
        assert (ours["p_value"], ours["label"], ours["threshold"]) == (
            theirs["p_value"],
            theirs["label"],
            theirs["threshold"],
        )


def test_api_key(run: Path, images: list[Path]) -> None:
    app = create_app(load_served(run, "torch"), ServeConfig(api_key=KEY))
    good = images[0].read_bytes()
    with TestClient(app) as keyed:
        assert _post(keyed, good).status_code == 401
        wrong = _post(keyed, good, **{"X-API-Key": "not-the-key"})
        assert wrong.status_code == 401 and "X-API-Key" in wrong.json()["error"]
        assert keyed.get("/model").status_code == 401
        assert _post(keyed, good, **{"X-API-Key": KEY}).status_code == 200
        assert keyed.get("/health").status_code == 200 and keyed.get("/").status_code == 200
        # The probes are open; the v2 models and the metrics need the key like the rest.
        assert keyed.get("/v2/health/live").status_code == 200
        assert keyed.get("/v2/health/ready").status_code == 200
        assert keyed.get("/v2/models/run").status_code == 401 and keyed.get("/metrics").status_code == 401
        assert keyed.get("/metrics", headers={"X-API-Key": KEY}).status_code == 200


@pytest.mark.parametrize(
    ("flags", "names"),
    [
        (["--max-batch", "0"], ["--max-batch"]),
        (["--batch-wait-ms", "-1"], ["--batch-wait-ms"]),
        (["--max-body-mb", "0"], ["--max-body-mb"]),
        (["--engine", "tensorrt"], ["tensorrt"]),
        (["--precision", "f16"], ["f16"]),
        (["--port", "70000"], ["--port"]),
        (["--api-key", "short"], ["--api-key"]),
    ],
)
def test_serve_options_are_checked_before_the_model_is_loaded(
    capsys, flags: list[str], names: list[str], tmp_path: Path
) -> None:
    # The run does not exist: an error about the option proves it was checked first.
    code = main(["serve", str(tmp_path / "no-run"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert all(name in err[0] for name in names), err


def test_serve_without_a_run_is_a_one_line_error(capsys, tmp_path: Path) -> None:
    code = main(["serve", str(tmp_path / "no-run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no-run does not exist" in err[0]


# ---------------------------------------------------------------------------- the page, in Chromium

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def test_page_in_headless_chromium(run: Path, bottle: Path) -> None:
    """Load the page, upload a bottle image, read the verdict and score; save a screenshot."""
    sync_api = pytest.importorskip("playwright.sync_api")

    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}; install it: apt-get install -y chromium")
    image = bottle / "test" / "broken_large" / "000.png"
    app = create_app(load_served(run, "torch"), ServeConfig())
    with loopback_server(app) as base, sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(f"{base}/")
        page.set_input_files("#file", str(image))
        page.wait_for_selector("#result:not([hidden])", timeout=30_000)
        verdict, score = page.inner_text("#verdict"), float(page.inner_text("#score"))
        p_value, rate = page.inner_text("#p-value"), page.inner_text("#rate-used")
        page.fill("#rate", "0.95")  # the next upload is labelled at this rate
        page.set_input_files("#file", [])
        page.set_input_files("#file", str(image))
        page.wait_for_function("document.getElementById('rate-used').textContent.startsWith('0.95')")
        at_rate = page.inner_text("#threshold")
        overlay_src = page.get_attribute("#overlay", "src")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "serve_page.png"), full_page=True)
        browser.close()
    detector = FastFlow.load(run)
    expected = detector.detect([image])
    assert verdict == ("anomalous" if expected.labels[0] else "normal")
    assert abs(score - float(expected.scores[0])) <= 1e-5  # the page shows six decimals
    assert p_value == f"{expected.p_values[0]:.4f}" and rate.startswith(f"{RATE} (guaranteed at most")
    assert abs(float(at_rate) - detector.calibration_.threshold(0.95)) <= 1e-6
    assert overlay_src.startswith("data:image/png;base64,") and len(overlay_src) > 1000
    assert (ARTIFACTS / "serve_page.png").stat().st_size > 10_000
