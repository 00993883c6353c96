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
from support import bad_requests, calibrated_run, loopback_server, png_claiming, serve_images

from fastflow import FastFlow
from fastflow.apps.cli import main
from fastflow.apps.prediction_files import write_predictions
from fastflow.apps.viz import heat_colors, mask_outline
from fastflow.estimator.data import PIL_PIXEL_CEILING, ShapeLimits
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


def test_an_application_serves_again_after_its_lifespan_ended(run: Path, images: list[Path]) -> None:
    """Its lifespan stops the batcher threads; a second one starts new threads."""
    app = create_app(load_served(run, "torch"), ServeConfig(batch_wait_ms=0))
    scores = []
    for _ in range(2):
        with TestClient(app) as again:
            scores.append(_post(again, images[0].read_bytes()).json()["score"])
    assert scores[0] == scores[1]


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
    error = response.json()["error"]
    assert response.status_code == 400 and "over the server's limit of 40000 pixels" in error
    assert "--max-megapixels 0.04" in error


def test_a_bomb_is_refused_naming_the_servers_limit_not_pils(client: TestClient) -> None:
    """Under PIL's own ceiling the server's check refuses it; over it PIL refuses to open it,
    and the answer still names the server's limit (--max-megapixels), not PIL's number."""
    for width, height in ((10_000, 10_000), (100_000, 100_000)):
        response = _post(client, png_claiming(width, height))
        error = response.json()["error"]
        assert response.status_code == 400 and "decompression bomb" in error, error
        assert "over the server's limit of 40000000 pixels (--max-megapixels 40;" in error, error
        assert str(PIL_PIXEL_CEILING) not in error and str(PIL_PIXEL_CEILING // 2) not in error


def _png(width: int, height: int) -> bytes:
    """A PNG of ``width`` x ``height`` with a diagonal texture (it compresses: a 20000x20 one is small)."""
    rows, columns = np.indices((height, width))
    pixels = np.stack([(rows * 5 + columns * 3) % 256, (columns * 7) % 256, (rows * 11) % 256], axis=-1)
    pixels = pixels.astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


# (width, height) -> the words of the refusal after "WxH px, with ".
UNSCORABLE = {
    (1, 1): "a side under the minimum of 32 px (--min-side)",
    (3, 3): "a side under the minimum of 32 px (--min-side)",
    (20_000, 20): "a side under the minimum of 32 px (--min-side) and a side ratio of 1000:1, over the "
    "limit of 20:1 (--max-aspect)",
    (40, 2000): "a side ratio of 50:1, over the limit of 20:1 (--max-aspect)",
}


@pytest.mark.parametrize("size", list(UNSCORABLE), ids=lambda size: f"{size[0]}x{size[1]}")
def test_images_too_small_or_too_elongated_get_a_4xx_naming_size_and_limit(
    client: TestClient, images: list[Path], size: tuple[int, int]
) -> None:
    """Both routes refuse them with the same line, and the next image is served."""
    width, height = size
    data = _png(width, height)
    expected = f"the image is {width}x{height} px, with {UNSCORABLE[size]}; "
    response = _post(client, data)
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith(expected) and "\n" not in response.json()["error"]
    body = {
        "inputs": [
            {
                "name": "image_file",
                "shape": [1],
                "datatype": "BYTES",
                "data": [base64.b64encode(data).decode()],
            }
        ]
    }
    v2 = client.post("/v2/models/run/infer", json=body)
    assert (
        v2.status_code == 400
        and v2.json()["error"] == f"input image_file element 0: {response.json()['error']}"
    )
    assert _post(client, images[0].read_bytes()).status_code == 200


def test_the_shape_limits_are_the_servers_to_set(run: Path) -> None:
    app = create_app(load_served(run, "torch"), ServeConfig(limits=ShapeLimits(min_side=1, max_aspect=1000)))
    with TestClient(app) as lenient:
        assert lenient.get("/model").json()["min_side"] == 1
        answers = [_post(lenient, _png(*size)) for size in ((1, 1), (3, 3), (20_000, 20))]
    assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
    assert [(a.json()["width"], a.json()["height"]) for a in answers] == [(1, 1), (3, 3), (20_000, 20)]


def test_predict_refuses_them_in_one_line_and_writes_nothing(
    capsys, run: Path, images: list[Path], tmp_path: Path
) -> None:
    for (width, height), words in UNSCORABLE.items():
        path = tmp_path / f"strip_{width}x{height}.png"
        path.write_bytes(_png(width, height))
        output = tmp_path / f"out_{width}x{height}"
        code = main(["predict", str(run), str(images[0]), str(path), "-o", str(output)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith(f"error: image {path} is {width}x{height} px, with {words}")
        assert not output.exists()
    lenient = ["--min-side", "1", "--max-aspect", "1000"]
    assert main(["predict", str(run), str(path), "-o", str(tmp_path / "out"), *lenient]) == 0
    assert (tmp_path / "out" / "predictions.csv").read_text().count("\n") == 2


def test_mask_outline_is_the_masks_boundary() -> None:
    mask = np.zeros((6, 8), dtype=bool)
    mask[1:5, 2:7] = True  # a 4x5 block
    mask[0, 0] = True  # a lone cell at the border
    outline = np.asarray(mask_outline(mask, (16, 12)))  # twice the size
    assert outline.shape == (12, 16, 4)
    drawn = outline[::2, ::2, 3] > 0
    expected = mask.copy()
    expected[2:4, 3:6] = False  # the block's inside
    assert (drawn == expected).all()
    assert (outline[outline[..., 3] > 0][:, :3] == (0, 255, 255)).all()


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
    # The outline lies on the mask's edge; the colour scale and range are those of the overlay.
    outline = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["outline_png"]))))
    assert outline.shape == (*mask.shape, 4) and (mask[outline[..., 3] > 0] == 255).all()
    assert 0 < (outline[..., 3] > 0).sum() < (mask == 255).sum() < mask.size
    detector = FastFlow.load(run)
    anchors = heat_colors(np.linspace(0, 1, 5))
    assert body["heat_scale"]["colors"] == ["#" + bytes(rgb.tolist()).hex() for rgb in anchors]
    assert (body["heat_scale"]["low"], body["heat_scale"]["high"]) == (
        detector.map_floor_,
        detector.threshold_,
    )
    amap = detector.detect([path]).maps[0]
    assert body["map_range"] == pytest.approx([float(amap.min()), float(amap.max())], abs=1e-5)


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
        (["--min-side", "0"], ["--min-side"]),
        (["--max-aspect", "0.5"], ["--max-aspect"]),
        (["--max-megapixels", "500"], ["--max-megapixels", "178.9 megapixels"]),
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
# What a user must never see: an <img> shown but not loaded (the broken-image icon), or a shown
# label, cell, caption or verdict without text. Returns the ids of the offenders.
PAGE_FAULTS = """() => {
  const shown = (e) => e.getClientRects().length > 0 && getComputedStyle(e).visibility !== "hidden";
  const broken = [...document.images].filter((i) => shown(i) && !(i.complete && i.naturalWidth > 0));
  const labels = "label, td, figcaption, .verdict, .ends span, #map-range, #status, #notice, #model-name";
  const empty = [...document.querySelectorAll(labels)].filter((e) => shown(e) && !e.textContent.trim());
  return {broken: broken.map((e) => e.id), empty: empty.map((e) => e.id || e.tagName)};
}"""
CLEAN = {"broken": [], "empty": []}
# The picture each <img> of the result shows: [id, naturalWidth, naturalHeight, shown].
PICTURES = """() => ["original", "overlay", "outline"].map((id) => {
  const image = document.getElementById(id);
  return [id, image.naturalWidth, image.naturalHeight, image.getClientRects().length > 0];
})"""


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium (Debian's package, through Playwright) for the page tests."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}; install it: apt-get install -y chromium")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield chromium
        chromium.close()


def _screenshot(page, name: str) -> Path:
    """A small JPEG of what the page shows, under test-artifacts/, for a person to look at."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.jpg"
    page.screenshot(path=str(path), type="jpeg", quality=70, full_page=True)
    assert 10_000 < path.stat().st_size < 400_000
    return path


def _predict_answer(page, pick) -> None:
    """Run ``pick()`` and wait until the page has the answer of the /predict request it sent
    (a timeout here: it sent none)."""
    with page.expect_response(lambda r: r.request.method == "POST" and "/predict" in r.url, timeout=60_000):
        pick()


def test_page_in_headless_chromium(run: Path, bottle: Path, browser, tmp_path: Path) -> None:
    """First load, a good upload, the same file again at another rate, a bad upload after the
    good one (twice: the same file picked again), with screenshots at each stage."""
    image = bottle / "test" / "broken_large" / "000.png"
    notes = {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"line 7: all good\n" * 20}
    app = create_app(load_served(run, "torch"), ServeConfig())
    with loopback_server(app) as base:
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        page.goto(f"{base}/")
        page.wait_for_selector("#model-name:not([hidden])")
        assert page.inner_text("#model-name") == "\u00b7 run (torch)"
        assert page.evaluate(PAGE_FAULTS) == CLEAN
        assert page.is_hidden("#result") and page.is_hidden("#model-row")  # one model: no picker
        _screenshot(page, "serve_page_first_load")

        _predict_answer(page, lambda: page.set_input_files("#file", str(image)))
        page.wait_for_selector("#result:not([hidden])", timeout=30_000)
        # The input is emptied after each pick: a browser fires no change for an unchanged value.
        assert page.input_value("#file") == ""
        verdict, score = page.inner_text("#verdict"), float(page.inner_text("#score"))
        p_value, rate = page.inner_text("#p-value"), page.inner_text("#rate-used")
        assert page.evaluate(PICTURES) == [
            [name, 900, 900, True] for name in ("original", "overlay", "outline")
        ]
        legend = (
            page.inner_text("#legend-low"),
            page.inner_text("#legend-high"),
            page.inner_text("#map-range"),
        )
        assert page.evaluate(PAGE_FAULTS) == CLEAN
        _screenshot(page, "serve_page_after_good")

        page.fill("#rate", "0.95")  # the same file again, labelled at this rate: a new request
        _predict_answer(page, lambda: page.set_input_files("#file", str(image)))
        page.wait_for_function("document.getElementById('rate-used').textContent.startsWith('0.95')")
        at_rate = page.inner_text("#threshold")

        page.fill("#rate", "")
        for _ in range(2):  # a text file after the good image, then the same file again
            _predict_answer(page, lambda: page.set_input_files("#file", files=[notes]))
            page.wait_for_selector("#error", timeout=30_000)
            error = page.inner_text("#error")
            assert page.input_value("#file") == ""
            assert page.is_hidden("#result") and page.text_content("#verdict") == ""
            assert (
                page.evaluate("() => [...document.images].filter((i) => i.getAttribute('src')).length") == 0
            )
            assert page.evaluate(PAGE_FAULTS) == CLEAN
        _screenshot(page, "serve_page_after_error")
        page.close()
    detector = FastFlow.load(run)
    expected = detector.detect([image])
    assert verdict == ("anomalous" if expected.labels[0] else "normal")
    assert abs(score - float(expected.scores[0])) <= 1e-5  # the page shows six decimals
    assert p_value == f"{expected.p_values[0]:.4f}" and rate.startswith(f"{RATE} (guaranteed at most")
    assert abs(float(at_rate) - detector.calibration_.threshold(0.95)) <= 1e-6
    # The legend: the map floor (dark) to the threshold (bright), and this image's map range,
    # each shown to four significant digits.
    assert legend[0].startswith("\u2264 ") and legend[0].endswith(" normal")
    assert legend[1].startswith("anomalous \u2265 ") and legend[1].endswith(" (threshold)")
    floor, threshold = float(legend[0].split()[1]), float(legend[1].split()[2])
    assert floor == pytest.approx(detector.map_floor_, rel=1e-3)
    assert threshold == pytest.approx(detector.threshold_, rel=1e-3)
    low, high = (float(v) for v in legend[2].removeprefix("this image's map: ").split(" to "))
    amap = expected.maps[0]
    assert low == pytest.approx(float(amap.min()), rel=1e-3)
    assert high == pytest.approx(float(amap.max()), rel=1e-3)
    assert error == "error: the upload is not a PNG, JPEG, BMP or TIFF image; send one of those formats"


def test_page_with_an_api_key_and_two_models(run: Path, images: list[Path], browser, tmp_path: Path) -> None:
    """The page says the server needs a key and shows a refused upload as an error; with the
    key it lists the two models in a picker, and an upload is scored by the picked one (the
    second holds no calibration scores: no p-value or rate rows). A TIFF, which Chromium cannot
    display, hides the original and says why rather than showing a broken image."""
    model = FastFlowModel(get_config("resnet18", input_size=(96, 80), flow_steps=2), "random").eval()
    FastFlow.from_model(model, 0.0).save(tmp_path / "model.safetensors")
    models = [load_served(run, "torch", name="line-1"), load_served(tmp_path, "torch", name="line-2")]
    with loopback_server(create_app(models, ServeConfig(api_key=KEY))) as base:
        context = browser.new_context(viewport={"width": 1200, "height": 800})
        page = context.new_page()
        page.goto(f"{base}/")
        page.wait_for_selector("#notice:not([hidden])")
        assert page.inner_text("#notice") == "this server needs an API key: enter it below"
        assert page.is_hidden("#model-row") and page.evaluate(PAGE_FAULTS) == CLEAN

        _predict_answer(page, lambda: page.set_input_files("#file", str(images[0])))
        page.wait_for_selector("#error")
        assert "API key" in page.inner_text("#error") and page.is_hidden("#result")

        page.fill("#key", KEY)
        page.press("#key", "Tab")  # leaving the field is a change: the page asks for the models again
        page.wait_for_selector("#model-row:not([hidden])")
        assert page.is_hidden("#notice") and page.inner_text("#model-name") == "\u00b7 line-1 (torch)"
        assert page.eval_on_selector_all("#model option", "os => os.map((o) => o.value)") == [
            "line-1",
            "line-2",
        ]

        page.select_option("#model", "line-2")
        page.wait_for_function("document.getElementById('model-name').textContent.includes('line-2')")
        _predict_answer(page, lambda: page.set_input_files("#file", str(images[0])))
        page.wait_for_selector("#result:not([hidden])")
        assert page.inner_text("#model-used") == "line-2 (torch, f32)"
        assert page.is_hidden("#p-value-row") and page.is_hidden("#rate-row")
        assert page.evaluate(PAGE_FAULTS) == CLEAN

        page.select_option("#model", "line-1")  # another model: the last result goes
        assert page.is_hidden("#result")
        tiff = images[2]
        assert tiff.suffix == ".tiff"
        _predict_answer(page, lambda: page.set_input_files("#file", str(tiff)))
        page.wait_for_selector("#result:not([hidden])")
        assert page.inner_text("#model-used") == "line-1 (torch, f32)" and page.is_visible("#p-value-row")
        width, height = Image.open(tiff).size
        assert page.evaluate(PICTURES) == [
            ["original", 0, 0, False],
            ["overlay", width, height, True],
            ["outline", width, height, True],
        ]
        assert page.inner_text("#original-caption").startswith("this browser cannot show image/tiff")
        assert page.evaluate(PAGE_FAULTS) == CLEAN

        page.reload()  # the key is kept in the browser
        page.wait_for_selector("#model-row:not([hidden])")
        assert page.input_value("#key") == KEY
        context.close()
