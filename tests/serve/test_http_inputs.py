"""The gateway's request models and validation-error handler, without Ray: every input the
issue listed is a 422 whose body is strict JSON (no bare NaN / Infinity), and the int64
bounds are in the OpenAPI schema."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI, Query
from fastapi.exceptions import RequestValidationError
from fastapi.testclient import TestClient

from ray_unlearn.serve.gateway import (
    INT64_MAX,
    INT64_MIN,
    ForgetRequest,
    PredictRequest,
    SampleId,
    _invalid_request,
    _json_safe,
)


@pytest.fixture(scope="module")
def client():
    # the gateway's models and handler on a bare app (the real routes need a Serve replica)
    app = FastAPI()
    app.add_exception_handler(RequestValidationError, _invalid_request)

    @app.post("/forget")
    def forget(body: ForgetRequest) -> dict:
        return {"ok": True}

    @app.post("/predict")
    def predict(body: PredictRequest) -> dict:
        return {"n": len(body.instances)}

    @app.get("/audit")
    def audit(sample_id: SampleId | None = Query(None)) -> dict:
        return {"sample_id": sample_id}

    return TestClient(app)


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"non-JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize(
    "path, body",
    [
        ("/forget", b'{"sample_ids": [' + str(2**70).encode() + b"]}"),
        ("/forget", b'{"sample_ids": [' + str(-(2**63) - 1).encode() + b"]}"),
        ("/forget", b'{"sample_ids": [NaN]}'),
        ("/forget", b'{"sample_ids": [Infinity]}'),
        ("/forget", b'{"sample_ids": [1e400]}'),
        ("/forget", b'{"owner_id": "x", "deadline_s": NaN}'),
        ("/forget", b'{"owner_id": "x", "deadline_s": -Infinity}'),
        ("/forget", b'{"owner_id": "x", "request_id": "../x"}'),
        ("/forget", b'{"owner_id": ""}'),
        ("/forget", b'{"sample_ids": []}'),
        ("/predict", b'{"instances": [NaN]}'),
        ("/predict", b'{"instances": NaN}'),
        ("/predict", b'{"instances": [[1, "a"]]}'),
        ("/predict", b'{"instances": [[Infinity]], "x": NaN}'),
    ],
)
def test_bad_bodies_are_422_with_strict_json(client, path, body):
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert _strict(r.text)["detail"]


@pytest.mark.parametrize("q", ["1" * 23, str(2**63), str(-(2**63) - 1), "nan", "inf", "1e3"])
def test_audit_ids_outside_int64_are_422(client, q):
    r = client.get("/audit", params={"sample_id": q})
    assert r.status_code == 422 and _strict(r.text)["detail"]


def test_in_range_inputs_pass(client):
    assert client.post("/forget", json={"sample_ids": [INT64_MAX, INT64_MIN]}).status_code == 200
    assert client.get("/audit", params={"sample_id": str(INT64_MAX)}).json()["sample_id"] == (
        INT64_MAX
    )
    # finite-width checks of instances happen in the gateway (a 422 naming the rows)
    assert client.post("/predict", json={"instances": [[0.5, 1.0]]}).status_code == 200


def test_int64_bounds_are_in_the_schema(client):
    schema = client.get("/openapi.json").json()
    items = schema["components"]["schemas"]["ForgetRequest"]["properties"]["sample_ids"]
    items = items["anyOf"][0]["items"]
    # FastAPI's OpenAPI model renders the bounds as floats; the format says int64 exactly
    assert items["format"] == "int64"
    assert (items["minimum"], items["maximum"]) == (float(INT64_MIN), float(INT64_MAX))


def test_json_safe_quotes_what_json_cannot_hold():
    doc = {"a": [float("nan"), float("inf"), 1.5, 2**70, None, True], "e": ValueError("x")}
    out = _json_safe(doc)
    assert out == {"a": ["nan", "inf", 1.5, 2**70, None, True], "e": "ValueError('x')"}
    json.dumps(out, allow_nan=False)
