"""``fastflow serve``: trained detectors behind HTTP (FastAPI + uvicorn), with a small web page.

Each model is loaded at startup and its engine owned by one worker thread (``MicroBatcher``):
requests that arrive within ``batch_wait_ms`` of each other share one engine call, grouped by
image size because the inference graph takes one (N, 3, H, W) size per call. Uploads are
decoded by ``fastflow.estimator.data.decode_bytes`` (the same pixels as ``fastflow predict``
reads from a file), so a served score equals ``predict``'s for the same engine. Each answer
carries the score's p-value against the model's calibration scores; ``?false_alarm_rate=``
labels one request at the threshold of another rate, from the same scores, without reloading
anything. Every bad request gets a 4xx JSON ``{"error": "..."}`` that names the problem and the
fix; nothing a client sends stops the service.

Routes: this module's JSON API (``POST /predict``, ``GET /model``, ``GET /health``) and page,
the Open Inference Protocol (``serve_v2``) and Prometheus ``GET /metrics`` (``serve_metrics``).
With several models, ``?model=NAME`` picks one on the JSON API; without it the first is used.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import importlib.metadata
import importlib.resources
import io
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from fastflow.apps.serve_metrics import AccessLog, ServerMetrics, note_scored
from fastflow.apps.serve_models import (
    MicroBatcher,
    ModelPool,
    RequestError,
    Scored,
    ServeConfig,
    ServedModel,
    load_served,
    operating_point,
    read_body,
)
from fastflow.apps.serve_v2 import add_v2_routes
from fastflow.apps.viz import heat_scale_hex, mask_outline, overlay
from fastflow.estimator.calibration import p_value_json

__all__ = ["API_KEY_HEADER", "MicroBatcher", "ServeConfig", "ServedModel", "create_app", "load_served"]

API_KEY_HEADER = "X-API-Key"
_RAW_TYPES = ("image/", "application/octet-stream")
# Open without the key: the page (it asks for the key itself) and the liveness/readiness probes.
_OPEN_PATHS = ("/", "/health", "/v2/health/live", "/v2/health/ready")
_CHOOSE_MODEL = "?model=NAME (GET /model lists them)"
_BINARY = {"schema": {"type": "string", "format": "binary"}}
# /predict reads its body itself (raw or multipart); this tells /docs and schema-driven clients
# (and the fuzz test) what it takes.
_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "image/png": _BINARY,
            "image/jpeg": _BINARY,
            "application/octet-stream": _BINARY,
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
        },
    }
}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


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
    body = await read_body(request, limit)
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


def _pictures(pixels: torch.Tensor, scored: Scored, model: ServedModel, threshold: float) -> dict[str, Any]:
    """What ``?heatmap=1`` adds: the heat-map overlay and binary mask at ``threshold`` (as
    ``fastflow predict`` draws them at the model's) and the mask's outline (transparent, to lay
    over the overlay), base64 PNG; the overlay's colour scale (``colors`` evenly from ``low``,
    the model's map floor, to ``high``, the threshold; values beyond either end take its
    colour) and this image's map range, so a page can draw a legend."""
    image = Image.fromarray(np.ascontiguousarray(pixels.permute(1, 2, 0).numpy()))
    above = scored.amap > threshold
    mask = Image.fromarray((above * 255).astype(np.uint8)).resize(image.size, Image.Resampling.NEAREST)
    return {
        "overlay_png": _png_base64(overlay(image, scored.amap, model.map_floor, threshold)),
        "mask_png": _png_base64(mask),
        "outline_png": _png_base64(mask_outline(above, image.size)),
        "heat_scale": {"low": model.map_floor, "high": threshold, "colors": heat_scale_hex()},
        "map_range": [float(scored.amap.min()), float(scored.amap.max())],
    }


def _describe(model: ServedModel, config: ServeConfig) -> dict[str, Any]:
    """What ``GET /model`` says of one model."""
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
        "min_side": config.limits.min_side,
        "max_aspect": config.limits.max_aspect,
    }


def create_app(models: ServedModel | Sequence[ServedModel], config: ServeConfig) -> FastAPI:
    """The FastAPI application over one model or several (distinct names; the first is the
    default of routes that name none): ``POST /predict``, ``GET /health``, ``GET /model``, the
    page at ``/``, the Open Inference Protocol under ``/v2`` and ``GET /metrics``.

    The batcher threads start and stop with the application's lifespan.
    """
    metrics = ServerMetrics(config.max_batch)
    served = [models] if isinstance(models, ServedModel) else list(models)
    pool = ModelPool(served, config, metrics.engine_call_hook)
    for hosted in pool.hosted.values():
        metrics.watch_model(hosted.model.name, hosted.model.load_seconds, hosted.batcher.waiting)
    started = time.time()
    page = (importlib.resources.files("fastflow.apps") / "serve_page.html").read_text(encoding="utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        pool.start()
        try:
            yield
        finally:
            pool.stop()

    app = FastAPI(title="fastflow", version=importlib.metadata.version("fastflow"), lifespan=lifespan)

    @app.middleware("http")
    async def check_key(request: Request, call_next: Any) -> Any:
        if config.api_key is not None and request.url.path not in _OPEN_PATHS:
            given = request.headers.get(API_KEY_HEADER, "")
            if not hmac.compare_digest(given.encode(), config.api_key.encode()):
                return _error(401, f"missing or wrong API key; send it in the {API_KEY_HEADER} header")
        return await call_next(request)

    app.add_middleware(AccessLog, metrics=metrics)  # added last: outermost, so it sees the 401s too

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

    add_v2_routes(app, pool)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return page

    @app.get("/metrics", include_in_schema=False)
    async def prometheus(request: Request) -> Response:
        body, content_type = metrics.exposition(request.headers.get("accept", ""))
        return Response(body, media_type=content_type)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = pool.ready()
        body = {
            "status": "ok" if ok else "engine thread stopped",
            "model": pool.default,
            "models": pool.names,
            "engine_calls": sum(h.batcher.calls for h in pool.hosted.values()),
            "uptime_s": round(time.time() - started, 1),
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/model")
    async def describe(model: str | None = None) -> dict[str, Any]:
        """One model's description (``?model=NAME``, default the first), and ``models``: every served name."""
        return {**_describe(pool.get(model, _CHOOSE_MODEL).model, config), "models": pool.names}

    @app.post("/predict", openapi_extra=_PREDICT_BODY)
    async def predict(
        request: Request,
        heatmap: bool = False,
        false_alarm_rate: float | None = None,
        model: str | None = None,
    ) -> dict[str, Any]:
        """Score one image sent as the body (image/*, application/octet-stream) or as a multipart
        file with the model ``model`` (default: the first); ``false_alarm_rate`` labels it at
        that rate's threshold instead of the model's."""
        begin = time.perf_counter()
        hosted = pool.get(model, _CHOOSE_MODEL)
        served = hosted.model
        threshold, calibration = operating_point(served, false_alarm_rate, "query parameter")
        pixels = await pool.decode(await _upload_bytes(request, config.max_body_bytes))
        decoded = time.perf_counter()
        (scored,) = await hosted.score([pixels])
        note_scored(request.scope, served.name, [scored.batch_size])
        anomalous = scored.label if false_alarm_rate is None else scored.score > threshold
        result: dict[str, Any] = {
            "score": scored.score,
            "p_value": p_value_json(served.calibration.p_values([scored.score])[0]),
            "label": "anomalous" if anomalous else "normal",
            "threshold": threshold,
            **calibration,
            "model": served.name,
            "engine": served.engine_name,
            "precision": served.precision,
            "width": int(pixels.shape[2]),
            "height": int(pixels.shape[1]),
            "batch_size": scored.batch_size,
        }
        if heatmap:
            result.update(await run_in_threadpool(_pictures, pixels, scored, served, threshold))
        result["timing_ms"] = {
            "decode": round((decoded - begin) * 1000, 3),
            "queue": round(scored.wait_ms, 3),
            "inference": round(scored.inference_ms, 3),
            "total": round((time.perf_counter() - begin) * 1000, 3),
        }
        return result

    return app
