"""The gateway's OpenAPI document and its /v1/audit queries, without Ray: the real FastAPI app
with Serve's per-replica instance lookup pointed at a gateway object holding a tiny run."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient

from ray_unlearn.platform.core.engine import submit_request
from ray_unlearn.platform.core.plan import TEST
from ray_unlearn.serve.gateway import Gateway, GatewaySettings, app

TOKEN = "test-token-not-a-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# route -> the error answers it documents
ROUTES = {
    ("/v1/predict", "post"): {401, 413, 422, 503, 504},
    ("/v1/forget", "post"): {401, 404, 409, 422, 503},
    ("/v1/forget/{request_id}", "get"): {401, 404, 422, 503},  # 422: FastAPI adds it
    ("/v1/audit", "get"): {401, 404, 422, 503},
}


def test_openapi_declares_bearer_auth_and_each_routes_errors():
    doc = app.openapi()
    schemes = doc["components"]["securitySchemes"]
    (name,) = [k for k, v in schemes.items() if v == {**v, "type": "http", "scheme": "bearer"}]
    for (path, method), codes in ROUTES.items():
        op = doc["paths"][path][method]
        assert op["security"] == [{name: []}], path  # Swagger's Authorize sends the header
        documented = {int(c) for c in op["responses"] if c[0] in "45"}
        assert documented == codes, (path, documented)
        for c in codes:
            body = op["responses"][str(c)]["content"]["application/json"]["schema"]
            assert body["$ref"].endswith(("/ErrorBody", "/HTTPValidationError")), (path, c)
        assert "self" not in {p["name"] for p in op.get("parameters", [])}
    assert "security" not in doc["paths"]["/healthz"]["get"]
    # what Swagger shows is Markdown: no Sphinx/RST roles or double backticks anywhere
    text = json.dumps(doc)
    assert not re.search(r"``|:(func|class|meth|mod|attr):`", text), re.findall(
        r".{40}``.{40}", text
    )
    audit_params = {p["name"] for p in doc["paths"]["/v1/audit"]["get"]["parameters"]}
    assert audit_params == {"owner_id", "sample_id", "residue"}


@pytest.fixture
def gateway_client(tiny_run, monkeypatch):
    """TestClient on the real app; the routes' instance is a Gateway holding ``tiny_run``
    (only what auth and audit read: no fence, no shards)."""
    cls = next(c for c in Gateway.func_or_class.__mro__ if "_fence_loop" in vars(c))

    class _NoShutdown(cls):
        def __del__(self):  # nothing registered, nothing journaled: nothing to clean up
            pass

    gw = _NoShutdown.__new__(_NoShutdown)
    gw.ctx = tiny_run
    gw.settings = GatewaySettings(storage=tiny_run.storage.uri, run_id=tiny_run.run_id)
    gw.token = TOKEN
    import ray.serve

    monkeypatch.setattr(
        ray.serve, "get_replica_context", lambda: SimpleNamespace(servable_object=gw)
    )
    with TestClient(app) as c:
        yield tiny_run, gw, c


def test_audit_answers_the_cli_queries(gateway_client):
    from ray_unlearn.api import audit_run

    ctx, gw, c = gateway_client
    train = ctx.plan.shards != TEST
    owner = str(ctx.plan.owner_ids[train][0])
    sample = int(ctx.plan.sample_ids[train][-1])
    submit_request(ctx, owner_id=owner, request_id="gdpr-1")  # pending, not executed

    by_owner = c.get("/v1/audit", params={"owner_id": owner}, headers=AUTH)
    assert by_owner.status_code == 200, by_owner.text
    doc = by_owner.json()
    assert doc["owner_id"] == owner and doc["pending_requests"] == 1
    assert [r["request_id"] for r in doc["requests"]] == ["gdpr-1"]
    assert doc == json.loads(json.dumps(audit_run(ctx, owner=owner)))  # what the CLI prints

    doc = c.get("/v1/audit", params={"sample_id": sample}, headers=AUTH).json()
    assert doc["sample_id"] == sample and doc["sample_ids"] == [sample]
    doc = c.get("/v1/audit", headers=AUTH).json()  # neither: every executed deletion
    assert doc["all_deletions"] is True and "residue" not in doc
    doc = c.get("/v1/audit", params={"residue": "true"}, headers=AUTH).json()
    assert doc["residue"]["files_scanned"] > 0 and doc["clean"] is doc["residue"]["clean"]

    # errors: named, 4xx, and the log is unchanged
    both = c.get("/v1/audit", params={"owner_id": owner, "sample_id": sample}, headers=AUTH)
    assert both.status_code == 422 and "not both" in both.json()["detail"]
    assert c.get("/v1/audit", params={"owner_id": "no-such-owner"}, headers=AUTH).status_code == 404
    assert c.get("/v1/audit", params={"sample_id": 10**12}, headers=AUTH).status_code == 404
    assert c.get("/v1/audit", params={"sample_id": "x"}, headers=AUTH).status_code == 422
    r = c.get("/v1/audit")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert c.get("/v1/audit", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert c.get("/v1/audit", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    gw.token = None
    assert c.get("/v1/audit", headers=AUTH).status_code == 503
    assert [r.request.request_id for r in ctx.deletion_log.records()] == ["gdpr-1"]
    assert np.isin(sample, ctx.plan.sample_ids)
