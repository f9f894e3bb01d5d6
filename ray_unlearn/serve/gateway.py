"""The ERASER gateway: a FastAPI ingress that answers predictions while deletions are pending,
accepts deletion requests, and reports their status, audits and metrics.

Per request it asks :func:`ray_unlearn.platform.serving.answer_batch` how each instance is
answered under the policy, queries only the shard deployments that answer needs, and for
"wait" instances blocks until the affected deletions are executed. A scheduler task executes
deletions when the policy's timing says so, on the run's detached unlearning executor, then
points the shard deployments at the new versions (each call names its version, so the swap
needs no restart and drops nothing).
"""

import asyncio
import logging
import math
import os
import secrets
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, Header, HTTPException, Query
from fastapi.responses import PlainTextResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from ray_unlearn.platform.audit import audit
from ray_unlearn.platform.deletion_log import DeletionLogError, RequestState
from ray_unlearn.platform.plan import PlanError
from ray_unlearn.platform.policies import due_for_execution, get_policy, next_wakeup
from ray_unlearn.platform.run import open_run
from ray_unlearn.platform.serving import DeletionTracker, answer_batch, shards_to_query
from ray_unlearn.platform.unlearning import submit_request

log = logging.getLogger("ray_unlearn.gateway")
TOKEN_ENV = "RAY_UNLEARN_API_TOKEN"


class GatewaySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    storage: str
    run_id: str
    policy: str | dict[str, Any] = "lazy-wait"
    api_token: str | None = Field(
        None, description=f"Bearer token for /v1/forget and /v1/audit; else ${TOKEN_ENV}."
    )
    protect_predict: bool = False
    max_instances: int = Field(1024, ge=1)
    wait_timeout_s: float = Field(300.0, gt=0)
    poll_interval_s: float = Field(1.0, gt=0)


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instances: list[list[float]] = Field(
        min_length=1, description="Feature vectors, one per instance."
    )


class InstanceOut(BaseModel):
    label: int
    probabilities: list[float]
    answered: str = Field(description="certified | excluded | waited | stale")
    versions: dict[str, str] = Field(description="shard -> model version used")


class PredictResponse(BaseModel):
    predictions: list[InstanceOut]
    pending_deletions: int
    latency_ms: float


class ForgetRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    owner_id: str | None = None
    sample_ids: list[int] | None = None
    request_id: str | None = None
    deadline_s: float | None = Field(
        None, gt=0, description="Seconds from now by which it must be done."
    )


app = FastAPI(title="ray-unlearn gateway", version="1", description=__doc__)


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram(
            "ray_unlearn_predict_latency_seconds",
            "Predict request latency",
            ["mode"],
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.answers = Counter(
            "ray_unlearn_answers_total", "Instances answered, by how", ["mode"], registry=r
        )
        self.exposure = Counter(
            "ray_unlearn_exposure_total",
            "Answers that used a model holding data under a pending deletion, uncertified",
            registry=r,
        )
        self.pending = Gauge(
            "ray_unlearn_pending_deletions", "Deletion requests not yet done", registry=r
        )
        self.certified_fraction = Gauge(
            "ray_unlearn_certified_fraction",
            "Fraction of instances answered at once with a certificate",
            registry=r,
        )
        self.executions = Counter(
            "ray_unlearn_unlearning_executions_total", "Unlearning executions", registry=r
        )
        self.compute = Counter(
            "ray_unlearn_unlearning_compute_seconds_total", "Seconds spent retraining", registry=r
        )
        self.counts: dict[str, int] = {}

    def record(self, modes: list[str], seconds: float, mode: str) -> None:
        self.latency.labels(mode).observe(seconds)
        for m in modes:
            self.answers.labels(m).inc()
            self.counts[m] = self.counts.get(m, 0) + 1
            if m == "stale":
                self.exposure.inc()
        total = sum(self.counts.values())
        self.certified_fraction.set(self.counts.get("certified", 0) / total if total else 0.0)


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress(app)
class Gateway:
    async def __init__(self, settings: dict[str, Any], *shard_handles):
        self.settings = GatewaySettings(**settings)
        self.ctx = await asyncio.to_thread(open_run, self.settings.storage, self.settings.run_id)
        self.policy = get_policy(self.settings.policy)
        self.token = self.settings.api_token or os.environ.get(TOKEN_ENV) or None
        reg = await asyncio.to_thread(self.ctx.model_store.registry)
        self.shards = dict(zip(sorted(reg.shards), shard_handles, strict=True))
        self.versions: dict[int, str] = reg.serving_versions()
        self.tracker = DeletionTracker(self.ctx.plan)
        self.tracker.sync(await asyncio.to_thread(self.ctx.deletion_log.unfinished))
        self.metrics = _Metrics()
        self.metrics.pending.set(len(self.tracker.items))
        self._wake = asyncio.Event()
        self._executed = asyncio.Condition()
        self._waiters = 0
        self._executor = None
        self._stats = {
            "executions": 0,
            "unlearning_compute_s": 0.0,  # wall seconds the shards spent retraining
            "unlearning_cpu_s": 0.0,  # CPU seconds of that retraining (the work itself)
            "unlearning_wall_s": 0.0,
            "swaps": 0,
        }
        self._scheduler_task = asyncio.get_running_loop().create_task(self._scheduler())
        # Start the executor (and its shard actors) now, so the first deletion pays only
        # for retraining, not for loading every shard.
        self._warmup = self._executor_handle().ping.remote()

    # -- helpers ---------------------------------------------------------------------
    def _auth(self, authorization: str | None, *, required: bool = True) -> None:
        if not required:
            return
        if self.token is None:
            raise HTTPException(
                503, f"no API token configured: set {TOKEN_ENV} or the gateway's api_token"
            )
        if (
            not authorization
            or not authorization.startswith("Bearer ")
            or not secrets.compare_digest(
                authorization[len("Bearer ") :].encode(), self.token.encode()
            )
        ):
            raise HTTPException(
                401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
            )

    def _features(self, body: PredictRequest) -> np.ndarray:
        n, width = len(body.instances), int(np.prod(self.ctx.feature_shape))
        if n > self.settings.max_instances:
            raise HTTPException(
                413, f"{n} instances in one request; at most {self.settings.max_instances} allowed"
            )
        bad = [i for i, row in enumerate(body.instances) if len(row) != width]
        if bad:
            raise HTTPException(
                422, f"instances {bad[:5]} have the wrong width: each needs {width} features"
            )
        x = np.asarray(body.instances, dtype=np.float32)
        nonfinite = np.flatnonzero(~np.isfinite(x).all(axis=1))
        if len(nonfinite):
            raise HTTPException(
                422, f"instances {nonfinite[:5].tolist()} hold NaN or infinite values"
            )
        return x

    def _executor_handle(self):
        if self._executor is None:
            from ray_unlearn.train.executor import executor_handle

            self._executor = executor_handle(self.ctx.storage.uri, self.ctx.run_id)
        return self._executor

    async def _query(self, shards: list[int], x: np.ndarray) -> dict[int, np.ndarray]:
        versions = {k: self.versions[k] for k in shards}
        outs = await asyncio.gather(
            *[self.shards[k].predict.remote((versions[k], x)) for k in shards]
        )
        return dict(zip(shards, outs, strict=True))

    async def _sync(self) -> None:
        self.tracker.sync(await asyncio.to_thread(self.ctx.deletion_log.unfinished))
        self.metrics.pending.set(len(self.tracker.items))

    async def _adopt_published(self) -> None:
        """Serve versions published outside this gateway's own executions (an S3T shard's
        background restore, another client's ``forget``). A newer version never holds more
        data than the one it replaces, so adopting it is always safe."""
        reg = await asyncio.to_thread(self.ctx.model_store.registry)
        new_versions = reg.serving_versions()
        if new_versions != self.versions:
            keys = set(new_versions) | set(self.versions)
            self._stats["swaps"] += sum(new_versions.get(k) != self.versions.get(k) for k in keys)
            self.versions = new_versions

    # -- unlearning schedule ---------------------------------------------------------
    async def _scheduler(self) -> None:
        while True:
            try:
                now = time.time()
                wake = next_wakeup(self.policy, self.tracker.views(), now)
                timeout = (
                    self.settings.poll_interval_s
                    if wake is None
                    else min(self.settings.poll_interval_s, max(0.0, wake - now))
                )
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except TimeoutError:
                    pass
                self._wake.clear()
                await self._sync()
                await self._adopt_published()
                if due_for_execution(
                    self.policy, self.tracker.views(), time.time(), self._waiters > 0
                ):
                    await self._execute()
            except asyncio.CancelledError:
                raise
            except Exception:  # keep scheduling; the failed requests are marked failed in the log
                log.exception("unlearning execution failed; will retry")
                await asyncio.sleep(self.settings.poll_interval_s)

    async def _execute(self) -> None:
        limit = self.policy.max_batch
        ids = self.tracker.begin_execution(limit)
        t0 = time.perf_counter()
        try:
            # with max_batch, exactly the requests marked; else every unfinished one
            done = await self._executor_handle().execute_pending.remote(
                None, ids if limit is not None else None
            )
        except Exception:
            self.tracker.abort_execution(ids)
            self._executor = None  # a dead executor actor is recreated on the next try
            raise
        reg = await asyncio.to_thread(self.ctx.model_store.registry)
        new_versions = reg.serving_versions()
        self._stats["swaps"] += sum(1 for k, v in new_versions.items() if self.versions.get(k) != v)
        self.versions = new_versions  # the swap: calls from here on name the new versions
        await self._sync()
        self._stats["executions"] += 1
        self._stats["unlearning_wall_s"] += time.perf_counter() - t0
        if done:  # every record of one batch carries the batch's training seconds
            details = done[0]["history"][-1]["details"]
            compute = float(details.get("train_seconds", 0.0))
            self._stats["unlearning_compute_s"] += compute
            self._stats["unlearning_cpu_s"] += float(details.get("train_cpu_seconds", 0.0))
            self.metrics.compute.inc(compute)
        self.metrics.executions.inc()
        async with self._executed:
            self._executed.notify_all()

    async def _wait_for(self, request_ids: set[str], until: float) -> None:
        """Block until none of ``request_ids`` is unfinished (lazy timing executes them)."""
        self._waiters += 1
        self._wake.set()
        try:
            async with self._executed:
                while request_ids & set(self.tracker.items):
                    remaining = until - time.time()
                    if remaining <= 0:
                        raise HTTPException(
                            504, "timed out waiting for pending deletions to execute"
                        )
                    try:
                        await asyncio.wait_for(self._executed.wait(), remaining)
                    except TimeoutError:
                        pass
        finally:
            self._waiters -= 1

    # -- endpoints -------------------------------------------------------------------
    @app.post("/v1/predict", response_model=PredictResponse)
    async def predict(
        self, body: PredictRequest, authorization: str | None = Header(None)
    ) -> PredictResponse:
        self._auth(authorization, required=self.settings.protect_predict)
        t0 = time.perf_counter()
        x = self._features(body)
        results: list[InstanceOut | None] = [None] * len(x)
        todo, waited = list(range(len(x))), False
        until = time.time() + self.settings.wait_timeout_s
        rule = self.ctx.config.unlearning.aggregation
        while todo:
            live = sorted(self.versions)
            if not live:
                raise HTTPException(
                    503, "no shard model is live (every shard was emptied by deletions)"
                )
            affected = self.tracker.affected()
            queried = shards_to_query(self.policy, live, affected)
            versions = dict(self.versions)
            probs = await self._query(queried, x[todo]) if queried else {}
            answers = answer_batch(
                self.policy,
                rule,
                live,
                affected,
                probs,
                n=len(todo),
                pending=bool(self.tracker.items),
            )
            if any(a.mode == "reject" for a in answers):
                raise HTTPException(
                    503,
                    "the answer depends on data under a pending deletion; retry later",
                    headers={"Retry-After": str(max(1, math.ceil(self.policy.deadline_s)))},
                )
            used_safe = {str(k): versions[k] for k in queried if k not in affected}
            used_all = {str(k): versions[k] for k in queried}
            left = []
            for j, a in zip(todo, answers, strict=True):
                if a.mode == "wait":
                    left.append(j)
                    continue
                mode = "waited" if waited and a.mode == "certified" else a.mode
                results[j] = InstanceOut(
                    label=a.label,
                    probabilities=a.scores,
                    answered=mode,
                    versions=used_all if a.mode == "stale" else used_safe,
                )
            if left:
                waited = True
                await self._wait_for(set(self.tracker.items), until)
            todo = left
        seconds = time.perf_counter() - t0
        modes = [r.answered for r in results]
        self.metrics.record(modes, seconds, "waited" if waited else modes[0])
        return PredictResponse(
            predictions=results,
            pending_deletions=len(self.tracker.items),
            latency_ms=seconds * 1000,
        )

    @app.post("/v1/forget", status_code=202)
    async def forget(
        self, body: ForgetRequest, authorization: str | None = Header(None)
    ) -> dict[str, Any]:
        self._auth(authorization)
        deadline = time.time() + body.deadline_s if body.deadline_s is not None else None
        try:
            record, created = await asyncio.to_thread(
                submit_request,
                self.ctx,
                owner_id=body.owner_id,
                sample_ids=body.sample_ids,
                request_id=body.request_id,
                deadline=deadline,
            )
        except PlanError as e:
            raise HTTPException(404, str(e)) from None
        except DeletionLogError as e:
            raise HTTPException(409 if "different" in str(e) else 422, str(e)) from None
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        if record.state != RequestState.DONE:
            self.tracker.add(record)  # from now on, answers needing these shards are gated
            self.metrics.pending.set(len(self.tracker.items))
            self._wake.set()
        rid = record.request.request_id
        return {
            "request_id": rid,
            "state": record.state.value,
            "created": created,
            "samples": len(record.request.sample_ids),
            "status": f"/v1/forget/{rid}",
        }

    @app.get("/v1/forget/{request_id}")
    async def forget_status(
        self, request_id: str, authorization: str | None = Header(None)
    ) -> dict[str, Any]:
        self._auth(authorization)
        try:
            rec = await asyncio.to_thread(self.ctx.deletion_log.get, request_id)
        except DeletionLogError as e:
            raise HTTPException(404, str(e)) from None
        d = rec.details or {}
        return {
            "request_id": request_id,
            "state": rec.state.value,
            "owner_id": rec.request.owner_id,
            "samples": len(rec.request.sample_ids),
            "received_at": rec.request.received_at,
            "deadline": rec.request.deadline,
            "done_at": rec.done_at,
            "executed_by": rec.executed_by,
            "versions_retired": rec.versions_retired,
            "versions_created": rec.versions_created,
            "unlearn_seconds": d.get("seconds"),
            "history": [{"state": h["state"], "at": h["at"]} for h in rec.history],
        }

    @app.get("/v1/audit")
    async def audit_endpoint(
        self,
        owner_id: str | None = Query(None),
        sample_id: int | None = Query(None),
        authorization: str | None = Header(None),
    ) -> dict[str, Any]:
        self._auth(authorization)
        if (owner_id is None) == (sample_id is None):
            raise HTTPException(422, "give exactly one of owner_id or sample_id")
        try:
            return await asyncio.to_thread(audit, self.ctx, owner_id=owner_id, sample_id=sample_id)
        except PlanError as e:
            raise HTTPException(404, str(e)) from None

    @app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "run_id": self.ctx.run_id,
            "policy": self.policy.name,
            "live_shards": len(self.versions),
            "pending_deletions": len(self.tracker.items),
        }

    @app.get("/v1/stats")
    async def stats(self) -> dict[str, Any]:
        """Counters for benchmarks and dashboards (the same figures as /metrics, as JSON)."""
        return {
            "policy": self.policy.model_dump(),
            "answers": dict(self.metrics.counts),
            "exposure": self.metrics.counts.get("stale", 0),
            "pending_deletions": len(self.tracker.items),
            "versions": {str(k): v for k, v in self.versions.items()},
            **self._stats,
        }

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics(self) -> PlainTextResponse:
        return PlainTextResponse(
            generate_latest(self.metrics.registry).decode(), media_type="text/plain; version=0.0.4"
        )
