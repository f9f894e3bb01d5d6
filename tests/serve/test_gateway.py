"""The live gateway over HTTP on 127.0.0.1, two replicas: predictions, ERASER gating,
deletions, audit, errors, metrics (on Ray's metrics endpoint, summed over the replicas),
and the promise checked by replay while deletions come through HTTP, the CLI and the Python
API. Shares the session's Ray; starts Serve once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from ray_unlearn.harness import free_port
from ray_unlearn.platform.core.engine import submit_request
from ray_unlearn.platform.core.plan import TEST
from ray_unlearn.platform.core.run import create_run
from ray_unlearn.platform.core.runtime import train_all_shards
from ray_unlearn.platform.eval.accuracy import serving_accuracy
from ray_unlearn.platform.serving import fence
from ray_unlearn.platform.serving.journal import read_journal
from tests.conftest import tiny_config

pytestmark = pytest.mark.ray
TOKEN = "test-token-not-a-secret"
# A safe policy under any preset naming: lazy execution, uncertified answers wait.
POLICY = {"timing": "lazy", "uncertified": "wait", "deadline_s": 60.0}
AUTH = {"Authorization": f"Bearer {TOKEN}"}


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
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        build_app(
            {
                "storage": ctx.storage.uri,
                "run_id": ctx.run_id,
                "policy": POLICY,
                "api_token": TOKEN,
                "max_instances": 200,
                "num_replicas": 2,
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
        # a clean shutdown deregisters both replicas: acknowledgements stop waiting for them
        assert fence.list_registrations(ctx.storage, ctx.layout) == []
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
    assert c.get("/metrics").status_code == 404  # Ray's metrics endpoint has the figures


def _offline_accuracy(ctx, n):
    from ray_unlearn.platform.core.engine import LocalShards
    from ray_unlearn.platform.eval.accuracy import ensemble_accuracy

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
    both = {"owner_id": "x", "sample_id": 1}
    assert c.get("/v1/audit", params=both, headers=AUTH).status_code == 422
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

    _metrics_add_up_across_replicas(ctx)


def _ray_metrics() -> dict[str, float]:
    """Ray's Prometheus endpoint on this node (the metrics agent's export port): the gateway
    series of application ray-unlearn, summed over replicas, by sample name and mode."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    node = next(n for n in ray.nodes() if n["Alive"])
    text = httpx.get(
        f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics", timeout=10
    ).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("ray_unlearn_") and s.labels.get("application") == "ray-unlearn":
                key = f"{s.name}:{s.labels.get('mode', '')}"
                out[key] = out.get(key, 0.0) + s.value
    return out


def _metrics_add_up_across_replicas(ctx) -> None:
    """The answers counted by Ray's metrics, summed over both replicas, equal the answers in
    both replicas' journals (an independent record); Ray exports every few seconds, so poll
    until they agree or the deadline passes."""
    deadline, seen, journal = time.time() + 90, {}, []
    while time.time() < deadline:
        journal = read_journal(ctx.storage, ctx.layout)
        seen = _ray_metrics()
        answers = sum(v for k, v in seen.items() if k.startswith("ray_unlearn_answers_total:"))
        if journal and answers == len(journal):
            break
        time.sleep(2)
    else:
        raise AssertionError(f"metrics never matched the journal ({len(journal)}): {seen}")
    by_mode: dict[str, int] = {}
    for e in journal:
        by_mode[e["mode"]] = by_mode.get(e["mode"], 0) + 1
    assert {k.split(":")[1]: v for k, v in seen.items() if "answers_total" in k} == by_mode
    assert seen.get("ray_unlearn_exposure_total:", 0) == by_mode.get("stale", 0) == 0
    assert sum(v for k, v in seen.items() if "latency_seconds_count" in k) >= 1
    assert seen["ray_unlearn_unlearning_executions_total:"] >= 1
    assert "ray_unlearn_pending_deletions:" in seen


def _strict_json(text: str):
    """Parse as strict JSON: Python's json accepts bare NaN / Infinity, browsers do not."""

    def refuse(name):
        raise ValueError(f"non-JSON constant {name} in an error body")

    return json.loads(text, parse_constant=refuse)


def test_every_bad_http_input_is_a_4xx_with_a_json_body(gateway):
    """Integers outside int64, NaN and Infinity anywhere: 4xx, never 5xx, and a JSON body
    (the error may quote the input, but never as a non-JSON value)."""
    ctx, c = gateway
    width = int(np.prod(ctx.feature_shape))
    raw = [
        ("/v1/forget", b'{"sample_ids": [' + str(2**70).encode() + b"]}"),
        ("/v1/forget", b'{"sample_ids": [NaN]}'),
        ("/v1/forget", b'{"sample_ids": [Infinity, -Infinity]}'),
        ("/v1/forget", b'{"owner_id": "x", "deadline_s": NaN}'),
        ("/v1/forget", b'{"owner_id": "x", "deadline_s": Infinity}'),
        ("/v1/forget", b'{"owner_id": "x", "request_id": "../../etc"}'),
        ("/v1/predict", b'{"instances": [NaN]}'),
        ("/v1/predict", b'{"instances": [[' + b",".join([b"NaN"] * width) + b"]]}"),
        ("/v1/predict", b'{"instances": [[Infinity]]}'),
        ("/v1/predict", b'{"instances": NaN}'),
    ]
    for path, body in raw:
        r = c.post(path, content=body, headers={**AUTH, "content-type": "application/json"})
        assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text)
        _strict_json(r.text)
    for q in ("1" * 23, str(2**63), str(-(2**63) - 1), "nan", "inf"):
        r = c.get("/v1/audit", params={"sample_id": q}, headers=AUTH)
        assert r.status_code == 422, (q, r.status_code, r.text)
        _strict_json(r.text)
    schema = c.get("/openapi.json").json()["components"]["schemas"]["ForgetRequest"]
    items = schema["properties"]["sample_ids"]["anyOf"][0]["items"]
    assert items["format"] == "int64" and items["maximum"] == float(2**63 - 1)
    assert ctx.deletion_log.records() == [] or all(
        r.request.request_id == "gdpr-7" for r in ctx.deletion_log.records()
    )


def _cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ray_unlearn.cli", *args]
    # no retry: the exit abort (exit 134) was fixed at its cause (Storage.read_table)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_deletions_from_every_entry_point_while_streaming_replay_clean(gateway):
    """Deletions through HTTP (either replica), the CLI (no cluster: a separate process that
    only shares the storage root) and the Python API while a client streams predictions;
    every acknowledgement waited for both replicas, and the replay of both replicas'
    journals finds no answer from a version holding an acknowledged deletion's samples."""
    ctx, c = gateway
    test = ctx.split_records("test")
    train = ctx.plan.shards != TEST
    done_before = {r.request.request_id for r in ctx.deletion_log.records()}
    owners = [str(o) for o in np.unique(ctx.plan.owner_ids[train])][5:11]  # not used above
    stop, answered, errors = threading.Event(), [], []

    def stream():
        with httpx.Client(base_url=c.base_url, timeout=120) as s:
            i = 0
            while not stop.is_set():
                rows = test.features[i % 300 : i % 300 + 3].tolist()
                r = s.post("/v1/predict", json={"instances": rows})
                (answered if r.status_code == 200 else errors).append(r)
                i += 3

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    try:
        time.sleep(1.0)
        for i, o in enumerate(owners[:2]):  # HTTP: the proxy spreads them over the replicas
            r = c.post("/v1/forget", json={"owner_id": o, "request_id": f"http-{i}"}, headers=AUTH)
            assert r.status_code == 202, r.text
        env_run = ["--run", ctx.run_id, "--storage", ctx.storage.uri, "--no-wait", "--json"]
        for i, o in enumerate(owners[2:4]):
            r = _cli("forget", "--owner", o, "--request-id", f"cli-{i}", *env_run)
            assert r.returncode == 0, r.stderr[-2000:]
        for i, o in enumerate(owners[4:6]):
            submit_request(ctx, owner_id=o, request_id=f"api-{i}")
        new = [f"{k}-{i}" for k in ("http", "cli", "api") for i in range(2)]
        deadline = time.time() + 240
        while time.time() < deadline:  # lazy: the streaming waiters make them execute
            states = {ctx.deletion_log.get(rid).state.value for rid in new}
            if states == {"done"}:
                break
            time.sleep(0.5)
        assert states == {"done"}, states
        time.sleep(1.0)  # answers from the new versions
    finally:
        stop.set()
        t.join(timeout=150)
    assert answered and not errors, [e.text for e in errors[:3]]
    replicas = {r.json()["replica"] for r in answered}
    for rid in new:
        ack = fence.read_ack(ctx.storage, ctx.layout, rid)
        # each replica confirmed, or (a stalled event loop on 2 loaded cores) the ack
        # waited its lease out: never skipped
        fenced = {*ack["confirmed"], *ack["expired"], *ack["deregistered"]}
        assert fenced >= replicas and ack["confirmed"], (rid, ack)
    time.sleep(0.5)  # the replicas flush their journals every fence interval
    journal = read_journal(ctx.storage, ctx.layout)
    assert len(replicas) == 2 and {e["replica"] for e in journal} == replicas
    assert len(journal) >= sum(len(r.json()["predictions"]) for r in answered)
    r = _cli("verify-exposure", "--run", ctx.run_id, "--storage", ctx.storage.uri, "--json")
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and doc["clean"] and doc["answers"] == len(journal), doc
    assert doc["promises"] >= len(new) + len(done_before)
    # receipts name what voted: no answer after an acknowledgement used a shard holding it
    assert all("excluded" in p and "margin" in p for r in answered for p in r.json()["predictions"])
    assert os.path.exists(ctx.storage.local_path(f"{ctx.layout.root}/journal"))
