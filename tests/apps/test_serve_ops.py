"""Running ``fastflow serve``: Prometheus metrics that count what was sent, one access-log line
per request, several models in one server (the JSON API's ``?model=``, the v2 routes, the CLI's
NAME=RUN arguments), and a graceful stop on SIGTERM, tested on the CLI's own server in a child
process with a request in flight.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from support import calibrated_run, free_port, perturb_trainable, serve_images

import fastflow
from fastflow import FastFlow
from fastflow.apps.cli import main
from fastflow.core.errors import FastFlowError
from fastflow.model.config import get_config
from fastflow.model.fastflow import FastFlowModel

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from fastflow.apps.serve import ServeConfig, create_app, load_served
from fastflow.apps.serve_metrics import ACCESS_LOGGER
from fastflow.apps.serve_models import MicroBatcher, model_arguments

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return serve_images(tmp_path_factory.mktemp("ops") / "data")


@pytest.fixture(scope="module")
def run(images: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return calibrated_run(images, tmp_path_factory.mktemp("ops") / "run")


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another model (other flow weights), without calibration scores."""
    model = FastFlowModel(get_config("resnet18", input_size=(96, 80), flow_steps=2), "random").eval()
    perturb_trainable(model, torch.Generator().manual_seed(2))
    folder = tmp_path_factory.mktemp("ops") / "plain"
    FastFlow.from_model(model, 0.0).save(folder / "model.safetensors")
    return folder


def _png(client: TestClient, data: bytes, query: str = "", content_type: str = "image/png") -> httpx.Response:
    return client.post(f"/predict{query}", content=data, headers={"content-type": content_type})


def _infer_files(client: TestClient, model: str, *files: bytes, outputs: list[str] | None = None):
    data = [base64.b64encode(f).decode() for f in files]
    body: dict = {
        "inputs": [{"name": "image_file", "shape": [len(files)], "datatype": "BYTES", "data": data}]
    }
    if outputs is not None:
        body["outputs"] = [{"name": name} for name in outputs]
    return client.post(f"/v2/models/{model}/infer", json=body)


def _metrics(text: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, its labels) -> value, as Prometheus' own parser reads ``/metrics``."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


# ---------------------------------------------------------------------------- metrics and logs


def test_metrics_count_the_requests_sent(run: Path, images: list[Path]) -> None:
    served = load_served(run, "torch")
    good = images[0].read_bytes()
    with TestClient(create_app(served, ServeConfig(batch_wait_ms=0))) as client:
        assert all(_png(client, good).status_code == 200 for _ in range(3))
        assert _png(client, good, content_type="text/plain").status_code == 415
        assert _png(client, good, query="?model=nope").status_code == 404
        assert _infer_files(client, "run", good, images[3].read_bytes()).status_code == 200
        assert client.get("/v2/models/nope").status_code == 404
        calls = [client.get("/health").json()["engine_calls"] for _ in range(2)][-1]
        samples = _metrics(client.get("/metrics").text)
        again = _metrics(client.get("/metrics").text)
    requests = "fastflow_http_requests_total"
    assert _value(samples, requests, method="POST", route="/predict", status="200") == 3
    assert _value(samples, requests, method="POST", route="/predict", status="415") == 1
    assert _value(samples, requests, method="POST", route="/predict", status="404") == 1
    assert _value(samples, requests, method="POST", route="/v2/models/{name}/infer", status="200") == 1
    assert _value(samples, requests, method="GET", route="/v2/models/{name}", status="404") == 1
    assert _value(samples, requests, method="GET", route="/health", status="200") == 2
    assert _value(samples, requests, method="GET", route="/metrics", status="200") is None  # not yet answered
    assert _value(again, requests, method="GET", route="/metrics", status="200") == 1
    latency = "fastflow_http_request_duration_seconds"
    assert _value(samples, f"{latency}_count", method="POST", route="/predict") == 5
    assert _value(samples, f"{latency}_bucket", method="POST", route="/predict", le="+Inf") == 5
    assert _value(samples, "fastflow_images_scored_total", model="run") == 5
    assert calls >= 4 and _value(samples, "fastflow_batch_size_count", model="run") == calls
    assert _value(samples, "fastflow_batch_size_sum", model="run") == 5
    assert _value(samples, "fastflow_inference_duration_seconds_count", model="run") == calls
    assert _value(samples, "fastflow_queue_depth", model="run") == 0
    assert _value(samples, "fastflow_model_load_seconds", model="run") == served.load_seconds > 0


def test_queue_depth_is_the_images_waiting_for_the_engine() -> None:
    """Images queued before the engine thread starts wait; once their call ran, none do."""
    seen: list[int] = []

    def engine(pixels: torch.Tensor):
        seen.append(batcher.waiting())
        scores = pixels.float().mean(dim=(1, 2, 3)).numpy()
        return scores[:, None, None], scores, scores > 0

    batcher = MicroBatcher(engine, max_batch=8, wait_s=0.0)
    futures = [batcher.submit(torch.zeros(3, 4, 4, dtype=torch.uint8)) for _ in range(3)]
    assert batcher.waiting() == 3
    batcher.start()
    [future.result(timeout=10) for future in futures]
    batcher.stop()
    assert seen == [0] and batcher.waiting() == 0


def test_one_access_log_line_per_request(run: Path, images: list[Path], caplog) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    good = images[0].read_bytes()
    with TestClient(create_app(load_served(run, "torch"), ServeConfig(batch_wait_ms=0))) as client:
        _png(client, good)
        _png(client, good, content_type="text/plain")
        client.get("/health")
        _infer_files(client, "run", good, good)
    lines = [r.getMessage() for r in caplog.records if r.name == ACCESS_LOGGER]
    pattern = re.compile(r"(GET|POST) (\S+) (\d{3}) (\d+\.\d)ms model=(\S+) images=(\d+) batch=(\S+)")
    fields = [pattern.fullmatch(line) for line in lines]
    assert len(lines) == 4 and all(fields), lines
    parsed = [(m[1], m[2], m[3], m[5], m[6]) for m in fields if m]
    assert parsed == [
        ("POST", "/predict", "200", "run", "1"),
        ("POST", "/predict", "415", "-", "0"),
        ("GET", "/health", "200", "-", "0"),
        ("POST", "/v2/models/{name}/infer", "200", "run", "2"),
    ]
    assert [m[7] for m in fields if m][:3] == ["1", "-", "-"] and fields[3][7] in ("1", "2")
    assert max(len(line) for line in lines) < 120  # no image data, nothing a client sent


# ---------------------------------------------------------------------------- several models


def test_several_models_in_one_server(run: Path, plain: Path, images: list[Path]) -> None:
    image = images[5]
    expected = {
        name: FastFlow.load(path).detect([image]).scores[0] for name, path in (("a", run), ("b", plain))
    }
    assert abs(expected["a"] - expected["b"]) > 1e-3  # the models tell apart which one answered
    models = [load_served(run, "torch", name="a"), load_served(plain, "torch", name="b")]
    with TestClient(create_app(models, ServeConfig(batch_wait_ms=0))) as client:
        first, second = (_png(client, image.read_bytes(), q).json() for q in ("", "?model=b"))
        unknown = _png(client, image.read_bytes(), "?model=zzz")
        described = client.get("/model").json(), client.get("/model?model=b").json()
        listed = client.get("/v2/models").json()["models"]
        outputs = [o["name"] for o in client.get("/v2/models/b").json()["outputs"]]
        v2 = _infer_files(client, "b", image.read_bytes()).json()
        no_p_value = _infer_files(client, "b", image.read_bytes(), outputs=["p_value"])
        health = client.get("/health").json()
    assert (first["model"], second["model"]) == ("a", "b")
    assert abs(first["score"] - expected["a"]) <= 1e-5 and abs(second["score"] - expected["b"]) <= 1e-5
    assert unknown.status_code == 404
    assert unknown.json()["error"].startswith(
        "no model named 'zzz'; this server has a, b: choose one with ?model="
    )
    assert [d["name"] for d in described] == ["a", "b"] and described[0]["models"] == ["a", "b"]
    assert (described[0]["calibration_images"], described[1]["calibration_images"]) == (10, 0)
    assert [m["name"] for m in listed] == ["a", "b"] and all(m["ready"] for m in listed)
    assert outputs == ["score", "label", "anomaly_map"]  # b has no calibration: no p-values
    assert [o["name"] for o in v2["outputs"]] == ["score", "label"]
    assert abs(v2["outputs"][0]["data"][0] - expected["b"]) <= 1e-5
    assert no_p_value.status_code == 400 and "no p_value" in no_p_value.json()["error"]
    assert (health["model"], health["models"]) == ("a", ["a", "b"])


def test_two_models_of_one_name_are_refused(run: Path) -> None:
    with pytest.raises(FastFlowError, match="model name 'run' is given twice"):
        create_app([load_served(run, "torch"), load_served(run, "torch")], ServeConfig())


def test_model_arguments(run: Path, plain: Path, tmp_path: Path) -> None:
    assert model_arguments([f"a={run}", f"b={plain}"]) == [("a", run), ("b", plain)]
    assert model_arguments([str(run), str(plain)]) == [("run", run), ("plain", plain)]
    odd = tmp_path / "lr=0.1"
    odd.mkdir()
    assert model_arguments([str(odd)]) == [("lr=0.1", odd)]  # an existing path is a RUN
    for arguments, words in [
        ([f"a={run}", f"a={plain}"], "model name 'a' is given twice"),
        ([str(run), str(run)], "model name 'run' is given twice"),
        ([f"bad/name={run}"], "NAME=RUN"),
        ([f"={run}"], "NAME=RUN"),
        (["a="], "NAME=RUN"),
        ([f"a={tmp_path / 'missing'}"], "missing does not exist"),
        ([], "no model to serve"),
    ]:
        with pytest.raises(FastFlowError, match=re.escape(words)):
            model_arguments(arguments)


def test_serve_with_a_duplicate_name_is_a_one_line_error(capsys, run: Path) -> None:
    code = main(["serve", f"a={run}", f"a={run}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "given twice" in err[0] and "a=RUN1 b=RUN2" in err[0]


# ---------------------------------------------------------------------------- graceful shutdown


def _start(run: Path, port: int, *flags: str) -> subprocess.Popen:
    """``python -m fastflow serve RUN`` in a child process, from this checkout's sources."""
    env = {**os.environ, "PYTHONPATH": str(Path(fastflow.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "fastflow", "serve", str(run), "--port", str(port), "--engine", "torch"]
    return subprocess.Popen(
        [*command, *flags], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"{what} within {timeout} s")


def _refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def _queued(base: str) -> bool:
    samples = _metrics(httpx.get(f"{base}/metrics", timeout=5).text)
    return _value(samples, "fastflow_queue_depth", model="run") == 1


def _stop_with_a_request_in_flight(run: Path, image: Path, wait_ms: int, *flags: str):
    """Start a server whose engine thread waits ``wait_ms`` for company, send one image, and
    SIGTERM the server while the image waits. -> (the request's future, the server, whether
    new connections were refused while the request was still unanswered)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = _start(run, port, "--batch-wait-ms", str(wait_ms), *flags)
    pool = ThreadPoolExecutor(1)
    try:
        _wait_until(
            lambda: httpx.get(f"{base}/health", timeout=2).status_code == 200, 120, "no healthy server"
        )
        pending = pool.submit(
            httpx.post,
            f"{base}/predict",
            content=image.read_bytes(),
            headers={"content-type": "image/png"},
            timeout=60,
        )
        _wait_until(lambda: _queued(base), 10, "the request was not queued")
        server.send_signal(signal.SIGTERM)
        _wait_until(lambda: _refuses(port), 5, "new connections were still accepted")
        refused_in_flight = not pending.done()
        return pending, server, refused_in_flight
    except BaseException:
        server.kill()
        raise
    finally:
        pool.shutdown(wait=False)


def test_sigterm_finishes_the_request_in_flight_then_exits_0(run: Path, images: list[Path]) -> None:
    image = images[0]
    pending, server, refused_in_flight = _stop_with_a_request_in_flight(run, image, 4000)
    try:
        response = pending.result(timeout=60)
        code = server.wait(timeout=60)
    finally:
        server.kill()
    _, err = server.communicate()
    assert refused_in_flight
    assert response.status_code == 200, response.text
    assert abs(response.json()["score"] - FastFlow.load(run).detect([image]).scores[0]) <= 1e-5
    assert code == 0, err
    assert re.search(r"POST /predict 200 \d+\.\dms model=run images=1 batch=1", err), err


def test_sigterm_waits_at_most_the_shutdown_timeout(run: Path, images: list[Path]) -> None:
    """A request that would wait 10 s more is cut off after --shutdown-timeout 1; still exit 0."""
    pending, server, refused_in_flight = _stop_with_a_request_in_flight(
        run, images[0], 10_000, "--shutdown-timeout", "1"
    )
    stopped = time.monotonic()
    try:
        code = server.wait(timeout=60)
    finally:
        server.kill()
    took = time.monotonic() - stopped
    assert refused_in_flight and code == 0 and took < 6, (code, took)
    try:
        answered = pending.result(timeout=30).status_code
    except httpx.HTTPError:
        answered = None  # the connection closed unanswered
    assert answered != 200
