"""``fastflow serve``'s Open Inference Protocol (KServe v2 REST) routes, driven by NVIDIA's own
client (``tritonclient.http``) against a real uvicorn server on a loopback port, and by plain
JSON requests: health, metadata, and infer with encoded files (BYTES, binary tensor data and
base64 JSON) and with raw pixels (UINT8 [N, 3, H, W]); the scores equal the detector's own with
the same engine (PyTorch), and every bad request gets a one-line ``{"error": ...}`` with the
protocol's status.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support import calibrated_run, loopback_server, serve_images

from fastflow import FastFlow

pytest.importorskip("fastapi")
httpclient = pytest.importorskip("tritonclient.http")
import httpx
from tritonclient.utils import InferenceServerException

from fastflow.apps.serve import ServeConfig, create_app, load_served

pytestmark = pytest.mark.usefixtures("one_thread")

RATE = 0.5
MAX_BATCH = 16


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return serve_images(tmp_path_factory.mktemp("v2") / "data")


@pytest.fixture(scope="module")
def run(images: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return calibrated_run(images, tmp_path_factory.mktemp("v2") / "run", RATE)


@pytest.fixture(scope="module")
def expected(run: Path, images: list[Path]):
    """The detector's own scores, maps, labels and p-values of ``images`` with PyTorch."""
    return FastFlow.load(run).detect(images, "torch")


@pytest.fixture(scope="module")
def base(run: Path):
    app = create_app(load_served(run, "torch"), ServeConfig(max_batch=MAX_BATCH, batch_wait_ms=20))
    with loopback_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def triton(base: str):
    client = httpclient.InferenceServerClient(base.removeprefix("http://"))
    yield client
    client.close()


def _pixels(path: Path) -> np.ndarray:
    """(3, H, W) uint8 RGB of an image file, read with PIL directly."""
    return np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1).copy()


def _p_values(run: Path, scores) -> list[float]:
    """The conformal p-values of ``scores`` against the run's calibration. (The calibration
    scores are these images' own, so a score 1e-7 off in another batch can move its p-value by
    one step: p-values are checked against the served score, the score against the detector's.)"""
    return FastFlow.load(run).calibration_.p_values(np.asarray(scores, dtype=np.float64)).tolist()


def test_health_and_metadata_through_tritonclient(triton, run: Path) -> None:
    detector = FastFlow.load(run)
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("run") and not triton.is_model_ready("no-such-model")
    assert triton.get_server_metadata()["name"] == "fastflow"
    meta = triton.get_model_metadata("run")
    assert meta["name"] == "run"
    assert {(i["name"], i["datatype"], tuple(i["shape"])) for i in meta["inputs"]} == {
        ("image_file", "BYTES", (-1,)),
        ("image", "UINT8", (-1, 3, -1, -1)),
    }
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
        ("score", "FP32", [-1]),
        ("label", "BOOL", [-1]),
        ("p_value", "FP64", [-1]),
        ("anomaly_map", "FP32", [-1, 96, 80]),
    ]
    parameters = meta["parameters"]
    assert parameters["input_size"] == [96, 80] and parameters["threshold"] == detector.threshold_
    assert (parameters["false_alarm_rate"], parameters["calibration_images"]) == (RATE, 10)
    assert parameters["guaranteed_false_alarm_rate"] == pytest.approx(5 / 11)
    with pytest.raises(InferenceServerException, match="no model named 'nope'"):
        triton.get_model_metadata("nope")


def test_infer_files_as_binary_bytes_through_tritonclient(
    triton, images: list[Path], expected, run: Path
) -> None:
    """All ten images (four formats, mixed sizes, one grayscale) in one BYTES input sent as
    binary data; every output requested, as binary data."""
    files = np.array([p.read_bytes() for p in images], dtype=np.object_)
    given = httpclient.InferInput("image_file", [len(files)], "BYTES")
    given.set_data_from_numpy(files)  # binary_data=True: the binary tensor data extension
    wanted = [httpclient.InferRequestedOutput(n) for n in ("score", "label", "p_value", "anomaly_map")]
    result = triton.infer("run", [given], outputs=wanted)
    scores = result.as_numpy("score")
    assert scores.dtype == np.float32 and scores.shape == (10,)
    assert np.abs(scores - expected.scores).max() <= 1e-5
    assert result.as_numpy("label").tolist() == [bool(label) for label in expected.labels]
    assert result.as_numpy("p_value").tolist() == _p_values(run, scores)
    maps = result.as_numpy("anomaly_map")
    assert maps.shape == (10, 96, 80) and np.abs(maps - expected.maps).max() <= 1e-4
    assert set(result.as_numpy("label").tolist()) == {True, False}


def test_infer_pixels_as_uint8_tensor_through_tritonclient(
    triton, images: list[Path], expected, run: Path
) -> None:
    """The same image twice as a UINT8 [2, 3, H, W] tensor; default outputs (no anomaly map),
    and a label at another false-alarm rate."""
    index = 0  # a colour PNG
    pixels = np.stack([_pixels(images[index])] * 2)
    given = httpclient.InferInput("image", list(pixels.shape), "UINT8")
    given.set_data_from_numpy(pixels)
    result = triton.infer("run", [given])
    assert np.abs(result.as_numpy("score") - expected.scores[index]).max() <= 1e-5
    assert result.as_numpy("label").tolist() == [bool(expected.labels[index])] * 2
    assert result.as_numpy("p_value").tolist() == _p_values(run, result.as_numpy("score"))
    assert result.as_numpy("anomaly_map") is None  # only when asked for
    relabelled = triton.infer("run", [given], parameters={"false_alarm_rate": 0.95})
    threshold = FastFlow.load(run).calibration_.threshold(0.95)
    assert relabelled.as_numpy("label").tolist() == [bool(expected.scores[index] > threshold)] * 2


def test_plain_json_requests(base: str, images: list[Path], expected, run: Path) -> None:
    """No binary data: files as base64 strings, pixels as integers, outputs as JSON lists."""
    files = [base64.b64encode(p.read_bytes()).decode() for p in images[:3]]
    body = {
        "id": "job-7",
        "inputs": [{"name": "image_file", "shape": [3], "datatype": "BYTES", "data": files}],
        "outputs": [{"name": "score"}, {"name": "label"}],
    }
    answer = httpx.post(f"{base}/v2/models/run/infer", json=body, timeout=60)
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    reply = answer.json()
    assert reply["id"] == "job-7" and reply["model_name"] == "run"
    outputs = {o["name"]: o for o in reply["outputs"]}
    assert set(outputs) == {"score", "label"}
    assert outputs["score"]["datatype"] == "FP32" and outputs["score"]["shape"] == [3]
    assert np.abs(np.array(outputs["score"]["data"]) - expected.scores[:3]).max() <= 1e-5
    assert outputs["label"]["data"] == [bool(label) for label in expected.labels[:3]]

    pixels = _pixels(images[3])
    rate = 0.95
    body = {
        "inputs": [
            {
                "name": "image",
                "shape": [1, *pixels.shape],
                "datatype": "UINT8",
                "data": pixels.ravel().tolist(),
            }
        ],
        "parameters": {"false_alarm_rate": rate},
    }
    reply = httpx.post(f"{base}/v2/models/run/infer", content=json.dumps(body), timeout=60).json()
    outputs = {o["name"]: o["data"] for o in reply["outputs"]}
    assert abs(outputs["score"][0] - expected.scores[3]) <= 1e-5
    threshold = FastFlow.load(run).calibration_.threshold(rate)
    assert outputs["label"] == [bool(expected.scores[3] > threshold)]
    assert outputs["p_value"] == _p_values(run, outputs["score"])


def test_binary_answer_layout(base: str, images: list[Path], expected) -> None:
    """By hand, without tritonclient: a binary BYTES input (4-byte little-endian length, then the
    file) and ``binary_data_output``: the JSON part's length in the header, then each output's
    ``binary_data_size`` bytes in order, little-endian."""
    data = images[4].read_bytes()
    tensor = {
        "name": "image_file",
        "shape": [1],
        "datatype": "BYTES",
        "parameters": {"binary_data_size": len(data) + 4},
    }
    body, headers = _binary_body(
        {"inputs": [tensor], "parameters": {"binary_data_output": True}},
        len(data).to_bytes(4, "little"),
        data,
    )
    answer = httpx.post(f"{base}/v2/models/run/infer", content=body, headers=headers, timeout=60)
    assert answer.status_code == 200, answer.text
    length = int(answer.headers["Inference-Header-Content-Length"])
    header, rest = json.loads(answer.content[:length]), answer.content[length:]
    sizes = [o["parameters"]["binary_data_size"] for o in header["outputs"]]
    assert [o["name"] for o in header["outputs"]] == ["score", "label", "p_value"]
    assert sizes == [4, 1, 8] and len(rest) == sum(sizes)
    score = np.frombuffer(rest[:4], dtype="<f4")[0]
    assert abs(score - expected.scores[4]) <= 1e-5 and rest[4:5] == bytes([int(expected.labels[4])])


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 150)).save(buffer, format="PNG")
    return buffer.getvalue()


def _binary_body(header: dict, *blobs: bytes) -> tuple[bytes, dict[str, str]]:
    text = json.dumps(header).encode()
    return text + b"".join(blobs), {"Inference-Header-Content-Length": str(len(text))}


def _bad_requests(good: bytes) -> dict[str, tuple[str, bytes, dict[str, str], int, str]]:
    """name -> (model, body, headers, status, words the error must hold)."""

    def files(*data: str, shape: list[int] | None = None, datatype: str = "BYTES") -> bytes:
        tensor = {
            "name": "image_file",
            "shape": shape or [len(data)],
            "datatype": datatype,
            "data": list(data),
        }
        return json.dumps({"inputs": [tensor]}).encode()

    encoded = base64.b64encode(good).decode()
    framed = len(good).to_bytes(4, "little") + good
    tensor = {"name": "image_file", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 99}}
    return {
        "unknown model": ("nope", files(encoded), {}, 404, "no model named 'nope'"),
        "not JSON": ("run", b"{not json", {}, 400, "bad inference request"),
        "no inputs": ("run", b'{"outputs": []}', {}, 400, "inputs"),
        "two inputs": (
            "run",
            json.dumps(
                {"inputs": [json.loads(files(encoded))["inputs"][0], json.loads(files(encoded))["inputs"][0]]}
            ).encode(),
            {},
            400,
            "exactly one input",
        ),
        "wrong input name": (
            "run",
            files(encoded).replace(b"image_file", b"picture"),
            {},
            400,
            "exactly one",
        ),
        "files not BYTES": ("run", files(encoded, datatype="UINT8"), {}, 400, "must be BYTES"),
        "not base64": ("run", files("%%%"), {}, 400, "base64"),
        "shape and data disagree": ("run", files(encoded, shape=[2]), {}, 400, "says 2 files"),
        "not an image": (
            "run",
            files(base64.b64encode(b"hello" * 20).decode()),
            {},
            400,
            "element 0: the upload is not a PNG",
        ),
        "too many images": ("run", files(*[encoded] * (MAX_BATCH + 1)), {}, 400, "--max-batch"),
        "pixels not 3 channels": (
            "run",
            json.dumps(
                {"inputs": [{"name": "image", "shape": [1, 1, 2, 2], "datatype": "UINT8", "data": [0] * 4}]}
            ).encode(),
            {},
            400,
            "[N, 3, H, W]",
        ),
        "pixel value out of range": (
            "run",
            json.dumps(
                {
                    "inputs": [
                        {
                            "name": "image",
                            "shape": [1, 3, 32, 32],
                            "datatype": "UINT8",
                            "data": [0] * (3 * 32 * 32 - 1) + [256],
                        }
                    ]
                }
            ).encode(),
            {},
            400,
            "integers 0..255",
        ),
        # The shape limits are checked from the shape, before the data (here none) is read.
        "pixels under the minimum side": (
            "run",
            json.dumps(
                {"inputs": [{"name": "image", "shape": [1, 3, 20, 20], "datatype": "UINT8"}]}
            ).encode(),
            {},
            400,
            "each image is 20x20 px, with a side under the minimum of 32 px (--min-side)",
        ),
        "pixels too elongated": (
            "run",
            json.dumps(
                {"inputs": [{"name": "image", "shape": [2, 3, 40, 2000], "datatype": "UINT8"}]}
            ).encode(),
            {},
            400,
            "2000x40 px, with a side ratio of 50:1, over the limit of 20:1 (--max-aspect)",
        ),
        "file under the minimum side": (
            "run",
            files(base64.b64encode(_png(3, 3)).decode()),
            {},
            400,
            "element 0: the image is 3x3 px, with a side under the minimum of 32 px",
        ),
        "unknown output": (
            "run",
            json.dumps({**json.loads(files(encoded)), "outputs": [{"name": "mask"}]}).encode(),
            {},
            400,
            "unknown output 'mask'",
        ),
        "rate out of range": (
            "run",
            json.dumps({**json.loads(files(encoded)), "parameters": {"false_alarm_rate": 2}}).encode(),
            {},
            400,
            "false_alarm_rate",
        ),
        "header length past the body": (
            "run",
            files(encoded),
            {"Inference-Header-Content-Length": "999999"},
            400,
            "Inference-Header-Content-Length",
        ),
        "binary size overruns": ("run", *_binary_body({"inputs": [tensor]}, framed), 400, "binary_data_size"),
    }


def test_bad_requests_get_the_protocols_error_and_the_next_is_served(
    base: str, images: list[Path], expected
) -> None:
    good = images[0].read_bytes()
    for name, (model, body, headers, status, words) in _bad_requests(good).items():
        response = httpx.post(f"{base}/v2/models/{model}/infer", content=body, headers=headers, timeout=60)
        assert response.status_code == status, (name, response.text)
        error = response.json()["error"]
        assert words in error and "\n" not in error, (name, error)
    body = {
        "inputs": [
            {
                "name": "image_file",
                "shape": [1],
                "datatype": "BYTES",
                "data": [base64.b64encode(good).decode()],
            }
        ]
    }
    after = httpx.post(f"{base}/v2/models/run/infer", json=body, timeout=60).json()
    assert abs(after["outputs"][0]["data"][0] - expected.scores[0]) <= 1e-5
