"""The ERASER gateway: a FastAPI ingress that answers predictions while deletions are pending,
accepts deletion requests, and reports their status, audits and metrics.

Per request it asks :func:`ray_unlearn.platform.serving.view.answer_batch` how each instance is
answered under the policy, queries only the shard deployments that answer needs, and for
"wait" instances blocks until the affected deletions are executed. A scheduler task executes
deletions when the policy's timing says so, on the run's detached unlearning executor, then
points the shard deployments at the new versions (each call names its version, so the swap
needs no restart and drops nothing).

Fencing (``ray_unlearn.platform.serving.fence``): each replica registers under the run, reads the
deletion log (then the registry) every ``fence_interval_s`` and publishes when that read
started; it answers only within ``lease_s`` of its latest read, and an answer computed from
a view that changed before the answer is committed is computed again. So a deletion
acknowledged anywhere (this gateway, another replica, the CLI, a job, the Python API) gates
every replica, whatever their number. Every committed answer carries a receipt (versions
that voted, excluded shards, certificate inputs) and goes to the replica's answer journal
(``ray_unlearn.platform.serving.journal``), which ``ray-unlearn verify-exposure`` replays.
"""

import asyncio
import collections
import logging
import math
import os
import secrets
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from ray_unlearn.platform.core.deletion_log import REQUEST_ID_RE, DeletionLogError, RequestState
from ray_unlearn.platform.core.engine import submit_request
from ray_unlearn.platform.core.plan import PlanError
from ray_unlearn.platform.core.run import open_run
from ray_unlearn.platform.core.storage import StorageError
from ray_unlearn.platform.serving import fence
from ray_unlearn.platform.serving.journal import (
    DEFAULT_MAX_SEGMENTS,
    DEFAULT_SEGMENT_ANSWERS,
    AnswerJournal,
)
from ray_unlearn.platform.serving.policies import due_for_execution, get_policy, next_wakeup
from ray_unlearn.platform.serving.receipts import make_receipt
from ray_unlearn.platform.serving.view import (
    DeletionTracker,
    ServingView,
    answer_batch,
    read_view,
    shards_to_query,
)

log = logging.getLogger("ray_unlearn.gateway")
TOKEN_ENV = "RAY_UNLEARN_API_TOKEN"


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# FastAPI's OpenAPI model renders the bounds as floats (2**63); "format: int64" says it exactly
SampleId = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX, json_schema_extra={"format": "int64"})]


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
    poll_interval_s: float = Field(
        1.0, gt=0, description="Longest sleep of the unlearning scheduler between checks (s)."
    )
    lease_s: float = Field(
        fence.DEFAULT_LEASE_S,
        gt=0,
        description="A replica answers only this long after its latest read of the deletion "
        "log started (s); an acknowledgement waits at most this long for a silent replica.",
    )
    fence_interval_s: float = Field(
        fence.DEFAULT_INTERVAL_S, gt=0, description="How often a replica reads the log (s)."
    )
    clock_skew_s: float = Field(
        fence.DEFAULT_CLOCK_SKEW_S, ge=0, description="Bound on clock disagreement (s)."
    )
    journal_segment_answers: int = Field(DEFAULT_SEGMENT_ANSWERS, ge=1)
    journal_max_segments: int = Field(DEFAULT_MAX_SEGMENTS, ge=1)

    def fence_settings(self) -> fence.FenceSettings:
        return fence.FenceSettings(self.lease_s, self.fence_interval_s, self.clock_skew_s)


def _text_encoder(ctx):
    """The run's tokenizer (texts -> token id rows), or None when its model takes vectors."""
    if "_text_encoder" not in ctx.__dict__:
        from ray_unlearn.platform.core.models import text_encoder_of

        ctx.__dict__["_text_encoder"] = text_encoder_of(ctx.config.model)
    return ctx.__dict__["_text_encoder"]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instances: list[list[float]] | list[str] = Field(
        min_length=1,
        description="Feature vectors, one per instance (finite numbers); or, for a run whose "
        "model takes text (model.component hf_encoder), one text per instance.",
    )


class InstanceOut(BaseModel):
    label: int
    probabilities: list[float]
    answered: str = Field(description="certified | excluded | waited | stale")
    versions: dict[str, str] = Field(description="shard -> model version that voted")
    excluded: list[int] = Field(
        description="Live shards left out because a deletion was pending on them."
    )
    margin: float | None = Field(
        description="Certificate margin: min over other labels of the voting shards' lead "
        "minus the number excluded; the certificate holds when > 0 (or 0 and the tie-break "
        "favours the label)."
    )
    votes: dict[str, int] | None = Field(
        None, description="vote aggregation: shard -> label it voted, to re-check the margin."
    )


class PredictResponse(BaseModel):
    predictions: list[InstanceOut]
    pending_deletions: int
    latency_ms: float
    replica: str = Field(description="The gateway replica whose journal holds these answers.")
    committed_at: float = Field(description="Unix time the answers were committed (s).")


class ForgetRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    owner_id: str | None = Field(None, min_length=1, max_length=256)
    sample_ids: list[SampleId] | None = Field(
        None, min_length=1, max_length=100_000, description="Sample ids (int64)."
    )
    request_id: str | None = Field(None, pattern=REQUEST_ID_RE.pattern, max_length=128)
    deadline_s: float | None = Field(
        None, gt=0, le=10**9, description="Seconds from now by which it must be done."
    )


class ErrorBody(BaseModel):
    detail: str | list[dict[str, Any]] = Field(
        description="What was wrong: a message, or (request validation) one entry per problem."
    )


# Every error answer is one of these JSON bodies; 422 comes from request validation (a list)
# or from the gateway's own checks (a message), so the schema says both.
_ERROR_TEXT: dict[int, str] = {
    401: "Missing or wrong bearer token.",
    404: "Unknown request, owner or sample id.",
    409: "The request id was already used for other data.",
    413: "Too many instances in one request.",
    422: "Invalid input (NaN, infinity, out of int64, wrong width, conflicting queries, ...).",
    503: "Cannot answer safely now (deletion log unreadable, reject policy, no API token "
    "configured): retry later.",
    504: "Timed out waiting for pending deletions.",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for a route: the error answers it can give."""
    return {c: {"model": ErrorBody, "description": _ERROR_TEXT[c]} for c in codes}


def _json_safe(value: Any) -> Any:
    """``value`` with every non-JSON leaf (NaN, Infinity, exceptions, bytes) as its repr, so
    an error body can quote the input without the JSON encoder refusing it (a 500)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    return repr(value)


API_DESCRIPTION = """\
Predictions from a SISA-style sharded ensemble that stay correct while deletion requests
are pending (ERASER gating), deletion requests, their status, and audits.

- POST /v1/predict answers each instance as certified (the unaffected shards decide it),
  excluded (answered without the shards holding data under deletion), waited (after the
  deletions it depended on executed) or stale (a baseline policy only). Each answer names
  the model versions that voted.
- POST /v1/forget accepts a deletion by owner id or sample ids (202 once durably logged and
  every gateway replica is fenced for it); GET /v1/forget/{request_id} follows it.
- GET /v1/audit lists the live model versions containing an owner's or a sample's data (or,
  with neither, any executed deletion's), the request history and a verdict.

/v1/forget and /v1/audit need a bearer token (the Authorize button); /v1/predict needs it
only when the gateway was started with protect_predict. Figures: GET /v1/stats (this
replica, JSON); Prometheus metrics go through Ray's metrics agent (ray_unlearn_* series).
"""

app = FastAPI(title="ray-unlearn gateway", version="1", description=API_DESCRIPTION)
# Declared in the OpenAPI document (Swagger's Authorize button); the check itself is
# Gateway._auth, so a missing header is our 401 (or 503 with no token configured).
bearer = HTTPBearer(auto_error=False, description="The API token (RAY_UNLEARN_API_TOKEN).")
Bearer = Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]


@app.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": _json_safe(exc.errors())})


class _Metrics:
    """The gateway's figures as Ray metrics (``ray.serve.metrics``): each replica records
    its own series, tagged with its deployment, replica and application, and Ray's metrics
    agent on every node exports them to Prometheus (each node's metrics export port,
    scraped through Ray's service-discovery file), so a sum over the ``replica`` tag is the
    application's total. Names are exported with Ray's ``ray_`` prefix (and counters with
    ``_total``): ``ray_unlearn_answers_total``, ``ray_unlearn_predict_latency_seconds``...
    ``counts`` keeps this replica's answers for GET /v1/stats."""

    def __init__(self) -> None:
        from ray.serve import metrics as m  # created inside a replica: Serve's tags apply

        self.latency = m.Histogram(
            "unlearn_predict_latency_seconds",
            description="Predict request latency (s), by how the request was answered",
            boundaries=[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
            tag_keys=("mode",),
        )
        self.answers = m.Counter(
            "unlearn_answers", description="Instances answered, by how", tag_keys=("mode",)
        )
        self.exposure = m.Counter(
            "unlearn_exposure",
            description="Answers that used a model holding data under a pending deletion, "
            "uncertified",
        )
        self.pending = m.Gauge(
            "unlearn_pending_deletions",
            description="Deletion requests not yet done, as this replica last read the log "
            "(the same for every replica: take the max, not the sum)",
        )
        self.executions = m.Counter(
            "unlearn_unlearning_executions", description="Unlearning executions"
        )
        self.compute = m.Counter(
            "unlearn_unlearning_compute_seconds", description="Seconds spent retraining (s)"
        )
        self.counts: dict[str, int] = {}

    def record(self, modes: list[str], seconds: float, mode: str) -> None:
        self.latency.observe(seconds, tags={"mode": mode})
        for m, n in collections.Counter(modes).items():
            self.answers.inc(n, tags={"mode": m})
            self.counts[m] = self.counts.get(m, 0) + n
        if "stale" in modes:
            self.exposure.inc(modes.count("stale"))


def _replica_name() -> str:
    """A file-name-safe id unique to this replica process (Serve's replica id when there is
    one, plus a random suffix: a restarted replica is a new gateway for the fence)."""
    try:
        base = serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a Serve replica (unit tests)
        base = "gateway"
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in str(base))[:60]
    return f"{safe}-{uuid.uuid4().hex[:8]}"


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress(app)
class Gateway:
    async def __init__(self, settings: dict[str, Any], *shard_handles):
        self.settings = GatewaySettings(**settings)
        self.fence = self.settings.fence_settings()  # raises on incoherent lease settings
        self.ctx = await asyncio.to_thread(open_run, self.settings.storage, self.settings.run_id)
        self.policy = get_policy(self.settings.policy)
        self.token = self.settings.api_token or os.environ.get(TOKEN_ENV) or None
        reg = await asyncio.to_thread(self.ctx.model_store.registry)
        self.shards = dict(zip(sorted(reg.shards), shard_handles, strict=True))
        self.replica = _replica_name()
        # Fence reads get their own thread: /v1/forget threads wait on this replica's
        # confirmation, so sharing the default pool with them could starve the reads.
        self._fence_pool = ThreadPoolExecutor(1, thread_name_prefix="fence")
        # The journal's writes (a whole segment, fsync'd) get theirs too: in the fence thread
        # they delayed every next read and publish, so acknowledgements, by ~0.2 s under load.
        self._journal_pool = ThreadPoolExecutor(1, thread_name_prefix="journal")
        self._refresh_lock = asyncio.Lock()
        self._closing = False
        self._registration = fence.Registration.new(self.replica, self.fence)
        self._reads_since_change = 0
        self._published_at = 0.0
        self._registered = False
        # Registered before the first read, so an acknowledgement listing us from now on
        # waits for a read of ours that started after its request was durable.
        await self._in_fence_thread(self._publish)
        self.journal = AnswerJournal(
            self.ctx.storage,
            self.ctx.layout,
            self.replica,
            segment_answers=self.settings.journal_segment_answers,
            max_segments=self.settings.journal_max_segments,
        )
        self.view = ServingView(DeletionTracker(self.ctx.plan))
        self.metrics = _Metrics()
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
            "refresh_failures": 0,
        }
        # Where a prediction's time goes, summed over predictions (s), and what the fence
        # costs: read for the figures of benchmarks/serving.py (GET /v1/stats "timing").
        self._timing = {
            "predicts": 0,
            "predict_s": 0.0,  # inside predict, from its start to the commit
            "fresh_view_s": 0.0,  # waiting for a view within its lease (a log read)
            "query_s": 0.0,  # the shard deployments' answers
            "wait_s": 0.0,  # "wait" instances blocked until deletions executed
            "recomputes": 0,  # computations thrown away: the view changed meanwhile
            "shard_calls": 0,  # shard deployment calls (each: one shard, many instances)
            "expired_views": 0,  # predictions that found the view past its lease
            "refreshes": 0,
            "read_s": 0.0,  # log + registry reads, wall, including the thread hand-off
            "read_max_s": 0.0,
            "publishes": 0,
            "publish_s": 0.0,  # registration writes (fsync'd), wall
            "journal_flush_s": 0.0,  # answer-journal writes (fsync'd), own thread, wall
            "loop_lag_s": 0.0,  # fence loop sleeps overshooting fence_interval_s: busy loop
            "loop_lag_max_s": 0.0,
        }
        await self._refresh()
        loop = asyncio.get_running_loop()
        self._fence_task = loop.create_task(self._fence_loop())
        self._journal_task = loop.create_task(self._journal_loop())
        self._scheduler_task = loop.create_task(self._scheduler())
        # Start the executor (and its shard actors) now, so the first deletion pays only
        # for retraining, not for loading every shard.
        self._warmup = self._executor_handle().ping.remote()

    @property
    def tracker(self) -> DeletionTracker:
        return self.view.tracker

    @property
    def versions(self) -> dict[int, str]:
        return self.view.versions

    def __del__(self) -> None:
        """Clean shutdown: stop answering, flush the journal, then deregister (an
        acknowledgement then counts this replica as fenced)."""
        self._closing = True
        for name in ("_fence_task", "_journal_task", "_scheduler_task"):
            task = getattr(self, name, None)
            if task is not None:
                task.cancel()
        for name in ("_fence_pool", "_journal_pool"):
            pool = getattr(self, name, None)
            if pool is not None:
                # a registration write already running in the fence thread would otherwise
                # land after the delete below and leave this replica registered; a journal
                # write, race the final flush
                pool.shutdown(wait=True, cancel_futures=True)
        try:
            self.journal.flush()
            fence.remove_registration(self.ctx.storage, self.ctx.layout, self.replica)
        except Exception:  # shutting down: the lease fences us anyway
            log.exception("gateway %s: deregistration failed", getattr(self, "replica", "?"))

    # -- helpers ---------------------------------------------------------------------
    def _auth(self, creds: HTTPAuthorizationCredentials | None, *, required: bool = True) -> None:
        if not required:
            return
        if self.token is None:
            raise HTTPException(
                503, f"no API token configured: set {TOKEN_ENV} or the gateway's api_token"
            )
        if creds is None or not secrets.compare_digest(
            creds.credentials.encode(), self.token.encode()
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
        encode = _text_encoder(self.ctx)
        if (encode is not None) != isinstance(body.instances[0], str):
            want = "text: one string per instance" if encode else "feature vectors, not text"
            raise HTTPException(422, f"this run's model takes {want}")
        if encode is not None:
            blank = [i for i, t in enumerate(body.instances) if not t.strip()]
            if blank:
                raise HTTPException(422, f"instances {blank[:5]} are empty texts")
            return encode(body.instances)
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

    async def _query(
        self, shards: list[int], versions: dict[int, str], x: np.ndarray
    ) -> dict[int, np.ndarray]:
        outs = await asyncio.gather(
            *[self.shards[k].predict.remote((versions[k], x)) for k in shards]
        )
        return dict(zip(shards, outs, strict=True))

    def _publish(self) -> None:
        """Write this replica's registration; only the first write is fsync'd (why this is
        safe: ``fence.write_registration``)."""
        first = not self._registered
        fence.write_registration(
            self.ctx.storage, self.ctx.layout, self._registration, durable=first
        )
        self._registered = True

    async def _in_fence_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._fence_pool, fn, *args)

    # -- the fence -------------------------------------------------------------------
    async def _refresh(self, *, if_expired: bool = False) -> None:
        """Read the log then the registry, hold the result as one view, then publish when
        the read started. Raises when storage cannot be read (the view then ages out).
        ``if_expired``: only if the view is still expired once the lock is held (many
        requests finding it expired at once cause one read, not one each)."""
        async with self._refresh_lock:
            if if_expired and self.view.valid(time.time(), self.fence.lease_s):
                return
            t_read = time.perf_counter()
            started_at, unfinished, versions = await self._in_fence_thread(read_view, self.ctx)
            t_read = time.perf_counter() - t_read
            self._timing["refreshes"] += 1
            self._timing["read_s"] += t_read
            self._timing["read_max_s"] = max(self._timing["read_max_s"], t_read)
            old = dict(self.view.versions)
            changed = self.view.adopt(started_at, unfinished, versions)  # no await inside
            self._stats["swaps"] += sum(old.get(k) != v for k, v in versions.items() if old)
            self.metrics.pending.set(len(self.tracker.items))
            # Publish after every read for a few reads after a change (so a request seen
            # first by a read that started before it was durable is confirmed by the next),
            # else as a heartbeat: an acknowledgement waits only for reads that matter.
            self._reads_since_change = 0 if changed else self._reads_since_change + 1
            if not self._closing and (
                self._reads_since_change < 5
                or self._registration.view_at is None
                or time.time() - self._published_at > self.fence.lease_s / 4
            ):
                self._registration.view_at = started_at
                t_pub = time.perf_counter()
                await self._in_fence_thread(self._publish)
                self._timing["publishes"] += 1
                self._timing["publish_s"] += time.perf_counter() - t_pub
                self._published_at = time.time()
        if changed:
            if self.tracker.items:
                self._wake.set()
            async with self._executed:
                self._executed.notify_all()

    async def _fence_loop(self) -> None:
        while True:
            t_sleep = time.perf_counter()
            await asyncio.sleep(self.fence.interval_s)
            lag = time.perf_counter() - t_sleep - self.fence.interval_s
            self._timing["loop_lag_s"] += max(0.0, lag)
            self._timing["loop_lag_max_s"] = max(self._timing["loop_lag_max_s"], lag)
            try:
                await self._refresh()
            except asyncio.CancelledError:
                raise
            except Exception:  # storage unreachable: answers stop when the lease runs out
                self._stats["refresh_failures"] += 1
                log.exception("gateway %s: reading the deletion log failed", self.replica)

    async def _journal_loop(self) -> None:
        """Write the answers committed since the last flush, every ``fence_interval_s``."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.fence.interval_s)
            try:
                t_flush = time.perf_counter()
                await loop.run_in_executor(self._journal_pool, self.journal.flush)
                self._timing["journal_flush_s"] += time.perf_counter() - t_flush
            except asyncio.CancelledError:
                raise
            except Exception:  # kept in memory; the next flush writes the segment whole
                log.exception("gateway %s: writing the answer journal failed", self.replica)

    async def _fresh_view(self) -> None:
        """Make sure this replica may answer now: its view is within the lease, or a new
        read succeeds; else 503 (never an answer from a view that may lack a deletion)."""
        if self._closing:
            raise HTTPException(503, "this gateway replica is shutting down; retry")
        if self.view.valid(time.time(), self.fence.lease_s):
            return
        self._timing["expired_views"] += 1
        try:
            await self._refresh(if_expired=True)
        except Exception as e:
            raise HTTPException(
                503,
                f"cannot read the run's deletion log to prove the models clean "
                f"({type(e).__name__}); retry later",
                headers={"Retry-After": "1"},
            ) from None
        if not self.view.valid(time.time(), self.fence.lease_s):
            raise HTTPException(503, "the deletion log read took longer than the lease; retry")

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
        await self._refresh()  # the swap: log then registry, one step (done drops + versions)
        self._stats["executions"] += 1
        self._stats["unlearning_wall_s"] += time.perf_counter() - t0
        if done:  # every record of one batch carries the batch's training seconds
            details = done[0]["history"][-1]["details"]
            compute = float(details.get("train_seconds", 0.0))
            self._stats["unlearning_compute_s"] += compute
            self._stats["unlearning_cpu_s"] += float(details.get("train_cpu_seconds", 0.0))
            if compute > 0:  # a Ray counter refuses a zero increment
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
    @app.post(
        "/v1/predict", response_model=PredictResponse, responses=errors(401, 413, 422, 503, 504)
    )
    async def predict(self, body: PredictRequest, creds: Bearer = None) -> PredictResponse:
        """Answer each instance under the serving policy; the token is needed only with
        protect_predict."""
        self._auth(creds, required=self.settings.protect_predict)
        t0 = time.perf_counter()
        x = self._features(body)
        n = len(x)
        results: list[InstanceOut | None] = [None] * n
        generation: list[int | None] = [None] * n  # the view each result was computed from
        todo, waited = list(range(n)), False
        # Shard outputs this request already has: (shard, version) -> {instance: (C,)
        # probabilities}. A version's output for an instance never changes, so when the view
        # changes only shards serving a version not asked yet are queried again: after a new
        # pending deletion (the common change) the answer is recomputed with no shard call.
        seen: dict[tuple[int, str], dict[int, np.ndarray]] = {}
        until = time.time() + self.settings.wait_timeout_s
        rule = self.ctx.config.unlearning.aggregation
        while True:
            if not todo:
                # The commit point: every result comes from the view held now, within its
                # lease. No await between this check and the return, so an acknowledgement
                # (published only after this replica holds the new view) cannot slip between.
                if self.view.valid(time.time(), self.fence.lease_s) and all(
                    g == self.view.generation for g in generation
                ):
                    break
                todo = [i for i, g in enumerate(generation) if g != self.view.generation]
                self._timing["recomputes"] += bool(todo)
            if time.time() > until:
                raise HTTPException(504, "timed out: the deletion view kept changing")
            t_fresh = time.perf_counter()
            await self._fresh_view()
            self._timing["fresh_view_s"] += time.perf_counter() - t_fresh
            if not todo:
                # Only the lease ran out (every result is of the generation held): the read
                # just done decides at the commit point. Querying the shards with no
                # instance would return (0,) arrays that answer_batch cannot stack (a 500).
                continue
            gen, view = self.view.generation, self.view
            live = sorted(view.versions)
            if not live:
                raise HTTPException(
                    503, "no shard model is live (every shard was emptied by deletions)"
                )
            affected = view.tracker.affected()
            queried = shards_to_query(self.policy, live, affected)
            versions = dict(view.versions)
            missing = [
                k for k in queried if any(j not in seen.get((k, versions[k]), ()) for j in todo)
            ]
            if missing:
                t_query = time.perf_counter()
                got = await self._query(missing, versions, x[todo])
                self._timing["query_s"] += time.perf_counter() - t_query
                self._timing["shard_calls"] += len(missing)
                for k, out in got.items():
                    seen.setdefault((k, versions[k]), {}).update(zip(todo, out, strict=True))
            if self.view.generation != gen:
                self._timing["recomputes"] += 1
                continue  # the view changed while the shards answered: compute again
            probs = {k: np.stack([seen[k, versions[k]][j] for j in todo]) for k in queried}
            answers = answer_batch(
                self.policy,
                rule,
                live,
                affected,
                probs,
                n=len(todo),
                pending=bool(view.tracker.items),
            )
            if any(a.mode == "reject" for a in answers):
                raise HTTPException(
                    503,
                    "the answer depends on data under a pending deletion; retry later",
                    headers={"Retry-After": str(max(1, math.ceil(self.policy.deadline_s)))},
                )
            excluded = [k for k in live if k in affected]
            left = []
            for i, (j, a) in enumerate(zip(todo, answers, strict=True)):
                if a.mode == "wait":
                    left.append(j)
                    continue
                stale = a.mode == "stale"
                voting = {k: versions[k] for k in queried if stale or k not in affected}
                receipt = make_receipt(
                    rule,
                    voting,
                    [] if stale else excluded,
                    {k: probs[k][i] for k in voting},
                    a.label,
                    a.scores,
                )
                results[j] = InstanceOut(
                    label=a.label,
                    probabilities=a.scores,
                    answered="waited" if waited and a.mode == "certified" else a.mode,
                    **receipt,
                )
                generation[j] = gen
            if left:
                waited = True
                t_wait = time.perf_counter()
                await self._wait_for(set(self.tracker.items), until)
                self._timing["wait_s"] += time.perf_counter() - t_wait
            todo = left
        committed_at, first = time.time(), self.journal.answers
        self.journal.append(
            {
                "replica": self.replica,
                "answer": f"{self.replica}/{first + j}",
                "committed_at": committed_at,
                "rule": rule,
                "mode": r.answered,
                "label": r.label,
                "probabilities": r.probabilities if rule != "vote" else None,
                "versions": r.versions,
                "excluded": r.excluded,
                "votes": r.votes,
                "margin": r.margin,
            }
            for j, r in enumerate(results)
        )
        seconds = time.perf_counter() - t0
        self._timing["predicts"] += 1
        self._timing["predict_s"] += seconds
        modes = [r.answered for r in results]
        self.metrics.record(modes, seconds, "waited" if waited else modes[0])
        return PredictResponse(
            predictions=results,
            pending_deletions=len(self.tracker.items),
            latency_ms=seconds * 1000,
            replica=self.replica,
            committed_at=committed_at,
        )

    @app.post("/v1/forget", status_code=202, responses=errors(401, 404, 409, 422, 503))
    async def forget(self, body: ForgetRequest, creds: Bearer = None) -> dict[str, Any]:
        """Log a deletion request by owner id or sample ids; 202 once it is durable and every
        gateway replica is fenced for it. Idempotent by request id."""
        self._auth(creds)
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
        except (StorageError, OSError) as e:
            # not acknowledged: the client must retry (the request id makes that safe)
            raise HTTPException(
                503, f"storage unavailable, the request is not acknowledged ({type(e).__name__})"
            ) from None
        if record.state != RequestState.DONE:
            # submit_request returned after every replica's view held it (this one's too);
            # adding it here only saves waiting for the next read
            self.view.add(record)
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

    @app.get("/v1/forget/{request_id}", responses=errors(401, 404, 503))
    async def forget_status(self, request_id: str, creds: Bearer = None) -> dict[str, Any]:
        """A deletion request's state, timestamps, and the versions it retired and created."""
        self._auth(creds)
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

    @app.get("/v1/audit", responses=errors(401, 404, 422, 503))
    async def audit_endpoint(
        self,
        creds: Bearer = None,
        owner_id: Annotated[str | None, Query(min_length=1, description="Audit one owner.")] = None,
        sample_id: Annotated[
            int | None,
            Query(
                ge=INT64_MIN,
                le=INT64_MAX,
                json_schema_extra={"format": "int64"},
                description="Audit one sample id.",
            ),
        ] = None,
        residue: Annotated[
            bool,
            Query(
                description="Also scan every file under the run for deleted sample ids and "
                "deleted rows' feature bytes (slow on a large run)."
            ),
        ] = False,
    ) -> dict[str, Any]:
        """The queries of `ray-unlearn audit`: one owner (owner_id), one sample (sample_id),
        or neither: every deletion executed so far; residue adds the file scan. Lists the
        live model versions containing the data, the request history and the verdict clean."""
        self._auth(creds)
        if owner_id is not None and sample_id is not None:
            raise HTTPException(
                422, "give owner_id or sample_id (or neither: every deletion), not both"
            )
        from ray_unlearn.api import audit_run

        try:
            return await asyncio.to_thread(
                audit_run, self.ctx, owner=owner_id, sample=sample_id, residue=residue
            )
        except PlanError as e:
            raise HTTPException(404, str(e)) from None
        except (StorageError, OSError) as e:
            raise HTTPException(
                503, f"cannot read the run's storage ({type(e).__name__}); retry"
            ) from None

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
        """This replica's counters and timings, as JSON, for benchmarks and a quick look (the
        answer counts are also Ray metrics, summed over replicas in Prometheus)."""
        return {
            "replica": self.replica,
            "policy": self.policy.model_dump(),
            "answers": dict(self.metrics.counts),
            "exposure": self.metrics.counts.get("stale", 0),
            "pending_deletions": len(self.tracker.items),
            "versions": {str(k): v for k, v in self.versions.items()},
            **self._stats,
            "timing": dict(self._timing),
        }
