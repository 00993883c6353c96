"""The fuzz test of ``fastflow serve``: schemathesis generates requests from the server's own
OpenAPI schema (``/openapi.json``, which declares the bodies ``/predict`` and the v2 infer route
read themselves), both ones that fit it and ones that break it (wrong types, missing fields,
bodies of the wrong media type, odd bytes), and sends them to the ASGI application in process,
no network. Whatever a client sends, the server must answer with a 2xx or with a 4xx
``{"error": "..."}`` of one line, never a 5xx.

Bounded (``MAX_EXAMPLES`` per route and mode: about 30 s at one thread on a busy 2-core
machine); marked ``fuzz`` so that
it can be run alone (``pytest -m fuzz``) or left out (``-m "not fuzz"``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from support import calibrated_run, serve_images

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from fastflow.apps.serve import ServeConfig, create_app, load_served
from fastflow.estimator.data import ShapeLimits

pytestmark = [pytest.mark.fuzz, pytest.mark.usefixtures("one_thread")]

MAX_EXAMPLES = 100


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[schemathesis.BaseSchema]:
    """The schema of a server of two models (``run``, calibrated, and ``other``) with a 1 MiB
    body limit and no shape limits worth the name, so that the tiny images schemathesis sends
    as ``image/png`` and ``image/jpeg`` bodies go all the way to the engine and the pictures.
    schemathesis starts the application's lifespan (the batcher threads) on the first request
    of a test, and its pytest plugin ends it after each test."""
    folder = tmp_path_factory.mktemp("fuzz")
    run = calibrated_run(serve_images(folder / "data"), folder / "run")
    models = [load_served(run, "torch"), load_served(run, "torch", name="other")]
    limits = ShapeLimits(min_side=1, max_aspect=10_000)
    app = create_app(models, ServeConfig(max_body_bytes=2**20, batch_wait_ms=0, limits=limits))
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    schemathesis.python.asgi.shutdown_lifespans()


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_request_gets_a_5xx(api_schema: schemathesis.BaseSchema, mode: str) -> None:
    """Every route, ``MAX_EXAMPLES`` requests each: never a 5xx, and a 4xx is a one-line JSON
    error. Half of the requests that name a model (``/v2/models/{name}/...``, ``?model=``) name
    a served one, so that they reach the checks of the body instead of stopping at the 404."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 10  # every route of the JSON API and the v2 protocol, /docs' own aside
    fuzzed = set()
    for operation in operations:

        @settings(
            max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        @given(case=operation.as_strategy(schemathesis.GenerationMode(mode)), served_model=st.booleans())
        def fuzz(case: schemathesis.Case, served_model: bool) -> None:
            if served_model and case.path_parameters and "name" in case.path_parameters:
                case.path_parameters["name"] = "run"
            if served_model and isinstance(case.query, dict) and "model" in case.query:
                case.query["model"] = "other"
            response = case.call()
            where = (case.as_curl_command(), response.status_code, response.text[:300])
            assert response.status_code < 500, where
            if response.status_code >= 400:
                error = json.loads(response.content)["error"]
                assert isinstance(error, str) and error and "\n" not in error, where

        try:
            fuzz()
        except Unsatisfiable:  # no request breaks a schema that accepts anything (GET /health)
            assert mode == "negative", operation.label
            continue
        fuzzed.add(operation.label)
    assert {"POST /predict", "POST /v2/models/{name}/infer", "GET /model"} <= fuzzed


def test_the_schema_declares_the_bodies_the_routes_read(api_schema: schemathesis.BaseSchema) -> None:
    """Without these declarations the fuzzer would send ``/predict`` and the infer route no
    body at all, and test nothing but their 415 and 400."""
    document = api_schema.raw_schema
    predict = document["paths"]["/predict"]["post"]["requestBody"]["content"]
    infer = document["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]
    assert {"image/png", "image/jpeg", "application/octet-stream", "multipart/form-data"} <= set(predict)
    request = infer["application/json"]["schema"]
    assert request["required"] == ["inputs"] and request["properties"]["inputs"]["maxItems"] == 1
    assert "$ref" not in json.dumps(infer)
