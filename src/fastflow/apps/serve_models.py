"""The models a ``fastflow serve`` process hosts: loading them, the one engine thread of each
(``MicroBatcher``), the server's limits (``ServeConfig``) and what every route shares: reading a
body within the limit, decoding an upload, the operating point of a request, a client error.

Kept apart from the routes (``serve`` for the JSON API and page, ``serve_v2`` for the Open
Inference Protocol) so that both sets of routes score through the same batcher and decoder, and
a score is the same whichever route asked for it.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import queue
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import Request
from starlette.concurrency import run_in_threadpool

from fastflow.core.errors import FastFlowError, first_line, is_integer, is_real, require
from fastflow.estimator.calibration import Calibration, check_false_alarm_rate
from fastflow.estimator.data import PIL_PIXEL_CEILING, DataError, ShapeLimits, decode_bytes
from fastflow.estimator.engines import (
    Engine,
    check_precision,
    choose_engine,
    default_precision,
    load_exported,
    read_metadata,
)

__all__ = [
    "MicroBatcher",
    "ModelPool",
    "RequestError",
    "Scored",
    "ServeConfig",
    "ServedModel",
    "load_served",
    "model_arguments",
]

# A server scores an open-ended stream of images: choose the engine as ``predict`` would for many.
_MANY_IMAGES = 1 << 30
# What a NAME of NAME=RUN may hold: it becomes a URL path segment (/v2/models/NAME) and a log field.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class ServeConfig:
    """Limits and batching of a server; checked on creation so the CLI fails before loading a model.

    Args:
        max_batch: most images per engine call, and per Open Inference Protocol request.
        batch_wait_ms: how long the first queued image waits for others to share its call.
        max_body_bytes: largest request body; a bigger one is refused (413) while it is read.
        max_pixels: largest width x height of an upload, checked from its header (decompression
            bombs); at most PIL's own ceiling, so that every refusal names this limit.
        api_key: when set, every endpoint but ``/``, ``/health`` and the v2 health probes needs it
            in ``X-API-Key``; at least 8 characters.
        limits: the smallest side and the most elongated shape of an image worth scoring
            (``--min-side``, ``--max-aspect``), as ``fastflow predict`` checks them.
    """

    max_batch: int = 16
    batch_wait_ms: float = 5.0
    max_body_bytes: int = 50 * 2**20
    max_pixels: int = 40_000_000
    api_key: str | None = None
    limits: ShapeLimits = field(default_factory=ShapeLimits)

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
            is_integer(self.max_pixels) and 1 <= self.max_pixels <= PIL_PIXEL_CEILING,
            "max_pixels (--max-megapixels)",
            f"between 1 pixel and {PIL_PIXEL_CEILING // 100_000 / 10:g} megapixels (PIL's "
            "decompression-bomb ceiling)",
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
    calibration for p-values and other rates, the description ``GET /model`` returns, and how
    long it took to load (a metric: a slow start shows which model caused it)."""

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
    load_seconds: float = 0.0

    @property
    def input_size(self) -> list[int] | None:
        """(height, width) the model resizes every image to, where its config says; the anomaly map's size."""
        size = (self.info.get("config") or {}).get("input_size")
        return [int(s) for s in size] if size else None


def _model_name(path: Path) -> str:
    """The name a bare RUN is served under: its run folder's name."""
    return (path if path.is_dir() else path.parent).resolve().name


def load_served(
    path: str | Path, engine: str | None = None, precision: str | None = None, name: str | None = None
) -> ServedModel:
    """Load a RUN folder / ``model.safetensors`` (engine as ``predict`` chooses for many images,
    unless ``engine`` is given; its default precision unless ``precision``) or a folder written by
    ``fastflow export`` (its own engine; the precision recorded at export unless ``precision``),
    served as ``name`` (default: the run folder's name)."""
    begin = time.perf_counter()
    if precision is not None:
        check_precision(precision)
    path = Path(path)
    if not path.exists():
        raise FastFlowError(
            f"{path} does not exist; pass a run folder, a model.safetensors or a 'fastflow export' folder"
        )
    exported = (
        path.is_dir()
        and not (path / "model.safetensors").exists()
        and any((path / f).is_file() for f in ("model.onnx", "model.xml"))
    )
    load = _load_export if exported or path.suffix in (".onnx", ".xml") else _load_run
    served = load(path, engine, precision, name or _model_name(path))
    served.load_seconds = time.perf_counter() - begin
    return served


def _load_export(path: Path, engine: str | None, precision: str | None, name: str) -> ServedModel:
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
        "fastflow_version": importlib.metadata.version("fastflow"),
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


def _load_run(path: Path, engine: str | None, precision: str | None, name: str) -> ServedModel:
    from fastflow.estimator.detector import FastFlow  # torch model code: only once the options are checked

    detector = FastFlow.load(path)
    chosen, default = (engine, default_precision(engine)) if engine else choose_engine(_MANY_IMAGES, 0)
    precision = precision or default
    info = {
        "config": detector.config.to_dict(),
        "recipe": detector.recipe_.to_dict(),
        "fastflow_version": importlib.metadata.version("fastflow"),
        "best_epoch": detector.best_epoch_,
    }
    return ServedModel(
        name,
        detector.engine(chosen, precision),
        chosen,
        precision,
        float(detector.threshold_),
        float(detector.map_floor_),
        info,
        detector.calibration_,
    )


def model_arguments(arguments: Sequence[str]) -> list[tuple[str, Path]]:
    """``fastflow serve``'s RUN and NAME=RUN arguments -> (name, path) pairs, checked before any
    model loads: a bare RUN is named after its run folder (as with one model), an argument that
    is an existing path is a RUN even with a ``=`` in it, every RUN must exist and no name may
    be given twice."""
    if not arguments:
        raise FastFlowError("no model to serve; pass a RUN folder, or NAME=RUN for each of several models")
    pairs: list[tuple[str, Path]] = []
    for argument in arguments:
        name, sep, run = argument.partition("=")
        if not sep or Path(argument).exists():
            path = Path(argument)
            name = _model_name(path) if path.exists() else path.name
        else:
            require(
                bool(_NAME.fullmatch(name)) and bool(run),
                f"model argument {argument!r}",
                "RUN or NAME=RUN with NAME of letters, digits, '.', '_' or '-' (at most 64) and a RUN",
                argument,
            )
            path = Path(run)
        if not path.exists():
            raise FastFlowError(
                f"{path} does not exist; pass a run folder, a model.safetensors or a 'fastflow export' folder"
            )
        pairs.append((name, path))
    _check_unique([name for name, _ in pairs], "fastflow serve a=RUN1 b=RUN2")
    return pairs


def _check_unique(names: Sequence[str], fix: str) -> None:
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise FastFlowError(f"model name {twice[0]!r} is given twice; give each model its own name: {fix}")


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


# Called after each engine call that succeeded: (images in it, its seconds).
EngineCallHook = Callable[[int, float], None]


class MicroBatcher:
    """The one thread that runs the engine: it takes the first queued image, waits up to
    ``wait_s`` from its arrival for more (at most ``max_batch``), and runs one engine call per
    image size. Under load the queue fills while the engine runs, so batches form without waiting.
    A job whose future was cancelled (its request was abandoned) is dropped, not scored.
    """

    def __init__(
        self, engine: Engine, max_batch: int, wait_s: float, on_call: EngineCallHook | None = None
    ) -> None:
        self.engine, self.max_batch, self.wait_s, self.on_call = engine, max_batch, wait_s, on_call
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="fastflow-batcher", daemon=True)
        self._lock = threading.Lock()
        self._waiting = 0
        self.calls = 0

    def start(self) -> None:
        """Start the engine thread; after ``stop`` a new one, so that an application's lifespan
        can run again (a test client entered twice, a test harness that restarts it)."""
        if self._thread.ident is not None:
            self._thread = threading.Thread(target=self._run, name="fastflow-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def waiting(self) -> int:
        """Images submitted and not yet in an engine call: the queue depth."""
        return self._waiting

    def submit(self, pixels: torch.Tensor) -> Future:
        """Queue one (3, H, W) uint8 image; the future resolves to its ``Scored``."""
        job = _Job(pixels, time.perf_counter())
        with self._lock:
            self._waiting += 1
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
            with self._lock:
                self._waiting -= len(jobs)
            by_size: dict[tuple[int, ...], list[_Job]] = {}
            for job in jobs:
                if job.future.set_running_or_notify_cancel():
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
        elapsed = time.perf_counter() - start
        if self.on_call is not None:
            self.on_call(len(group), elapsed)
        for i, job in enumerate(group):
            waited = (start - job.queued) * 1000
            job.future.set_result(
                Scored(amap[i], float(score[i]), int(label[i]), len(group), waited, elapsed * 1000)
            )


class RequestError(Exception):
    """A client problem: answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


async def read_body(request: Request, limit: int) -> bytes:
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


def operating_point(
    model: ServedModel, rate: float | None, kind: str, status: int = 422
) -> tuple[float, dict[str, Any]]:
    """(threshold, what the answer says of it) at the model's own threshold, or at the
    calibration's threshold for a requested ``rate``; a bad rate is a ``status`` error naming
    the ``kind`` of parameter it came as (``query parameter``)."""
    if rate is None:
        return model.threshold, model.calibration.summary()
    try:
        check_false_alarm_rate(rate, "false_alarm_rate")
    except FastFlowError as error:
        raise RequestError(status, f"{kind} {error}") from None
    if model.calibration.n == 0:
        raise RequestError(
            status,
            f"{kind} false_alarm_rate needs calibration scores and this model holds none; "
            "calibrate it (fastflow calibrate RUN NORMALS) and serve it again",
        )
    return model.calibration.threshold(rate), model.calibration.summary(rate)


@dataclass
class Hosted:
    """A served model with the batcher thread that owns its engine."""

    model: ServedModel
    batcher: MicroBatcher

    async def score(self, images: Sequence[torch.Tensor]) -> list[Scored]:
        """Score (3, H, W) uint8 images, all queued at once so that they can share engine calls;
        an engine failure is a 500 naming it."""
        futures = [self.batcher.submit(pixels) for pixels in images]
        try:
            return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
        except Exception as error:  # noqa: BLE001 - an engine failure is answered, never raised
            raise RequestError(
                500, f"the engine failed on this image ({first_line(error)[:200]}); please report it"
            ) from None


class ModelPool:
    """The models of one server by name (the first is the default of routes that name none),
    their batcher threads, and the decoder every route shares (at most 4 images decoded at once,
    each up to ``max_pixels`` x 3 bytes)."""

    def __init__(
        self,
        models: Sequence[ServedModel],
        config: ServeConfig,
        on_call: Callable[[str], EngineCallHook] | None = None,
    ) -> None:
        if not models:
            raise FastFlowError("a server needs at least one model")
        _check_unique([m.name for m in models], "load_served(RUN, name=...)")
        self.config = config
        self.hosted = {
            m.name: Hosted(
                m,
                MicroBatcher(
                    m.engine,
                    config.max_batch,
                    config.batch_wait_ms / 1000,
                    on_call(m.name) if on_call else None,
                ),
            )
            for m in models
        }
        self.default = models[0].name
        self._decoding = asyncio.Semaphore(4)

    @property
    def names(self) -> list[str]:
        return list(self.hosted)

    def get(self, name: str | None, how: str) -> Hosted:
        """The model called ``name`` (the default for None); an unknown name is a 404 that lists
        the served ones and says ``how`` to choose."""
        hosted = self.hosted.get(self.default if name is None else name)
        if hosted is None:
            raise RequestError(
                404,
                f"no model named {name!r}; this server has {', '.join(self.hosted)}: choose one with {how}",
            )
        return hosted

    def start(self) -> None:
        for hosted in self.hosted.values():
            hosted.batcher.start()

    def stop(self) -> None:
        for hosted in self.hosted.values():
            hosted.batcher.stop()

    def ready(self) -> bool:
        return all(hosted.batcher.alive() for hosted in self.hosted.values())

    async def decode(self, data: bytes) -> torch.Tensor:
        """An uploaded file's (3, H, W) uint8 pixels, decoded as ``predict`` decodes files; a
        file that does not decode, or whose size is over the pixel limit or outside the shape
        limits, is a 400 with ``DataError``'s line."""
        async with self._decoding:
            try:
                return await run_in_threadpool(decode_bytes, data, self.config.max_pixels, self.config.limits)
            except DataError as error:
                raise RequestError(400, str(error)) from None
