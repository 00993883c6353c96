"""What a ``fastflow serve`` process tells its operator: Prometheus metrics (``GET /metrics``,
prometheus-client) and one access-log line per request.

Requests are counted by route template (``/v2/models/{name}/infer``), not by path, so a client
cannot grow the number of series with made-up paths, and the log line quotes nothing a client
sent: no image data, no query string, no path text.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["ACCESS_LOGGER", "AccessLog", "ServerMetrics", "note_scored"]

ACCESS_LOGGER = "fastflow.serve.access"
_log = logging.getLogger(ACCESS_LOGGER)
# The scope key a route fills with what its request scored, for the access log.
_NOTE = "fastflow.scored"
# Methods counted by name; any other token a client sends counts as OTHER (bounded series).
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _batch_buckets(max_batch: int) -> list[float]:
    """Powers of two up to ``max_batch`` and ``max_batch`` itself: a full batch has its own bucket."""
    edges = {2**i for i in range(max_batch.bit_length()) if 2**i <= max_batch} | {max_batch}
    return [float(edge) for edge in sorted(edges)]


class ServerMetrics:
    """The server's Prometheus metrics, in a registry of its own (two apps in one process, as in
    tests, count apart)."""

    def __init__(self, max_batch: int) -> None:
        self.registry = CollectorRegistry()
        kw: dict[str, Any] = {"registry": self.registry}
        self.requests = Counter(
            "fastflow_http_requests", "HTTP requests answered", ["method", "route", "status"], **kw
        )
        self.latency = Histogram(
            "fastflow_http_request_duration_seconds",
            "Time from a request's arrival to its answer",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS,
            **kw,
        )
        self.batch_size = Histogram(
            "fastflow_batch_size",
            "Images per engine call",
            ["model"],
            buckets=_batch_buckets(max_batch),
            **kw,
        )
        self.inference = Histogram(
            "fastflow_inference_duration_seconds", "Time of one engine call", ["model"], **kw
        )
        self.images = Counter("fastflow_images_scored", "Images the engine scored", ["model"], **kw)
        self.queue_depth = Gauge("fastflow_queue_depth", "Images waiting for an engine call", ["model"], **kw)
        self.load_seconds = Gauge(
            "fastflow_model_load_seconds", "Time it took to load the model at startup", ["model"], **kw
        )

    def watch_model(self, name: str, load_seconds: float, waiting: Callable[[], int]) -> None:
        """Publish a model's load time, and its queue depth as ``waiting()`` says at each scrape."""
        self.load_seconds.labels(name).set(load_seconds)
        self.queue_depth.labels(name).set_function(waiting)

    def engine_call_hook(self, name: str) -> Callable[[int, float], None]:
        """What a model's batcher calls after each engine call: (images in it, its seconds)."""
        batch, inference, images = (
            self.batch_size.labels(name),
            self.inference.labels(name),
            self.images.labels(name),
        )

        def observe(size: int, seconds: float) -> None:
            batch.observe(size)
            inference.observe(seconds)
            images.inc(size)

        return observe

    def exposition(self, accept: str) -> tuple[bytes, str]:
        """The metrics in the format ``accept`` asks for (Prometheus text or OpenMetrics), and its content type."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


def note_scored(scope: MutableMapping[str, Any], model: str, batch_sizes: list[int]) -> None:
    """Record, for the access log, which model a request used and the engine batches its images were in."""
    scope[_NOTE] = (model, len(batch_sizes), max(batch_sizes, default=0))


def _route(scope: Scope) -> str:
    """The template of the route ``scope`` goes to (as the router chooses), else ``unmatched``."""
    partial = None
    for route in scope["app"].router.routes:
        path = getattr(route, "path", None)
        if path is None:  # not a route of the application itself (an included router)
            continue
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return str(path)
        if match is Match.PARTIAL and partial is None:
            partial = str(path)
    return partial or "unmatched"


class AccessLog:
    """ASGI middleware, outermost: counts and times every HTTP request by route and status and
    logs one line for it, ``METHOD ROUTE STATUS MSms model=NAME images=N batch=B``."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        begin, status, route = time.perf_counter(), 500, _route(scope)

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            seconds = time.perf_counter() - begin
            method = scope["method"] if scope["method"] in _METHODS else "OTHER"
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(seconds)
            model, images, batch = scope.get(_NOTE, ("-", 0, 0))
            _log.info(
                "%s %s %d %.1fms model=%s images=%d batch=%s",
                method,
                route,
                status,
                seconds * 1000,
                model,
                images,
                batch or "-",
            )
