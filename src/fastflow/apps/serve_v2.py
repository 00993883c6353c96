"""The Open Inference Protocol (KServe v2 REST) routes of ``fastflow serve``: health, server
and model metadata, and ``POST /v2/models/{name}/infer``, so that KServe, Triton clients
(``tritonclient.http``) and other v2 tooling can call a fastflow model without glue code.

An infer request holds one input: ``image_file`` (BYTES, one encoded PNG/JPEG/BMP/TIFF file per
element; base64 strings in JSON ``data``, or length-prefixed in the binary tensor extension) or
``image`` (UINT8 ``[N, 3, H, W]`` RGB pixels). Either way the images go through the model's
batcher like ``POST /predict``'s, so their scores are ``predict``'s. Outputs: ``score`` (FP32),
``label`` (BOOL), ``p_value`` (FP64, where the model holds calibration scores) and, only when
asked for, ``anomaly_map`` (FP32 ``[N, height, width]`` at the model's input size).

The binary tensor data extension is Triton's: the JSON part is the first
``Inference-Header-Content-Length`` bytes of the body and each binary input's
``parameters.binary_data_size`` bytes follow in input order; answers put outputs that asked
for ``binary_data`` (or all, with the request parameter ``binary_data_output``) after the JSON
the same way. Errors are ``{"error": "..."}`` with 400 (bad request), 404 (no such model),
413 (body too large) or 500 (engine failure).
"""

from __future__ import annotations

import base64
import binascii
import importlib.metadata
import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError

from fastflow.apps.serve_metrics import note_scored
from fastflow.apps.serve_models import (
    Hosted,
    ModelPool,
    RequestError,
    Scored,
    ServeConfig,
    ServedModel,
    operating_point,
    read_body,
)
from fastflow.estimator.calibration import p_values
from fastflow.estimator.data import DataError

__all__ = ["FILE_INPUT", "HEADER_LENGTH", "PIXEL_INPUT", "add_v2_routes", "model_metadata"]

FILE_INPUT, PIXEL_INPUT = "image_file", "image"
HEADER_LENGTH = "Inference-Header-Content-Length"
_DEFAULT_OUTPUTS = ("score", "label", "p_value")
_DATATYPES = {"score": "FP32", "label": "BOOL", "p_value": "FP64", "anomaly_map": "FP32"}
_CHOOSE_MODEL = "/v2/models/NAME (GET /v2/models lists them)"


class _Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: Any = None


class _Requested(BaseModel):
    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class _InferRequest(BaseModel):
    id: str | None = None
    inputs: list[_Tensor]
    outputs: list[_Requested] | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)


def _inlined(schema: Any, definitions: dict[str, Any]) -> Any:
    """``schema`` with each ``{"$ref": "#/$defs/X"}`` replaced by ``definitions["X"]`` (the
    request models are not recursive), so it can stand alone inside the OpenAPI document."""
    if isinstance(schema, dict):
        if "$ref" in schema:
            return _inlined(definitions[schema["$ref"].rsplit("/", 1)[-1]], definitions)
        return {key: _inlined(value, definitions) for key, value in schema.items() if key != "$defs"}
    if isinstance(schema, list):
        return [_inlined(item, definitions) for item in schema]
    return schema


def _infer_body() -> dict[str, Any]:
    """The infer route's request body for the OpenAPI document (the route reads the body itself,
    for the binary tensor data extension): the JSON request, or JSON then binary data."""
    schema = _InferRequest.model_json_schema()
    request = _inlined(schema, schema.get("$defs", {}))
    # The protocol allows any number of inputs, names and datatypes; this server takes one of two.
    request["properties"]["inputs"].update(minItems=1, maxItems=1)
    tensor = request["properties"]["inputs"]["items"]["properties"]
    tensor["name"]["enum"] = [FILE_INPUT, PIXEL_INPUT]
    tensor["datatype"]["enum"] = ["BYTES", "UINT8"]
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": request},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    }


@dataclass(frozen=True)
class _Output:
    name: str
    datatype: str
    values: np.ndarray
    binary: bool


def _bad(message: str) -> RequestError:
    return RequestError(400, message)


def _platform(model: ServedModel) -> str:
    return f"fastflow_{model.engine_name}"


def _split_body(body: bytes, header_length: str | None) -> tuple[_InferRequest, bytes]:
    """The JSON part of an infer body as a request, and the binary data after it."""
    if header_length is None:
        header, binary = body, b""
    else:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise _bad(
                f"header {HEADER_LENGTH} must be the byte length of the JSON part of the body "
                f"(at most {len(body)}), got {header_length!r}"
            )
        header, binary = body[: int(header_length)], body[int(header_length) :]
    try:
        return _InferRequest.model_validate_json(header), binary
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise _bad(
            f"bad inference request ({where}: {first['msg']}); send JSON with inputs "
            "[{name, shape, datatype, data}] as the Open Inference Protocol says"
        ) from None


def _binary_parts(request: _InferRequest, binary: bytes) -> list[bytes | None]:
    """Each input's binary data (None where it sent JSON ``data``), cut from ``binary`` in input order."""
    parts: list[bytes | None] = []
    offset = 0
    for tensor in request.inputs:
        if "shared_memory_region" in tensor.parameters:
            raise _bad(f"input {tensor.name}: shared memory is not supported; send the data in the request")
        size = tensor.parameters.get("binary_data_size")
        if size is None:
            parts.append(None)
            continue
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise _bad(
                f"input {tensor.name}: binary_data_size {size!r} overruns the {len(binary)} bytes of "
                f"binary data after the JSON; set {HEADER_LENGTH} and binary_data_size to the real lengths"
            )
        parts.append(binary[offset : offset + size])
        offset += size
    if offset != len(binary):
        raise _bad(
            f"{len(binary) - offset} bytes after the inputs' binary data; set {HEADER_LENGTH} to the "
            "JSON part's length and binary_data_size of each binary input"
        )
    return parts


def _leaves(data: Any) -> Iterator[Any]:
    """The elements of JSON ``data`` in row-major order, flat or nested as the shape."""
    if isinstance(data, list):
        for item in data:
            yield from _leaves(item)
    else:
        yield data


def _count(tensor: _Tensor, max_batch: int) -> int:
    count = math.prod(tensor.shape)
    if any(d < 1 for d in tensor.shape) or count > max_batch:
        raise _bad(
            f"input {tensor.name} shape {tensor.shape} must hold 1 to {max_batch} images "
            "(the server's --max-batch); send more images in more requests"
        )
    return count


def _length_prefixed(raw: bytes, name: str) -> list[bytes]:
    """A binary BYTES tensor: each element as a 4-byte little-endian length and its bytes."""
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise _bad(f"input {name}: truncated BYTES element length at byte {offset}")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise _bad(f"input {name}: BYTES element of {length} bytes runs past the binary data")
        elements.append(raw[offset : offset + length])
        offset += length
    return elements


def _file_bytes(tensor: _Tensor, raw: bytes | None, max_batch: int) -> list[bytes]:
    """The encoded files of an ``image_file`` input."""
    if tensor.datatype != "BYTES":
        raise _bad(f"input {FILE_INPUT} must be BYTES (encoded image files), got {tensor.datatype}")
    count = _count(tensor, max_batch)
    if raw is not None:
        files = _length_prefixed(raw, tensor.name)
    else:
        try:
            files = [base64.b64decode(item, validate=True) for item in _leaves(tensor.data)]
        except (binascii.Error, TypeError, ValueError):
            raise _bad(
                f"input {FILE_INPUT}: JSON data must be base64 strings of the image files "
                "(or send them as binary data)"
            ) from None
    if len(files) != count:
        raise _bad(f"input {FILE_INPUT} shape {tensor.shape} says {count} files, its data holds {len(files)}")
    return files


def _pixels(tensor: _Tensor, raw: bytes | None, config: ServeConfig) -> list[torch.Tensor]:
    """The (3, H, W) uint8 images of an ``image`` input of shape [N, 3, H, W], within the
    server's limits (checked from the shape, before the data is read)."""
    max_batch, max_pixels = config.max_batch, config.max_pixels
    shape = tensor.shape
    if tensor.datatype != "UINT8" or len(shape) != 4 or shape[1] != 3 or min(shape) < 1:
        raise _bad(
            f"input {PIXEL_INPUT} must be UINT8 of shape [N, 3, H, W] (RGB), got {tensor.datatype} {shape}"
        )
    if shape[0] > max_batch or shape[2] * shape[3] > max_pixels:
        raise _bad(
            f"input {PIXEL_INPUT} shape {shape} is over the server's limits of {max_batch} images "
            f"(--max-batch) and {max_pixels} pixels per image (--max-megapixels)"
        )
    try:
        config.limits.check(shape[3], shape[2], f"input {PIXEL_INPUT} of shape {shape}: each image")
    except DataError as error:
        raise _bad(str(error)) from None
    if raw is not None:
        if len(raw) != math.prod(shape):
            raise _bad(f"input {PIXEL_INPUT}: {len(raw)} bytes of binary data for shape {shape}")
        array = np.frombuffer(raw, dtype=np.uint8).reshape(shape)
    else:
        array = _uint8_from_json(tensor)
    return list(torch.from_numpy(array.copy()))


def _uint8_from_json(tensor: _Tensor) -> np.ndarray:
    values = list(_leaves(tensor.data))
    if len(values) != math.prod(tensor.shape) or not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in values
    ):
        raise _bad(
            f"input {PIXEL_INPUT}: JSON data must be {math.prod(tensor.shape)} integers 0..255 "
            f"for shape {tensor.shape}"
        )
    return np.asarray(values, dtype=np.uint8).reshape(tensor.shape)


def _requested(request: _InferRequest, model: ServedModel) -> list[tuple[str, bool]]:
    """(output name, whether as binary data) for each output to answer with."""
    binary = bool(request.parameters.get("binary_data_output", False))
    given = model.calibration.n > 0
    if request.outputs is None:
        return [(name, binary) for name in _DEFAULT_OUTPUTS if name != "p_value" or given]
    known = _output_names(model)
    chosen = []
    for output in request.outputs:
        if output.name not in known:
            raise _bad(
                f"unknown output {output.name!r}; model {model.name} gives {', '.join(known)}"
                + ("" if given else " (no p_value: it holds no calibration scores)")
            )
        if output.parameters.get("classification"):
            raise _bad(f"output {output.name}: the classification extension is not supported")
        chosen.append((output.name, bool(output.parameters.get("binary_data", binary))))
    return chosen


def _output_names(model: ServedModel) -> list[str]:
    names = ["score", "label", "p_value", "anomaly_map"]
    return names if model.calibration.n > 0 else [n for n in names if n != "p_value"]


def _values(
    name: str, scored: list[Scored], model: ServedModel, threshold: float, relabel: bool
) -> np.ndarray:
    scores = np.array([s.score for s in scored], dtype=np.float32)
    if name == "score":
        return scores
    if name == "label":
        labels = [s.score > threshold if relabel else s.label for s in scored]
        return np.array(labels, dtype=bool)
    if name == "p_value":
        return p_values(model.calibration.scores, [s.score for s in scored])
    return np.stack([s.amap for s in scored]).astype(np.float32)


def _answer(request: _InferRequest, model: ServedModel, outputs: list[_Output]) -> Response:
    """The infer response: JSON only, or JSON then the binary outputs' bytes."""
    described, blobs = [], []
    for output in outputs:
        entry: dict[str, Any] = {
            "name": output.name,
            "datatype": output.datatype,
            "shape": list(output.values.shape),
        }
        if output.binary:
            blob = np.ascontiguousarray(output.values, output.values.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = output.values.ravel().tolist()
        described.append(entry)
    body: dict[str, Any] = {"model_name": model.name, "outputs": described}
    if request.id is not None:
        body["id"] = request.id
    if not blobs:
        return JSONResponse(body)
    header = json.dumps(body).encode()
    return Response(
        header + b"".join(blobs),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(header))},
    )


def model_metadata(model: ServedModel, max_batch: int) -> dict[str, Any]:
    """``GET /v2/models/{name}``: inputs and outputs with datatype and shape (-1: any), and what
    labels and p-values rest on as parameters."""
    size = model.input_size or [-1, -1]
    shapes = {"score": [-1], "label": [-1], "p_value": [-1], "anomaly_map": [-1, *size]}
    return {
        "name": model.name,
        "platform": _platform(model),
        "inputs": [
            {"name": FILE_INPUT, "datatype": "BYTES", "shape": [-1]},
            {"name": PIXEL_INPUT, "datatype": "UINT8", "shape": [-1, 3, -1, -1]},
        ],
        "outputs": [
            {"name": name, "datatype": _DATATYPES[name], "shape": shapes[name]}
            for name in _output_names(model)
        ],
        "parameters": {
            "input_size": model.input_size,
            "threshold": model.threshold,
            **model.calibration.summary(),
            "engine": model.engine_name,
            "precision": model.precision,
            "max_batch": max_batch,
        },
    }


async def _images(pool: ModelPool, request: _InferRequest, binary: bytes) -> list[torch.Tensor]:
    """The one input's images as (3, H, W) uint8 pixels."""
    parts = _binary_parts(request, binary)
    if len(request.inputs) != 1 or request.inputs[0].name not in (FILE_INPUT, PIXEL_INPUT):
        raise _bad(
            f"send exactly one input: {FILE_INPUT} (BYTES, encoded image files) or "
            f"{PIXEL_INPUT} (UINT8 [N, 3, H, W]); got {[t.name for t in request.inputs]}"
        )
    tensor, raw = request.inputs[0], parts[0]
    config = pool.config
    if tensor.name == PIXEL_INPUT:
        return _pixels(tensor, raw, config)
    images = []
    for index, data in enumerate(_file_bytes(tensor, raw, config.max_batch)):
        try:
            images.append(await pool.decode(data))
        except RequestError as error:
            raise _bad(f"input {FILE_INPUT} element {index}: {error.message}") from None
    return images


def _rate(request: _InferRequest) -> float | None:
    rate = request.parameters.get("false_alarm_rate")
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float))):
        raise _bad(f"parameter false_alarm_rate must be a number in (0, 1), got {rate!r}")
    return rate


def add_v2_routes(app: FastAPI, pool: ModelPool) -> None:
    """Add the Open Inference Protocol routes over ``pool``'s models to ``app`` (as its own
    routes, not an included router, so that each has its full path as its template)."""
    tags: list[str | Enum] = ["Open Inference Protocol (KServe v2)"]

    def hosted(name: str) -> Hosted:
        return pool.get(name, _CHOOSE_MODEL)

    @app.get("/v2", tags=tags)
    async def server_metadata() -> dict[str, Any]:
        return {
            "name": "fastflow",
            "version": importlib.metadata.version("fastflow"),
            "extensions": ["binary_tensor_data"],
        }

    @app.get("/v2/health/live", tags=tags)
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready", tags=tags)
    async def ready() -> JSONResponse:
        ok = pool.ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 400)

    @app.get("/v2/models", tags=tags)
    async def models() -> dict[str, Any]:
        """Every served model, the default (of routes that name none) first."""
        return {
            "models": [
                {
                    "name": h.model.name,
                    "platform": _platform(h.model),
                    "ready": h.batcher.alive(),
                }
                for h in pool.hosted.values()
            ]
        }

    @app.get("/v2/models/{name}", tags=tags)
    async def metadata(name: str) -> dict[str, Any]:
        return model_metadata(hosted(name).model, pool.config.max_batch)

    @app.get("/v2/models/{name}/ready", tags=tags)
    async def model_ready(name: str) -> JSONResponse:
        ok = hosted(name).batcher.alive()
        return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else 400)

    @app.post("/v2/models/{name}/infer", tags=tags, openapi_extra=_infer_body())
    async def infer(name: str, request: Request) -> Response:
        """Score the images of one input; see the module's docstring for inputs and outputs."""
        target = hosted(name)
        model = target.model
        body = await read_body(request, pool.config.max_body_bytes)
        parsed, binary = _split_body(body, request.headers.get(HEADER_LENGTH))
        outputs = _requested(parsed, model)
        rate = _rate(parsed)
        threshold, _ = operating_point(model, rate, "parameter", status=400)
        images = await _images(pool, parsed, binary)
        scored = await target.score(images)
        note_scored(request.scope, model.name, [s.batch_size for s in scored])
        return _answer(
            parsed,
            model,
            [
                _Output(
                    name, _DATATYPES[name], _values(name, scored, model, threshold, rate is not None), binary
                )
                for name, binary in outputs
            ],
        )
