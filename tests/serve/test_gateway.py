"""The live gateway over HTTP on 127.0.0.1: predictions, ERASER gating, deletions, audit,
errors, metrics. Shares the session's Ray; starts Serve once and shuts it down."""

from __future__ import annotations

import socket
import time

import httpx
import numpy as np
import pytest

from ray_unlearn.platform.evaluate import serving_accuracy
from ray_unlearn.platform.plan import TEST
from ray_unlearn.platform.run import create_run
from ray_unlearn.platform.shard import train_all_shards
from tests.conftest import tiny_config

pytestmark = pytest.mark.ray
TOKEN = "test-token-not-a-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gateway(ray_session, tmp_path_factory):
    from ray import serve

    from ray_unlearn.serve.app import build_app
    from ray_unlearn.train.executor import NAMESPACE, executor_actor_name

    ctx = create_run(
        tiny_config(
            tmp_path_factory.mktemp("serve"),
            "partition.shards=5",
            "training.epochs=3",
            "unlearning.aggregation=vote",
        )
    )
    train_all_shards(ctx)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        build_app(
            {
                "storage": ctx.storage.uri,
                "run_id": ctx.run_id,
                "policy": "lazy-wait",
                "api_token": TOKEN,
                "max_instances": 200,
            }
        ),
        name="ray-unlearn",
        route_prefix="/",
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    try:
        yield ctx, client
    finally:
        client.close()
        serve.delete("ray-unlearn")
        serve.shutdown()
        try:
            import ray

            ray.kill(ray.get_actor(executor_actor_name(ctx.run_id), namespace=NAMESPACE))
        except ValueError:
            pass


def test_predictions_match_the_ensemble(gateway):
    ctx, c = gateway
    test = ctx.split_records("test")
    r = c.post("/v1/predict", json={"instances": test.features[:200].tolist()})
    assert r.status_code == 200
    preds = r.json()["predictions"]
    assert {p["answered"] for p in preds} == {"certified"}  # nothing pending yet
    acc = float(np.mean([p["label"] == y for p, y in zip(preds, test.labels[:200], strict=True)]))
    assert acc == pytest.approx(_offline_accuracy(ctx, 200), abs=1e-9)
    assert set(preds[0]["versions"]) == {"0", "1", "2", "3", "4"}
    assert c.get("/healthz").json()["live_shards"] == 5
    assert c.get("/docs").status_code == 200 and "/v1/predict" in c.get("/openapi.json").text


def _offline_accuracy(ctx, n):
    from ray_unlearn.platform.evaluate import ensemble_accuracy
    from ray_unlearn.platform.unlearning import LocalShards

    test = ctx.split_records("test")
    probs = LocalShards(ctx).predict_proba(test.features[:n])
    return ensemble_accuracy(probs, test.labels[:n], "vote")


def test_bad_requests_are_4xx_and_change_nothing(gateway):
    ctx, c = gateway
    width = int(np.prod(ctx.feature_shape))
    assert c.post("/v1/predict", json={"instances": [[0.0] * (width - 1)]}).status_code == 422
    assert (
        c.post(
            "/v1/predict", content=b"{not json", headers={"content-type": "application/json"}
        ).status_code
        == 422
    )
    assert c.post("/v1/predict", json={}).status_code == 422
    inf = b'{"instances": [[' + b",".join([b"1e400"] * width) + b"]]}"
    r = c.post("/v1/predict", content=inf, headers={"content-type": "application/json"})
    assert r.status_code == 422 and "NaN or infinite" in r.text
    assert c.post("/v1/predict", json={"instances": [[0.0] * width] * 201}).status_code == 413
    assert c.post("/v1/forget", json={"owner_id": "x"}).status_code == 401
    assert (
        c.post(
            "/v1/forget", json={"owner_id": "x"}, headers={"Authorization": "Bearer nope"}
        ).status_code
        == 401
    )
    r = c.post("/v1/forget", json={"owner_id": "no-such-owner"}, headers=AUTH)
    assert r.status_code == 404 and "unknown owner id" in r.text
    assert c.post("/v1/forget", json={"sample_ids": [10**12]}, headers=AUTH).status_code == 404
    assert c.post("/v1/forget", json={}, headers=AUTH).status_code == 422
    assert c.get("/v1/forget/never-made", headers=AUTH).status_code == 404
    assert c.get("/v1/audit", headers=AUTH).status_code == 422
    assert ctx.deletion_log.records() == []


def test_deletion_gates_answers_then_swaps_versions(gateway):
    ctx, c = gateway
    owner = str(ctx.plan.owner_ids[ctx.plan.shards != TEST][0])
    shard = int(next(k for k in ctx.plan.locate(ctx.plan.samples_of_owner(owner))[0] if k != TEST))
    before = c.get("/v1/stats").json()["versions"][str(shard)]
    r = c.post("/v1/forget", json={"owner_id": owner, "request_id": "gdpr-7"}, headers=AUTH)
    assert r.status_code == 202 and r.json()["state"] == "pending"
    assert (
        c.post("/v1/forget", json={"owner_id": owner, "request_id": "gdpr-7"}, headers=AUTH).json()[
            "created"
        ]
        is False
    )
    other = str(ctx.plan.owner_ids[ctx.plan.shards != TEST][-1])
    assert (
        c.post(
            "/v1/forget", json={"owner_id": other, "request_id": "gdpr-7"}, headers=AUTH
        ).status_code
        == 409
    )

    test = ctx.split_records("test")
    r = c.post("/v1/predict", json={"instances": test.features[:100].tolist()})
    assert r.status_code == 200
    preds = r.json()["predictions"]
    modes = {p["answered"] for p in preds}
    assert modes <= {"certified", "waited"} and "stale" not in modes
    for p in preds:
        if p["answered"] == "certified" and r.json()["pending_deletions"]:
            assert (
                str(shard) not in p["versions"]
            )  # a certified answer never used the affected shard

    deadline = time.time() + 120
    while (
        c.get("/v1/forget/gdpr-7", headers=AUTH).json()["state"] != "done"
        and time.time() < deadline
    ):
        c.post(
            "/v1/predict", json={"instances": test.features[100:101].tolist()}
        )  # lazy: a waiter triggers it
        time.sleep(0.5)
    status = c.get("/v1/forget/gdpr-7", headers=AUTH).json()
    assert status["state"] == "done" and status["versions_retired"]
    stats = c.get("/v1/stats").json()
    assert (
        stats["versions"][str(shard)] != before and stats["exposure"] == 0 and stats["swaps"] >= 1
    )
    audit = c.get("/v1/audit", params={"owner_id": owner}, headers=AUTH).json()
    assert audit["clean"] and audit["live_versions_containing"] == {}
    after = c.post("/v1/predict", json={"instances": test.features[:20].tolist()}).json()[
        "predictions"
    ]
    assert all(p["versions"][str(shard)] == stats["versions"][str(shard)] for p in after)
    assert serving_accuracy(ctx) > 0.3

    metrics = c.get("/metrics").text
    for name in (
        "ray_unlearn_predict_latency_seconds_bucket",
        "ray_unlearn_pending_deletions",
        "ray_unlearn_certified_fraction",
        "ray_unlearn_exposure_total",
    ):
        assert name in metrics
