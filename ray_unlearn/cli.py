"""The ray-unlearn command: train, forget, status, audit, compact, scores, strategies, serve,
sweep, demo.

Every command takes ``--json`` and then prints exactly one JSON document on stdout
(everything else, Ray's output included, goes to stderr), so scripts can drive it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, Group
from rich.table import Table


def _argument_type(self, ctx):
    """An argument's help shows its metavar alone, as an option's does: typer would append
    the Python type (``KEY=VALUE <list[str]>``), which tells a user nothing."""
    return None if self.metavar is not None else self.display_type(ctx)


typer.core.TyperArgument.display_type_rich = _argument_type

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0], rich_markup_mode=None
)
err = Console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
StorageOpt = Annotated[
    str,
    typer.Option(
        "--storage",
        metavar="ROOT",
        envvar="RAY_UNLEARN_STORAGE",
        help="Storage root (local dir or pyarrow.fs URI).",
    ),
]
AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address",
        metavar="ADDRESS",
        envvar="RAY_ADDRESS",
        help="Ray cluster to attach to; none = embedded local Ray.",
    ),
]
ConfigStorageOpt = Annotated[
    str | None,
    typer.Option(
        "--storage",
        metavar="ROOT",
        envvar="RAY_UNLEARN_STORAGE",
        help="Storage root (local dir or pyarrow.fs URI); default: the config's storage.",
    ),
]
RunOpt = Annotated[
    str, typer.Option("--run", metavar="RUN_ID", help="Run id (printed by `ray-unlearn train`).")
]


def _version(value: bool) -> None:
    if value:
        from ray_unlearn import __version__

        typer.echo(f"ray-unlearn {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Machine unlearning on Ray: train, forget, serve, audit, sweep."""


class _Output:
    """Where results go: a JSON document on the real stdout, or tables for people."""

    def __init__(self, as_json: bool):
        self.as_json = as_json
        self._stdout_fd: int | None = None

    def __enter__(self) -> _Output:
        if self.as_json:
            # Keep stdout for the one JSON document: Ray, torch and workers print freely.
            sys.stdout.flush()
            self._stdout_fd = os.dup(1)
            os.dup2(2, 1)
        return self

    def __exit__(self, *exc) -> None:
        if self._stdout_fd is not None:
            sys.stdout.flush()
            os.dup2(self._stdout_fd, 1)
            os.close(self._stdout_fd)
            self._stdout_fd = None

    def emit(self, doc: dict[str, Any], table: Any = None) -> None:
        if self.as_json:
            os.write(self._stdout_fd, (json.dumps(doc, default=_jsonable) + "\n").encode())
        elif table is not None:
            Console().print(table)
        else:
            Console().print_json(json.dumps(doc, default=_jsonable))


def _jsonable(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.integer | np.floating):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, set):
        return sorted(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _fail(out: _Output, message: str, code: int = 2, problems: list | None = None) -> None:
    if out.as_json:
        out.emit({"error": message, **({"problems": problems} if problems else {})})
    # soft_wrap: a long line stays one line (copyable), not folded at the terminal width
    from rich.markup import escape

    err.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


@contextlib.contextmanager
def _errors(out: _Output):
    """Turn the platform's input errors into a message and exit code 2 (no traceback).

    Every input error of the platform (ConfigError, DataError, DeletionLogError, PlanError,
    RunError) is a ValueError, caught as such: nothing is imported here, so a bad config is
    reported before torch or Ray are (validation takes a fraction of a second, those imports
    seconds) and ``forget --address`` attached to a running executor imports nothing of the
    platform (nor Ray, when the executor's control endpoint answers)."""
    try:
        yield
    except ValueError as e:
        _fail(out, str(e), problems=getattr(e, "problems", None))
    except OSError as e:  # a storage root that cannot be read or written
        where = f" {e.filename}" if e.filename else ""
        _fail(out, f"storage{where}: {e.strerror or e} (check --storage / RAY_UNLEARN_STORAGE)")


@app.command()
def train(
    config: Annotated[
        Path, typer.Option("--config", "-c", metavar="FILE", help="YAML config (see configs/).")
    ],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(metavar="KEY=VALUE", help="key=value overrides, e.g. partition.shards=8"),
    ] = None,
    run_id: Annotated[
        str | None,
        typer.Option(metavar="RUN_ID", help="Run id to use (default: <name>-<time>-<rand>)."),
    ] = None,
    storage: ConfigStorageOpt = None,
    address: AddressOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train a sharded, sliced ensemble as a Ray Train job and record every slice version."""
    from ray_unlearn import api

    def created(ctx) -> None:
        cfg = ctx.config
        err.print(
            f"run [bold]{ctx.run_id}[/bold] under {ctx.storage.uri}: {cfg.partition.shards} "
            f"shards x {cfg.partition.slices} slices, {ctx.info['num_train']} training samples"
        )

    with _Output(as_json) as out, _errors(out):
        doc = api.train(
            config,
            overrides or [],
            run_id=run_id,
            storage=storage,
            address=address,
            on_created=created,
        )
        if not doc.get("attached_cluster"):
            _shutdown_embedded_ray()
        # one row per field: a run id (what every later command takes) is never cut, at
        # any terminal width
        table = Table(title="trained", show_header=False)
        table.add_column("field", style="bold")
        table.add_column("value", no_wrap=True)
        for field, value in (
            ("run id", doc["run_id"]),
            ("shards x slices", f"{doc['shards']} x {doc['slices']}"),
            ("workers", str(doc["workers"])),
            ("train s", f"{doc['train_seconds']:.1f}"),
            ("test accuracy", f"{doc['test_accuracy']:.4f}"),
        ):
            table.add_row(field, value)
        out.emit(doc, table)


def _shutdown_embedded_ray() -> None:
    """End this process's embedded Ray before printing the result: Ray prints the worker
    lines it held back ("[repeated Nx across cluster]") when it shuts down, which would
    otherwise come after the table."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _parse_ids(samples: str) -> list[int]:
    try:
        return [int(s) for s in samples.split(",") if s.strip()]
    except ValueError:
        raise ValueError(
            f"--samples takes comma-separated integer sample ids, got {samples!r}"
        ) from None


@app.command()
def forget(
    run: RunOpt,
    owner: Annotated[
        str | None,
        typer.Option("--owner", metavar="OWNER_ID", help="Forget every sample of this owner."),
    ] = None,
    samples: Annotated[
        str | None,
        typer.Option("--samples", metavar="IDS", help="Comma-separated sample ids to forget."),
    ] = None,
    request_id: Annotated[
        str | None,
        typer.Option(metavar="ID", help="Idempotency key: a repeated id is not executed twice."),
    ] = None,
    deadline_s: Annotated[
        float | None,
        typer.Option(
            metavar="SECONDS", help="Seconds from now by which the deletion must be done."
        ),
    ] = None,
    no_wait: Annotated[
        bool,
        typer.Option("--no-wait", help="Log the request durably and return without executing it."),
    ] = False,
    strategy: Annotated[
        str | None,
        typer.Option(
            metavar="NAME",
            help="Strategy for this execution, which takes every request still unfinished "
            "as one batch (see `ray-unlearn strategies`); default: the run's "
            "unlearning.strategy.",
        ),
    ] = None,
    storage: StorageOpt = "./runs",
    address: AddressOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Log a deletion request durably, then execute it (retrain only the affected shards)."""
    from ray_unlearn import api

    def lease_wait(rec) -> None:
        from ray_unlearn.platform.core.lease import describe

        err.print(f"another execution holds run {run}'s lease: {describe(rec)}; waiting")

    def logged(record, created: bool) -> None:
        err.print(
            f"request [bold]{record.request.request_id}[/bold] "
            f"{'logged' if created else 'already logged'} "
            f"({len(record.request.sample_ids)} samples, state {record.state.value})"
        )
        if not no_wait and record.state.value not in ("done", "failed"):
            working.start(f"executing request {record.request.request_id} (retraining)")

    with _Output(as_json) as out, _errors(out), _Working(as_json) as working:
        if (owner is None) == (samples is None):
            raise ValueError("give exactly one of --owner or --samples")
        doc = api.forget(
            run,
            owner=owner,
            samples=_parse_ids(samples) if samples is not None else None,
            request_id=request_id,
            deadline_s=deadline_s,
            wait=not no_wait,
            strategy=strategy,
            storage=storage,
            address=address,
            on_logged=logged,
            on_lease_wait=lease_wait,
        )
        working.stop()  # before the table: the spinner's line is cleared first
        out.emit(doc, _request_table(doc))
    _leave_ray()


def _leave_ray() -> None:
    """Disconnect from Ray now if this command connected: Ray's own exit hook sleeps 0.5 s
    first (for log lines still in flight), which a command that is done need not wait."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


class _Working:
    """A spinner with the elapsed seconds on stderr while a command waits on long work (a
    retraining): a person sees it is alive. Only on a terminal and without --json; gone
    (transient) when the work ends, before the result is printed."""

    def __init__(self, as_json: bool):
        self._on = not as_json and err.is_terminal
        self._progress = None

    def start(self, what: str) -> None:
        if not self._on or self._progress is not None:
            return
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
            console=err, transient=True,
        )  # fmt: skip
        self._progress.add_task(what, total=None)
        self._progress.start()

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> _Working:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _request_table(doc: dict[str, Any]) -> Table:
    """One row; "total s" (this command's own wall time) only for a command that did the
    work, not for `status`, which only reads the log."""
    t = Table(title=f"request {doc['request_id']}")
    cols = ["state", "samples", "shards", "retired", "created", "unlearn s"]
    if "seconds" in doc:
        cols.append("total s")
    for col in cols:
        t.add_column(col)
    us = doc.get("unlearn_seconds")
    row = [
        doc["state"],
        str(doc["samples"]),
        ",".join(map(str, doc.get("shards") or [])) or "-",  # a pending request: not yet known
        str(len(doc.get("versions_retired", []))),
        str(len(doc.get("versions_created", []))),
        f"{us:.2f}" if us is not None else "-",
    ]
    if "seconds" in doc:
        row.append(f"{doc['seconds']:.2f}")
    t.add_row(*row)
    return t


@app.command()
def status(
    run: RunOpt,
    request_id: Annotated[str, typer.Option(metavar="ID", help="The request to show.")],
    storage: StorageOpt = "./runs",
    as_json: JsonOpt = False,
) -> None:
    """Show a deletion request's state, timestamps and retired versions."""
    from ray_unlearn import api

    with _Output(as_json) as out, _errors(out):
        doc = api.status(run, request_id, storage=storage)
        out.emit(doc, _request_table(doc))


@app.command()
def audit(
    run: RunOpt,
    owner: Annotated[
        str | None, typer.Option("--owner", metavar="OWNER_ID", help="Audit one owner.")
    ] = None,
    sample: Annotated[
        int | None, typer.Option("--sample", metavar="SAMPLE_ID", help="Audit one sample id.")
    ] = None,
    residue: Annotated[
        bool,
        typer.Option(
            "--residue",
            help="Also scan every file under the run for deleted sample ids and deleted rows' "
            "feature bytes (exit 1 on a find); shows what waits for compaction and the data "
            "source outside the run that is the user's to erase.",
        ),
    ] = False,
    storage: StorageOpt = "./runs",
    as_json: JsonOpt = False,
) -> None:
    """List the live model versions containing the data, and the request history."""
    from ray_unlearn import api

    with _Output(as_json) as out, _errors(out):
        doc = api.audit(run, owner=owner, sample=sample, residue=residue, storage=storage)
        t = Table(title=f"audit of {owner or sample or 'all executed deletions'} in {run}")
        for col in (
            "live versions containing it",
            "requests",
            "pending",
            "deleted samples",
            "verdict",
        ):
            t.add_column(col)
        live = doc["live_versions_containing"]
        t.add_row(
            ", ".join(sorted(live)) or "none",
            str(len(doc["requests"])),
            str(doc["pending_requests"]),
            str(doc["deleted_sample_count"]),
            _audit_verdict(doc),
        )
        out.emit(doc, _residue_table(doc["residue"], t) if residue else t)
        if not doc["clean"]:
            raise typer.Exit(1)


def _audit_verdict(doc: dict[str, Any]) -> str:
    """The human verdict says what --json says: clean only when no live version holds the
    data, every request is done, and every live version is exact."""
    if not doc["clean"]:
        return f"VIOLATION {doc['violations'] or {'stray': doc['stray_violations']}}"
    notes = []
    if doc["pending_requests"]:
        notes.append(f"pending: {doc['pending_requests']} request(s) not executed yet")
    if not doc.get("exact", True):
        approx = doc.get("approximate_live_versions") or []
        notes.append(f"approximate: {len(approx)} live version(s) changed by an approximate update")
    return "clean" if not notes else "clean so far; " + "; ".join(notes)


def _residue_table(doc: dict[str, Any], audit_table: Table) -> Group:
    t = Table(
        title=f"residue scan: {doc['files_scanned']} files, {doc['deleted_samples']} deleted samples"
    )
    for col in ("file", "kind", "count"):
        t.add_column(col)
    for f in doc["finds"]:
        t.add_row(f["file"], f["kind"], str(f["count"]))
    for a in doc["allowed"]:
        t.add_row(a["file"], f"allowed: {a['why']}", "-")
    wait = doc["waiting_for_compaction"]
    if wait["rows_waiting"]:
        t.add_row(
            wait["copy"], f"waiting for compaction ({wait['mode']})", str(wait["rows_waiting"])
        )
    for u in doc["users_to_erase"]:
        t.add_row(u["path"], "outside the run: the user's to erase", str(u["deleted_rows"]))
    verdict = "residue: clean" if doc["clean"] else f"residue: {len(doc['finds'])} finds"
    return Group(audit_table, t, verdict)


@app.command()
def compact(
    run: RunOpt,
    storage: StorageOpt = "./runs",
    as_json: JsonOpt = False,
) -> None:
    """Rewrite the run's own copy of its data without the rows of done deletions."""
    from ray_unlearn.platform.core.compaction import compact as compact_run
    from ray_unlearn.platform.core.run import open_run

    with _Output(as_json) as out, _errors(out):
        ctx = open_run(storage, run)
        doc = {"run_id": run, **compact_run(ctx)}
        if doc["copy"] is None:
            _fail(
                out,
                f"run {run} has no copy of its data (made before run copies): nothing to compact",
            )
        t = Table(title=f"compaction of {run}")
        for col in ("copy", "rows removed", "rows left"):
            t.add_column(col)
        t.add_row(doc["copy"], str(doc["rows_removed"]), str(doc["rows"]))
        out.emit(doc, t)


@app.command("verify-exposure")
def verify_exposure(
    run: RunOpt,
    journal: Annotated[
        Path | None,
        typer.Option(
            "--journal",
            metavar="FILE",
            help="A JSON-lines file of answer receipts to check (default: the run's own "
            "answer journal, every gateway replica).",
        ),
    ] = None,
    storage: StorageOpt = "./runs",
    as_json: JsonOpt = False,
) -> None:
    """Replay answers against the manifests and the deletion log; exit 1 on a violation:
    an answer committed after a deletion was acknowledged that came from a version holding
    its samples, or whose certificate does not hold for the shards it excluded."""
    from ray_unlearn.platform.core.run import open_run
    from ray_unlearn.platform.serving.journal import read_journal, read_journal_file
    from ray_unlearn.platform.serving.receipts import replay

    with _Output(as_json) as out, _errors(out):
        ctx = open_run(storage, run)
        if journal is not None:
            try:
                answers = read_journal_file(str(journal))
            except OSError as e:
                raise ValueError(f"--journal {journal}: cannot read it ({e.strerror})") from None
        else:
            answers = read_journal(ctx.storage, ctx.layout)
        try:
            doc = replay(ctx, answers)
        except (KeyError, TypeError) as e:
            raise ValueError(f"an answer record lacks a field or has a bad one: {e}") from None
        t = Table(title=f"exposure replay of {run}")
        for col in ("answers", "acknowledged deletions", "versions checked", "violations"):
            t.add_column(col)
        t.add_row(
            str(doc["answers"]),
            str(doc["promises"]),
            str(doc["versions_checked"]),
            str(doc["n_violations"]),
        )
        out.emit(doc, t)
        if not as_json:
            for v in doc["violations"][:20]:
                err.print(f"[red]violation[/red] {v['answer']} ({v['mode']}): {v['reasons']}")
        if not doc["clean"]:
            raise typer.Exit(1)


@app.command()
def strategies(as_json: JsonOpt = False) -> None:
    """List the registered unlearning strategies."""
    from ray_unlearn.platform.methods import registry

    with _Output(as_json) as out:
        rows = registry.listing()
        t = Table(title="unlearning strategies")
        for col in ("name", "exact", "description"):
            t.add_column(col)
        for r in rows:
            t.add_row(r["name"], str(r["exact"]), r["description"])
        out.emit({"strategies": rows}, t)


@app.command()
def serve(
    run: RunOpt,
    policy: Annotated[
        str,
        typer.Option(metavar="NAME", help="Serving policy preset (see `ray-unlearn policies`)."),
    ] = "lazy-wait",
    host: Annotated[
        str,
        typer.Option(metavar="HOST", help="Address to bind; 127.0.0.1 keeps it on this machine."),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(metavar="PORT", help="HTTP port.")] = 8000,
    protect_predict: Annotated[
        bool, typer.Option(help="Require the bearer token on /v1/predict too.")
    ] = False,
    detach: Annotated[
        bool, typer.Option(help="Deploy and return (needs a cluster: --address).")
    ] = False,
    storage: StorageOpt = "./runs",
    address: AddressOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Serve predictions with ERASER gating, plus /v1/forget, /v1/audit, /v1/stats (HTTP)."""
    from ray_unlearn import api

    with _Output(as_json) as out, _errors(out):
        if detach and not address:
            raise ValueError(
                "--detach needs a running cluster (--address or RAY_ADDRESS): an embedded Ray "
                "ends with this process"
            )
        doc = api.serve(
            run,
            policy=policy,
            host=host,
            port=port,
            protect_predict=protect_predict,
            storage=storage,
            address=address,
        )
        url = doc["url"]
        if not doc["token_configured"]:
            err.print(
                "[yellow]RAY_UNLEARN_API_TOKEN is not set: /v1/forget and /v1/audit will answer 503[/yellow]"
            )
        out.emit(doc)
        if detach:
            return
        err.print(f"serving {run} at {url} (policy {policy}); Ctrl-C or SIGTERM to stop")
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        err.print("stopping: shutting Serve down")
        # Bounded: if a signal to the whole process group already took Ray's own processes
        # down, Serve's graceful shutdown would wait forever.
        from ray import serve as ray_serve

        closer = threading.Thread(target=ray_serve.shutdown, daemon=True)
        closer.start()
        closer.join(timeout=20)
        if not address:
            import ray

            ray.shutdown()


@app.command()
def policies(as_json: JsonOpt = False) -> None:
    """List the serving policy presets."""
    from ray_unlearn.platform.serving.policies import PRESETS

    with _Output(as_json) as out:
        rows = [p.model_dump() for p in PRESETS.values()]
        t = Table(title="serving policies")
        for col in ("name", "timing", "uncertified", "description"):
            t.add_column(col)
        for r in rows:
            t.add_row(r["name"], r["timing"], r["uncertified"], r["description"])
        out.emit({"policies": rows}, t)


@app.command()
def demo(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            metavar="FILE",
            help="Run config YAML (see configs/). Default: configs/digits.yaml, in the "
            "current directory or else in the repository this package runs from.",
        ),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Argument(metavar="KEY=VALUE", help="key=value overrides, e.g. training.epochs=5"),
    ] = None,
    deletions: Annotated[int, typer.Option(metavar="N", help="Owner deletions to run.")] = 3,
    storage: ConfigStorageOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train the digits ensemble on an embedded Ray, forget a few owners, audit, and report."""
    from ray_unlearn.platform.core.config import load_config

    overrides = [*(overrides or []), *([f"storage={storage}"] if storage else [])]
    with _Output(as_json) as out, _errors(out):
        config = config or _default_demo_config()
        load_config(config, overrides)  # a bad config: reported before Ray and torch load
        from ray_unlearn.train.demo import run_demo

        doc, table = run_demo(config, overrides, deletions)
        out.emit(doc, table)


def _default_demo_config() -> Path:
    """configs/digits.yaml of the current directory, or of the source tree this package
    runs from (an editable install, run from another directory)."""
    here = Path("configs/digits.yaml")
    repo = Path(__file__).resolve().parents[1] / here
    for path in (here, repo):
        if path.is_file():
            return path
    raise ValueError(
        f"demo: no --config given and {here} is neither in {Path.cwd()} nor in "
        f"{repo.parents[1]}: run it from the repository, or pass --config FILE"
    )


def _progress(as_json: bool, desc: str, unit: str):
    """A tqdm bar on stderr for long work, or None: quiet with --json and when stderr is not
    a terminal (logs and pipes get the result, not a redrawn bar)."""
    if as_json or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)


@app.command()
def scores(
    run: RunOpt,
    score: Annotated[
        list[str] | None,
        typer.Option(
            "--score",
            metavar="NAME",
            help="A memorization score (repeatable): exact, confidence, max_confidence, "
            "entropy, binary_accuracy, holdout_kl; default: the run's rum.score.",
        ),
    ] = None,
    compute: Annotated[
        bool,
        typer.Option(
            "--compute", help="Compute (and store) the scores again even when the run has them."
        ),
    ] = False,
    models: Annotated[
        int,
        typer.Option(metavar="M", help="exact: subset models trained (Ray tasks)."),
    ] = 32,
    keep: Annotated[
        float,
        typer.Option(
            metavar="FRACTION", help="exact: fraction of the rows each subset model sees."
        ),
    ] = 0.7,
    top: Annotated[
        int, typer.Option(metavar="N", help="How many of the most memorized samples to list.")
    ] = 10,
    storage: StorageOpt = "./runs",
    address: AddressOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Memorization scores of a run's training samples (what RUM ranks deletions by): read
    from the run, or computed and stored first; lists the most memorized samples."""
    from ray_unlearn import api

    with _Output(as_json) as out, _errors(out):
        bar = _progress(as_json, "exact memorization: subset models", "model")

        def tick(done: int, total: int) -> None:
            if bar is not None:
                bar.total = total
                bar.update(done - bar.n)

        try:
            doc = api.scores(
                run,
                score or [],
                compute=compute,
                models=models,
                keep=keep,
                top=top,
                storage=storage,
                address=address,
                on_model_done=tick,
            )
        finally:
            if bar is not None:
                bar.close()
        tables = []
        for s in doc["scores"]:
            t = Table(
                title=f"{s['score']} memorization of {s['samples']} training samples of {run}",
                caption=f"{'computed now' if s['computed_now'] else 'stored'}: {s['file']} "
                f"({s['seconds']:.1f} s); memorization: higher = more memorized",
                title_justify="left",
                caption_justify="left",
            )
            for col in ("rank", "sample id", "owner", "memorization"):
                t.add_column(col, no_wrap=True)
            for i, r in enumerate(s["most_memorized"]):
                t.add_row(
                    str(i), str(r["sample_id"]), str(r["owner_id"]), f"{r['memorization']:.4f}"
                )
            tables.append(t)
        out.emit(doc, Group(*tables))


@app.command()
def sweep(
    config: Annotated[
        Path,
        typer.Option("--config", "-c", metavar="FILE", help="Sweep YAML (configs/sweep.yaml)."),
    ],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="KEY=VALUE",
            help="key=value: sweep keys (stream.deletions=3), space.<key>=[...] to replace a "
            "dimension, any other dotted key overrides every trial's run config",
        ),
    ] = None,
    storage: ConfigStorageOpt = None,
    address: AddressOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Ray Tune over shards, slices, S3T budgets, hybrid thresholds and serving policies;
    every trial logged to MLflow; prints the Pareto front and writes the chosen config."""
    from ray_unlearn.tune.dedupe import planned
    from ray_unlearn.tune.spec import load_sweep

    overrides = [*(overrides or []), *([f"storage={storage}"] if storage else [])]
    with _Output(as_json) as out, _errors(out):
        spec = load_sweep(config, overrides)
        # the trials that run: grid points repeating another trial are skipped (and listed
        # by the sweep as it starts)
        total, skipped = planned(spec)
        repeats = f" ({len(skipped)} repeated grid point(s) skipped)" if skipped else ""
        err.print(
            f"sweep [bold]{spec.name}[/bold]: {total} trial(s){repeats}, "
            f"{spec.stream.deletions} deletions each"
        )
        from ray_unlearn import api

        doc = api.sweep(spec, address=address)
        out.emit(doc, _sweep_table(doc))
        if doc["chosen"]:
            err.print(f"chosen: {doc['chosen']['label']} -> {doc['chosen']['config']}")
        else:
            err.print("[yellow]no trial finished the stream: nothing chosen[/yellow]")
        err.print(
            f"pareto.png, results.json: {doc['out']}; MLflow: {doc['tracking_uri']} "
            f"(experiment {doc['experiment']}, parent run {doc['parent_run_id']})"
        )


_SWEEP_COLUMNS = {  # metric -> (header, format); short: the trial label needs the room
    "val_accuracy": ("val", ".4f"),
    "test_accuracy": ("test", ".4f"),
    "served_accuracy": ("served", ".4f"),
    "unlearn_cpu_s": ("cpu s", ".2f"),
    "unlearn_s": ("wall s", ".2f"),
    "latency_mean_ms": ("lat ms", ".2f"),
    "latency_p99_ms": ("p99 ms", ".2f"),
    "certified_fraction": ("cert", ".2f"),
    "violations": ("viol", ".0f"),
}


def _sweep_table(doc: dict[str, Any]) -> Table:
    """One row per trial (its label names the policy); * Pareto front, > chosen."""
    objectives = list(doc["objectives"])
    chosen = doc["chosen"]["label"] if doc["chosen"] else None
    # wall seconds stay in --json unless they are the cost: the table fits 80 columns
    extra = ("served_accuracy", "certified_fraction", "violations")
    metrics = [*objectives, *(m for m in extra if m not in objectives)]
    # test accuracy right after the accuracy objective: shown beside it, never chosen on
    metrics.insert(1, "test_accuracy")
    states = any(r["state"] != "finished" or r.get("exposes_data") for r in doc["trials"])
    t = Table(
        title=f"sweep {doc['sweep_id']}: * Pareto front, > chosen",
        title_justify="left",
        caption="val / test: validation accuracy after the stream (what the front and the "
        "choice use) / test accuracy (reported only); served: accuracy of the answers given "
        "meanwhile; cpu s / wall s: unlearning CPU / wall seconds; lat ms: per-instance "
        "serving latency; cert: certified answers; viol: answers from a model holding data "
        "of a submitted deletion (checked against the manifests)",
        caption_justify="left",
        padding=(0, 1),
    )
    t.add_column("", no_wrap=True)
    t.add_column("trial", min_width=20, overflow="fold")
    if states:
        t.add_column("state", overflow="fold")
    for m in metrics:
        t.add_column(_SWEEP_COLUMNS[m][0], justify="right", no_wrap=True)
    for r in doc["trials"]:
        mark = (">" if r["label"] == chosen else "") + ("*" if r.get("pareto") else "")
        state = {"finished": "ok"}.get(r["state"], r["state"])
        if r.get("exposes_data"):
            state = "exposes data"
        cells = ["-" if r.get(m) is None else format(r[m], _SWEEP_COLUMNS[m][1]) for m in metrics]
        t.add_row(mark, r["label"].replace(",", ", "), *([state] if states else []), *cells)
    return t


def main() -> None:
    """The console script. With ``--json`` a usage error (a missing or unknown option, a
    value of the wrong type) also prints one JSON error document on stdout; without it
    typer reports it as usual. Exit code 2 either way."""
    if "--json" not in sys.argv[1:]:
        app()
        return
    try:
        rc = app(standalone_mode=False)
    except typer.TyperException as e:  # typer's (vendored click's) usage errors
        print(json.dumps({"error": e.format_message()}), flush=True)
        e.show()
        sys.exit(getattr(e, "exit_code", 2))
    except typer.Abort:
        sys.exit(1)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
