"""``fastflow serve``: a trained detector behind HTTP (FastAPI + uvicorn), with a small web page.

One engine is loaded at startup and owned by one worker thread (``MicroBatcher``): requests
that arrive within ``batch_wait_ms`` of each other share one engine call, grouped by image
size because the inference graph takes one (N, 3, H, W) size per call. Uploads are decoded by
``fastflow.estimator.data.decode_bytes`` (the same pixels as ``fastflow predict`` reads from a file), so
a served score equals ``predict``'s for the same engine. Each answer carries the score's
p-value against the model's calibration scores; ``?false_alarm_rate=`` labels one request at
the threshold of another rate, from the same scores, without reloading anything. Every bad
request gets a 4xx JSON ``{"error": "..."}`` that names the problem and the fix; nothing a
client sends stops the service.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import importlib.metadata
import importlib.resources
import io
import queue
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from fastflow.apps.viz import overlay
from fastflow.core.errors import FastFlowError, first_line, is_integer, is_real, require
from fastflow.estimator.calibration import Calibration, check_false_alarm_rate, p_value_json
from fastflow.estimator.data import DataError, decode_bytes
from fastflow.estimator.engines import (
    Engine,
    check_precision,
    choose_engine,
    default_precision,
    load_exported,
    read_metadata,
)

__all__ = ["API_KEY_HEADER", "MicroBatcher", "ServeConfig", "ServedModel", "create_app", "load_served"]

API_KEY_HEADER = "X-API-Key"
_RAW_TYPES = ("image/", "application/octet-stream")
# A server scores an open-ended stream of images: choose the engine as ``predict`` would for many.
_MANY_IMAGES = 1 << 30


@dataclass(frozen=True)
class ServeConfig:
    """Limits and batching of a server; checked on creation so the CLI fails before loading a model.

    Args:
        max_batch: most images per engine call.
        batch_wait_ms: how long the first queued image waits for others to share its call.
        max_body_bytes: largest request body; a bigger one is refused (413) while it is read.
        max_pixels: largest width x height of an upload, checked from its header (decompression bombs).
        api_key: when set, every endpoint but ``/`` and ``/health`` needs it in ``X-API-Key``.
    """

    max_batch: int = 16
    batch_wait_ms: float = 5.0
    max_body_bytes: int = 50 * 2**20
    max_pixels: int = 40_000_000
    api_key: str | None = None

    def __post_init__(self) -> None:
        require(
            is_integer(self.max_batch) and self.max_batch >= 1,
            "max_batch (--max-batch)",
            "an integer >= 1",
            self.max_batch,
        )
        require(
            is_real(self.batch_wait_ms) and 0 <= self.batch_wait_ms <= 10_000,
            "batch_wait_ms (--batch-wait-ms)",
            "between 0 and 10000",
            self.batch_wait_ms,
        )
        require(
            is_integer(self.max_body_bytes) and self.max_body_bytes >= 1,
            "max_body_bytes (--max-body-mb)",
            "at least 1 byte",
            self.max_body_bytes,
        )
        require(
            is_integer(self.max_pixels) and self.max_pixels >= 1,
            "max_pixels (--max-megapixels)",
            "at least 1 pixel",
            self.max_pixels,
        )
        require(
            self.api_key is None or len(self.api_key) >= 8,
            "api_key (--api-key, FASTFLOW_API_KEY)",
            "at least 8 characters",
            "<hidden>",
        )


@dataclass
class ServedModel:
    """What a server needs of a model: its engine, the threshold and map floor for pictures, the
    calibration for p-values and other rates, and the description ``GET /model`` returns."""

    name: str
    engine: Engine
    engine_name: str
    precision: str
    threshold: float
    map_floor: float
    info: dict[str, Any] = field(default_factory=dict)
    calibration: Calibration = field(
        default_factory=lambda: Calibration.of([], None, "a model served without calibration scores")
    )


def load_served(path: str | Path, engine: str | None = None, precision: str | None = None) -> ServedModel:
    """Load a RUN folder / ``model.safetensors`` (engine as ``predict`` chooses for many images,
    unless ``engine`` is given; its default precision unless ``precision``) or a folder written by ``fastflow export``
    (its own engine; the precision recorded at export unless ``precision``)."""
    from fastflow.estimator.detector import FastFlow  # torch model code: only once the options are checked

    if precision is not None:
        check_precision(precision)
    path = Path(path)
    if not path.exists():
        raise FastFlowError(
            f"{path} does not exist; pass a run folder, a model.safetensors or a 'fastflow export' folder"
        )
    name = (path if path.is_dir() else path.parent).resolve().name
    version = importlib.metadata.version("fastflow")
    exported = (
        path.is_dir()
        and not (path / "model.safetensors").exists()
        and any((path / f).is_file() for f in ("model.onnx", "model.xml"))
    )
    if exported or path.suffix in (".onnx", ".xml"):
        meta = read_metadata(path)
        if "threshold" not in meta:
            raise FastFlowError(
                f"{path} has no model.json with a threshold; export it again with 'fastflow export'"
            )
        kind = meta.get("engine", "onnx")
        if engine not in (None, kind):
            raise FastFlowError(
                f"{path} is an exported {kind} model; drop --engine or serve the run folder instead"
            )
        loaded = load_exported(path, precision)
        info = {
            "config": meta.get("config"),
            "recipe": meta.get("recipe"),
            "fastflow_version": version,
            "exported_with": meta.get("fastflow_version"),
        }
        return ServedModel(
            name,
            loaded,
            kind,
            loaded.precision,
            float(meta["threshold"]),
            float(meta.get("map_floor", -1.0)),
            info,
            loaded.calibration,
        )
    detector = FastFlow.load(path)
    chosen, default = (engine, default_precision(engine)) if engine else choose_engine(_MANY_IMAGES, 0)
    precision = precision or default
    runner = detector.engine(chosen, precision)
    info = {
        "config": detector.config.to_dict(),
        "recipe": detector.recipe_.to_dict(),
        "fastflow_version": version,
        "best_epoch": detector.best_epoch_,
    }
    return ServedModel(
        name,
        runner,
        chosen,
        precision,
        float(detector.threshold_),
        float(detector.map_floor_),
        info,
        detector.calibration_,
    )


@dataclass
class _Job:
    pixels: torch.Tensor  # (3, H, W) uint8
    queued: float
    future: Future = field(default_factory=Future)


@dataclass(frozen=True)
class Scored:
    """One image's result from a shared engine call."""

    amap: np.ndarray
    score: float
    label: int
    batch_size: int
    wait_ms: float
    inference_ms: float


class MicroBatcher:
    """The one thread that runs the engine: it takes the first queued image, waits up to
    ``wait_s`` from its arrival for more (at most ``max_batch``), and runs one engine call per
    image size. Under load the queue fills while the engine runs, so batches form without waiting.
    """

    def __init__(self, engine: Engine, max_batch: int, wait_s: float) -> None:
        self.engine, self.max_batch, self.wait_s = engine, max_batch, wait_s
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="fastflow-batcher", daemon=True)
        self.calls = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, pixels: torch.Tensor) -> Future:
        """Queue one (3, H, W) uint8 image; the future resolves to its ``Scored``."""
        job = _Job(pixels, time.perf_counter())
        self._queue.put(job)
        return job.future

    def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        jobs, deadline = [first], first.queued + self.wait_s
        while len(jobs) < self.max_batch:
            remaining = deadline - time.perf_counter()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
        return jobs, False

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                return
            jobs, stopping = self._collect(first)
            by_size: dict[tuple[int, ...], list[_Job]] = {}
            for job in jobs:
                by_size.setdefault(tuple(job.pixels.shape), []).append(job)
            for group in by_size.values():
                self._infer(group)

    def _infer(self, group: list[_Job]) -> None:
        start = time.perf_counter()
        try:
            amap, score, label = self.engine(torch.stack([job.pixels for job in group]))
        except Exception as error:  # noqa: BLE001 - the requests get the error; the thread must live on
            for job in group:
                job.future.set_exception(error)
            return
        self.calls += 1
        elapsed = (time.perf_counter() - start) * 1000
        for i, job in enumerate(group):
            waited = (start - job.queued) * 1000
            job.future.set_result(
                Scored(amap[i], float(score[i]), int(label[i]), len(group), waited, elapsed)
            )


class RequestError(Exception):
    """A client problem: answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed ``limit`` bytes."""
    too_big = RequestError(
        413,
        f"request body over the limit of {limit} bytes; send a smaller image "
        "or start the server with a larger --max-body-mb",
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        parts.append(chunk)
    return b"".join(parts)


async def _upload_bytes(request: Request, limit: int) -> bytes:
    """The image of a request: the raw body (``image/*``, ``application/octet-stream``) or the
    first file of a ``multipart/form-data`` body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    multipart = content_type == "multipart/form-data"
    if not multipart and not content_type.startswith(_RAW_TYPES):
        shown = content_type or "none"
        raise RequestError(
            415,
            f"unsupported content type '{shown}'; send the image as the body with "
            "Content-Type image/png (or image/jpeg, application/octet-stream), or as a "
            "multipart/form-data file field",
        )
    body = await _read_body(request, limit)
    if not multipart:
        return body

    async def once() -> AsyncGenerator[bytes, None]:
        yield body

    try:
        form = await MultiPartParser(request.headers, once(), max_files=1, max_fields=16).parse()
    except MultiPartException as error:
        raise RequestError(
            400,
            f"malformed multipart body ({error.message}); send one file field, e.g. curl -F file=@image.png",
        ) from None
    try:
        files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        if not files:
            raise RequestError(
                400,
                "the multipart body holds no file; send the image as a file field, "
                "e.g. curl -F file=@image.png",
            )
        return await files[0].read()
    finally:
        await form.close()


def _png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _pictures(pixels: torch.Tensor, scored: Scored, model: ServedModel, threshold: float) -> dict[str, str]:
    """The heat-map overlay and binary mask at ``threshold`` (as ``fastflow predict`` draws them at
    the model's), base64 PNG."""
    image = Image.fromarray(np.ascontiguousarray(pixels.permute(1, 2, 0).numpy()))
    mask = Image.fromarray(((scored.amap > threshold) * 255).astype(np.uint8)).resize(
        image.size, Image.Resampling.NEAREST
    )
    return {
        "overlay_png": _png_base64(overlay(image, scored.amap, model.map_floor, threshold)),
        "mask_png": _png_base64(mask),
    }


def _operating_point(model: ServedModel, rate: float | None) -> tuple[float, dict[str, Any]]:
    """(threshold, what the answer says of it) at the model's own threshold, or at the
    calibration's threshold for a requested ``rate``; a bad rate is a 422 naming the parameter."""
    if rate is None:
        return model.threshold, model.calibration.summary()
    try:
        check_false_alarm_rate(rate)
    except FastFlowError as error:
        raise RequestError(422, f"query parameter {error}") from None
    if model.calibration.n == 0:
        raise RequestError(
            422,
            "query parameter false_alarm_rate needs calibration scores and this model holds none; "
            "calibrate it (fastflow calibrate RUN NORMALS) and serve it again",
        )
    return model.calibration.threshold(rate), model.calibration.summary(rate)


def create_app(model: ServedModel, config: ServeConfig) -> FastAPI:
    """The FastAPI application: ``POST /predict``, ``GET /health``, ``GET /model`` and the page at ``/``.

    The batcher thread starts and stops with the application's lifespan.
    """
    batcher = MicroBatcher(model.engine, config.max_batch, config.batch_wait_ms / 1000)
    # Bounds the decoded images held at once (each up to max_pixels x 3 bytes).
    decoding = asyncio.Semaphore(4)
    started = time.time()
    page = (importlib.resources.files("fastflow.apps") / "serve_page.html").read_text(encoding="utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()

    app = FastAPI(title="fastflow", version=importlib.metadata.version("fastflow"), lifespan=lifespan)

    @app.middleware("http")
    async def check_key(request: Request, call_next: Any) -> Any:
        if config.api_key is not None and request.url.path not in ("/", "/health"):
            given = request.headers.get(API_KEY_HEADER, "")
            if not hmac.compare_digest(given.encode(), config.api_key.encode()):
                return _error(401, f"missing or wrong API key; send it in the {API_KEY_HEADER} header")
        return await call_next(request)

    @app.exception_handler(RequestError)
    async def request_error(_: Request, error: RequestError) -> JSONResponse:
        return _error(error.status, error.message)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        return _error(error.status_code, str(error.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())
        return _error(422, f"bad request parameters ({problems}); see GET /docs")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return page

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = batcher.alive()
        body = {
            "status": "ok" if ok else "engine thread stopped",
            "model": model.name,
            "engine_calls": batcher.calls,
            "uptime_s": round(time.time() - started, 1),
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/model")
    async def describe() -> dict[str, Any]:
        return {
            "name": model.name,
            "engine": model.engine_name,
            "precision": model.precision,
            "threshold": model.threshold,
            "map_floor": model.map_floor,
            **model.calibration.summary(),
            **model.info,
            "max_batch": config.max_batch,
            "batch_wait_ms": config.batch_wait_ms,
            "max_body_bytes": config.max_body_bytes,
            "max_pixels": config.max_pixels,
        }

    @app.post("/predict")
    async def predict(
        request: Request, heatmap: bool = False, false_alarm_rate: float | None = None
    ) -> dict[str, Any]:
        """Score one image sent as the body (image/*, application/octet-stream) or as a multipart
        file; ``false_alarm_rate`` labels it at that rate's threshold instead of the model's."""
        begin = time.perf_counter()
        threshold, calibration = _operating_point(model, false_alarm_rate)
        data = await _upload_bytes(request, config.max_body_bytes)
        async with decoding:
            try:
                pixels = await run_in_threadpool(decode_bytes, data, config.max_pixels)
            except DataError as error:
                raise RequestError(400, str(error)) from None
        decoded = time.perf_counter()
        try:
            scored: Scored = await asyncio.wrap_future(batcher.submit(pixels))
        except Exception as error:  # noqa: BLE001 - an engine failure is answered, never raised
            raise RequestError(
                500, f"the engine failed on this image ({first_line(error)[:200]}); please report it"
            ) from None
        anomalous = scored.label if false_alarm_rate is None else scored.score > threshold
        result: dict[str, Any] = {
            "score": scored.score,
            "p_value": p_value_json(model.calibration.p_values([scored.score])[0]),
            "label": "anomalous" if anomalous else "normal",
            "threshold": threshold,
            **calibration,
            "model": model.name,
            "engine": model.engine_name,
            "precision": model.precision,
            "width": int(pixels.shape[2]),
            "height": int(pixels.shape[1]),
            "batch_size": scored.batch_size,
        }
        if heatmap:
            result.update(await run_in_threadpool(_pictures, pixels, scored, model, threshold))
        result["timing_ms"] = {
            "decode": round((decoded - begin) * 1000, 3),
            "queue": round(scored.wait_ms, 3),
            "inference": round(scored.inference_ms, 3),
            "total": round((time.perf_counter() - begin) * 1000, 3),
        }
        return result

    return app
