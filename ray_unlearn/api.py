"""The Python API: what the ``ray-unlearn`` command does, for programs that embed the platform.

Every function returns the same JSON-able document the command prints with ``--json``, and
raises the platform's input errors (:class:`ValueError` and its subclasses ``ConfigError``,
``DataError``, ``RunError``, ...) on bad input, before anything is changed. Heavy modules
(torch, Ray) are imported inside the functions, so ``import ray_unlearn`` stays cheap.

    import ray_unlearn as ru

    run = ru.train("configs/digits.yaml", ["partition.shards=4"])
    req = ru.forget(run["run_id"], owner="owner-00017")
    assert ru.audit(run["run_id"], owner="owner-00017")["clean"]

``storage`` is the storage root (a local folder or a ``pyarrow.fs`` URI such as
``s3://bucket/prefix``); it defaults to ``RAY_UNLEARN_STORAGE`` or ``./runs``. ``address``
names a Ray cluster to attach to (default ``RAY_ADDRESS``; none starts an embedded Ray).
"""

from __future__ import annotations

import errno
import os
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["audit", "forget", "scores", "serve", "status", "sweep", "train"]


def _storage(storage: str | None) -> str:
    return storage or os.environ.get("RAY_UNLEARN_STORAGE") or "./runs"


def _check_writable(root: str) -> None:
    """Raise, writing nothing, the ``OSError`` the first write under a local storage root
    would meet: a path under a file, a directory this process may not write (or on a
    read-only file system). An object-store URI is left to its first write."""
    if "://" in root and not root.startswith("file://"):
        return
    path = Path(root.removeprefix("file://")).expanduser().absolute()
    probe = path
    while not probe.exists():  # the nearest existing ancestor is where mkdir would start
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))


def train(
    config: str | Path,
    overrides: Sequence[str] = (),
    *,
    run_id: str | None = None,
    storage: str | None = None,
    address: str | None = None,
    on_created: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """Create a run from a YAML config (plus ``key=value`` overrides) and train it as a Ray
    Train job; every slice version is recorded. Returns the run's summary, ``run_id`` among
    it. The storage root is ``storage`` if given, else ``RAY_UNLEARN_STORAGE`` if set, else
    the config's ``storage``. ``on_created`` gets the run context once the run exists
    (before training starts)."""
    from ray_unlearn.platform.core.config import load_config

    # validated before torch and Ray are imported: a typo is reported in well under a second
    cfg = load_config(config, list(overrides))
    from ray_unlearn.platform.core.run import create_run
    from ray_unlearn.platform.eval.accuracy import serving_accuracy
    from ray_unlearn.train.job import check_gpu_request, run_training
    from ray_unlearn.train.session import connect

    root = storage or os.environ.get("RAY_UNLEARN_STORAGE")
    if root:
        cfg = cfg.model_copy(update={"storage": root})
    t0 = time.perf_counter()
    check_gpu_request(cfg)  # config alone (no Ray): device=cuda needs GPUs per worker
    if cfg.resources.gpus_per_worker > 0:
        connect(address)  # GPUs are checked against the cluster before anything is written
        check_gpu_request(cfg, against_cluster=True)
    ctx = create_run(cfg, run_id)
    if on_created is not None:
        on_created(ctx)
    attached = connect(address)
    summary = run_training(ctx)
    acc = serving_accuracy(ctx)
    return {
        **summary,
        "run_id": ctx.run_id,
        "storage": ctx.storage.uri,
        "attached_cluster": attached,
        "test_accuracy": acc,
        "shards": cfg.partition.shards,
        "slices": cfg.partition.slices,
        "num_train": ctx.info["num_train"],
        "seconds": time.perf_counter() - t0,
    }


def forget(
    run: str,
    *,
    owner: str | None = None,
    samples: Sequence[int] | None = None,
    request_id: str | None = None,
    deadline_s: float | None = None,
    wait: bool = True,
    strategy: str | None = None,
    storage: str | None = None,
    address: str | None = None,
    on_logged: Callable[[Any, bool], None] | None = None,
    on_lease_wait: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """Log a deletion request durably (it is acknowledged only once every serving gateway
    is fenced), then, unless ``wait=False``, execute every unfinished request: on the
    cluster's executor with ``address``, else in this process. Give exactly one of
    ``owner`` or ``samples``; ``request_id`` is an idempotency key. ``strategy`` overrides
    the run's ``unlearning.strategy`` for this execution; the method checks it fits the run
    before anything is logged. ``on_logged(record, created)`` is told once the request is
    logged (``record.request.request_id``, ``record.request.sample_ids``,
    ``record.state.value``).

    With ``address`` and a running executor for the run, the whole request (checks, log,
    execution) happens in that executor, which has the run open and its shards in memory:
    this process reads nothing of the run but the executor's control file, and calls it over
    HTTP without importing Ray (or through Ray when the endpoint does not answer). With
    ``wait=False`` too the executor logs the request (and does not execute it) when its
    endpoint answers; otherwise this process logs it, without Ray, as without ``address``."""
    if (owner is None) == (samples is None):
        raise ValueError("give exactly one of owner (--owner) or samples (--samples)")
    check_wait(wait, strategy)
    t0 = time.perf_counter()
    ids = list(samples) if samples is not None else None
    deadline = time.time() + deadline_s if deadline_s is not None else None
    if address:
        doc = _forget_on_running_executor(
            run, storage, address, owner, ids, request_id, deadline, strategy, on_logged, wait
        )
        if doc is not None:
            return {**doc, "seconds": time.perf_counter() - t0}

    from ray_unlearn.platform.core.engine import submit_request
    from ray_unlearn.platform.core.run import open_run
    from ray_unlearn.platform.methods import check_request

    ctx = open_run(_storage(storage), run)
    check_request(ctx, strategy, owner, ids)  # the methods' own checks, before anything is logged
    record, created = submit_request(
        ctx, owner_id=owner, sample_ids=ids, request_id=request_id, deadline=deadline
    )
    rid = record.request.request_id
    if on_logged is not None:
        on_logged(record, created)
    ack_s = time.perf_counter() - t0
    if wait and record.state.value != "done":
        if address:
            # A cluster without the run's executor yet: start it (it loads every shard once;
            # later requests attach to it above).
            from ray_unlearn.train.executor import get_executor
            from ray_unlearn.train.session import connect

            connect(address)
            get_executor(ctx.storage.uri, run, detached=True).execute_pending(strategy)
        else:
            # No cluster: this one process does the work, loading only the affected shards.
            from ray_unlearn.platform.core.engine import LocalShards, UnlearningEngine

            engine = UnlearningEngine(ctx, LocalShards(ctx), executor_name="cli")
            if on_lease_wait is not None:
                engine.on_lease_wait = on_lease_wait
            engine.execute_pending(strategy)
    final = ctx.deletion_log.get(rid)
    return {
        **forget_document(run, record, final, created, ack_s),
        "seconds": time.perf_counter() - t0,
    }


def check_wait(wait: bool, strategy: str | None) -> None:
    """Refuse (ValueError) a strategy for a request that is not executed now."""
    if strategy is not None and not wait:
        raise ValueError(
            "strategy (--strategy) applies to an execution now; without waiting (--no-wait) "
            "the request is executed later with the run's unlearning.strategy (or the "
            "executor's): drop one of them"
        )


def forget_document(run: str, record, final, created: bool, ack_s: float) -> dict[str, Any]:
    """:func:`forget`'s document (less ``seconds``) from the record as logged and as it is now."""
    return {
        "run_id": run,
        "request_id": final.request.request_id,
        "created": created,
        "state": final.state.value,
        "samples": len(final.request.sample_ids),
        "logged_state": record.state.value,
        "ack_seconds": ack_s,
        **record_summary(final),
    }


def _absolute_root(storage: str | None) -> str:
    """The storage root as :class:`~ray_unlearn.platform.core.storage.Storage` names it (a
    local folder made absolute: another process resolves it), without importing pyarrow."""
    root = _storage(storage)
    if "://" in root and not root.startswith("file://"):
        return root
    local = root[len("file://") :] if root.startswith("file://") else root
    return str(Path(local).expanduser().resolve()).rstrip("/")


def _forget_on_running_executor(
    run, storage, address, owner, ids, request_id, deadline, strategy, on_logged, wait=True
) -> dict[str, Any] | None:
    """The whole request in the run's running executor (see :func:`forget`); None when the
    cluster has none (the caller then logs here and starts one).

    Through the executor's control endpoint when the run's storage names one that answers
    (``ray_unlearn.train.control``: no ``import ray`` here, no Ray connection), else through
    Ray. The same method runs the request either way (``Executor.forget_request``), and its
    input errors come back as the same ``ValueError`` / ``OSError``. Without ``wait`` only
    the endpoint is tried (an executor from before ``wait`` existed counts as none): logging
    here is as cheap as connecting to Ray, and is what ``--no-wait`` always did."""
    from types import SimpleNamespace

    from ray_unlearn.train.control import find_executor

    root = _absolute_root(storage)
    fields = {
        "owner_id": owner,
        "sample_ids": ids,
        "request_id": request_id,
        "deadline": deadline,
        "strategy": strategy,
    }
    endpoint = find_executor(root, run)
    if endpoint is not None and (wait or endpoint.accepts("wait")):
        # wait is sent only when false: an executor of any release takes the default
        doc = endpoint.forget_request(root, **fields, **({} if wait else {"wait": False}))
    elif not wait:
        return None
    else:
        doc = _forget_through_ray(run, address, root, fields)
        if doc is None:
            return None
    if on_logged is not None:
        logged = SimpleNamespace(
            request=SimpleNamespace(request_id=doc["request_id"], sample_ids=range(doc["samples"])),
            state=SimpleNamespace(value=doc["logged_state"]),
        )
        on_logged(logged, doc["created"])
    return doc


def _forget_through_ray(run, address, root, fields) -> dict[str, Any] | None:
    """``forget_request`` on the run's executor actor, found by name on the cluster at
    ``address``; None when there is none."""
    import ray

    from ray_unlearn.train.session import connect, running_executor

    connect(address)
    handle = running_executor(run)
    if handle is None:
        return None
    try:
        return ray.get(handle.forget_request.remote(root, **fields))
    except ray.exceptions.RayTaskError as e:
        # bad input found in the executor (an unknown owner, a strategy that does not fit):
        # the same error as without a cluster, not Ray's wrapper with the remote traceback
        if isinstance(e.cause, ValueError | OSError):
            raise e.cause from None
        raise


def record_summary(rec) -> dict[str, Any]:
    """What a deletion record says about its execution, as plain JSON-able values."""
    d = rec.details or {}
    return {
        "executed_by": rec.executed_by,
        "strategy": d.get("strategy"),
        "shards": d.get("shards", []),
        "first_slices": d.get("first_slices", {}),
        "versions_retired": rec.versions_retired,
        "versions_created": rec.versions_created,
        "unlearn_seconds": d.get("seconds"),
        "history": [{"state": h["state"], "at": h["at"]} for h in rec.history],
    }


def status(run: str, request_id: str, *, storage: str | None = None) -> dict[str, Any]:
    """A deletion request's state, timestamps and the versions it retired and created."""
    from ray_unlearn.platform.core.run import open_run

    rec = open_run(_storage(storage), run).deletion_log.get(request_id)
    return {
        "run_id": run,
        "request_id": request_id,
        "state": rec.state.value,
        "samples": len(rec.request.sample_ids),
        "owner_id": rec.request.owner_id,
        "received_at": rec.request.received_at,
        "deadline": rec.request.deadline,
        "done_at": rec.done_at,
        **record_summary(rec),
    }


def audit(
    run: str,
    *,
    owner: str | None = None,
    sample: int | None = None,
    residue: bool = False,
    storage: str | None = None,
) -> dict[str, Any]:
    """The live model versions that contain an owner's or a sample's data (or, with neither,
    any executed deletion's), the request history and a verdict ``clean``. With ``residue``,
    also scan every file under the run for deleted ids and deleted rows' bytes."""
    from ray_unlearn.platform.core.run import open_run

    return audit_run(open_run(_storage(storage), run), owner=owner, sample=sample, residue=residue)


def audit_run(
    ctx: Any, *, owner: str | None = None, sample: int | None = None, residue: bool = False
) -> dict[str, Any]:
    """:func:`audit` of an open run (``RunContext``): the CLI and the gateway's /v1/audit."""
    from ray_unlearn.platform.core.audit import audit as run_audit

    doc = run_audit(ctx, owner_id=owner, sample_id=sample)
    if residue:
        from ray_unlearn.platform.core.compaction import outside_sources, waiting_for_compaction
        from ray_unlearn.platform.core.residue import scan_residue

        scan = scan_residue(ctx)
        scan["waiting_for_compaction"] = waiting_for_compaction(ctx)
        scan["users_to_erase"] = outside_sources(ctx)
        doc["residue"] = scan
        doc["clean"] = doc["clean"] and scan["clean"]
    return doc


def serve(
    run: str,
    *,
    policy: str = "lazy-wait",
    host: str = "127.0.0.1",
    port: int = 8000,
    protect_predict: bool = False,
    storage: str | None = None,
    address: str | None = None,
) -> dict[str, Any]:
    """Deploy the run's Ray Serve application (shard deployments + the ERASER gateway) and
    return once it answers; it serves while this Ray session (or the cluster) lives.
    Stop it with ``ray.serve.shutdown()``."""
    from ray_unlearn.platform.core.run import open_run
    from ray_unlearn.platform.serving.policies import get_policy

    ctx = open_run(_storage(storage), run)
    get_policy(policy)
    from ray import serve as ray_serve

    from ray_unlearn.serve.app import build_app
    from ray_unlearn.train.session import connect, dashboard_url

    connect(address)
    ray_serve.start(http_options={"host": host, "port": port})
    t0 = time.perf_counter()
    ray_serve.run(
        build_app(
            {
                "storage": ctx.storage.uri,
                "run_id": run,
                "policy": policy,
                "protect_predict": protect_predict,
            }
        ),
        name="ray-unlearn",
        route_prefix="/",
    )
    url = f"http://{host}:{port}"
    return {
        "run_id": run,
        "url": url,
        "policy": policy,
        "docs": f"{url}/docs",
        "startup_seconds": time.perf_counter() - t0,
        "token_configured": bool(os.environ.get("RAY_UNLEARN_API_TOKEN")),
        # where `serve status --address` / the dashboard are (None when attached to a
        # cluster: its own dashboard address applies)
        "dashboard": dashboard_url(),
    }


def sweep(
    config: str | Path | Any, overrides: Sequence[str] = (), *, address: str | None = None
) -> dict[str, Any]:
    """Run a Ray Tune sweep from a sweep YAML (plus overrides) or a loaded ``SweepSpec``:
    every trial trains, streams deletions while serving, and is logged to MLflow; returns
    the trials, the Pareto front and the chosen config."""
    from ray_unlearn.tune.spec import load_sweep

    # validated before torch and Ray are imported: a typo is reported in well under a second
    spec = load_sweep(config, list(overrides)) if isinstance(config, str | Path) else config
    _check_writable(spec.base["storage"])  # a sweep writes its first file after Ray started
    from ray_unlearn.train.session import connect
    from ray_unlearn.tune.sweep import preflight, run_sweep

    preflight(spec)
    connect(address)
    return run_sweep(spec)


def scores(
    run: str,
    names: Sequence[str] = (),
    *,
    compute: bool = False,
    models: int = 32,
    keep: float = 0.7,
    top: int = 10,
    storage: str | None = None,
    address: str | None = None,
    on_model_done: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Memorization scores of the run's training rows: each score in ``names`` (default: the
    run's ``rum.score``) is read from the run's reports, or computed and stored first when
    the run has none yet or ``compute`` is set. The proxies (``confidence``,
    ``max_confidence``, ``entropy``, ``binary_accuracy``) and ``holdout_kl`` train one model
    in this process; ``exact`` (Feldman's estimator) trains ``models`` subset models, each
    on a ``keep`` fraction of the rows, as Ray tasks (``on_model_done(done, total)`` after
    each). Returns per score: its direction, cost, file, and the ``top`` most memorized
    training samples (memorization: higher = more memorized, whatever the score's sign)."""
    import numpy as np

    from ray_unlearn.platform.core.run import open_run
    from ray_unlearn.platform.methods.rum import memorization as mem

    ctx = open_run(_storage(storage), run)
    names = list(dict.fromkeys(names)) or [ctx.config.rum.score]
    unknown = [n for n in names if n not in mem.DIRECTION]
    if unknown:
        from ray_unlearn.platform.core.config_errors import did_you_mean

        raise ValueError(
            f"--score {', '.join(unknown)}: unknown; known scores: {', '.join(mem.SCORES)}"
            + did_you_mean(unknown[0], list(mem.SCORES))
        )
    if "exact" in names:
        mem.check_estimator(models, keep)  # raises, naming the setting
    if top < 0:
        raise ValueError(f"--top must be 0 or more, got {top}")
    missing = [n for n in names if compute or not ctx.storage.exists(mem.scores_path(ctx, n))]
    cost: dict[str, float] = {}
    if missing:
        runner = mem.exact_memorization
        if "exact" in missing:
            import functools

            from ray_unlearn.train.memorization import exact_memorization_ray
            from ray_unlearn.train.session import connect

            connect(address)
            runner = functools.partial(exact_memorization_ray, on_done=on_model_done)
        cost = mem.compute_run_scores(ctx, missing, models=models, keep=keep, exact_runner=runner)
    train = ctx.split_records("train")
    owner_of = dict(zip(train.sample_ids.tolist(), train.owner_ids.tolist(), strict=True))
    out = []
    for name in names:
        ids, vals = mem.load_scores(ctx, name)
        memo = mem.as_memorization(name, vals)
        order = np.argsort(-memo, kind="stable")[:top]
        meta = ctx.storage.read_table(mem.scores_path(ctx, name)).schema.metadata or {}
        out.append(
            {
                "score": name,
                "direction": mem.DIRECTION[name],
                "samples": len(ids),
                "computed_now": name in missing,
                "seconds": cost.get(name, float(meta.get(b"seconds", b"nan"))),
                "file": mem.scores_path(ctx, name),
                "mean_memorization": float(np.mean(memo)) if len(memo) else None,
                "most_memorized": [
                    {
                        "sample_id": int(ids[i]),
                        "owner_id": owner_of.get(int(ids[i])),
                        "memorization": float(memo[i]),
                    }
                    for i in order
                ],
            }
        )
    return {"run_id": run, "storage": ctx.storage.uri, "scores": out}


class _CallablePackage(types.ModuleType):
    """A subpackage that is also the API function of the same name.

    ``ray_unlearn.train`` and ``ray_unlearn.serve`` are the Ray layers' subpackages *and*
    the package's ``train`` / ``serve`` functions. Importing a submodule makes Python bind
    the subpackage as the parent's attribute, which would hide the function
    (``ru.train(...)`` -> "module is not callable"). So the subpackage module itself is
    callable and forwards to the function: ``ru.train(...)``, ``import ray_unlearn.train.job``
    and ``import ray_unlearn.train as t`` all work, in any order.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__api_function__(*args, **kwargs)

    @property
    def __signature__(self):  # inspect.signature / help show the function's parameters
        import inspect

        return inspect.signature(self.__api_function__)


def _make_callable(package: types.ModuleType, function: Callable[..., Any]) -> None:
    """Turn ``package`` into a :class:`_CallablePackage` that calls ``function`` (module
    ``__class__`` assignment: Python's documented way to customise a module)."""
    package.__api_function__ = function
    package.__class__ = _CallablePackage
