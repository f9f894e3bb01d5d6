"""The Python API (ray_unlearn.api, re-exported by the package): what the CLI does, in process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import ray_unlearn as ru
from tests.conftest import CONFIGS, imported_by


def test_import_is_cheap():
    """`import ray_unlearn` must not pull torch or Ray: a CLI typo and an embedding program
    pay for them only when a function needs them."""
    heavy = imported_by("import ray_unlearn", ("torch", "ray", "pyarrow", "mlflow"))
    assert heavy == [], f"import ray_unlearn imported {heavy}"
    assert set(ru.__all__) >= {"train", "forget", "status", "audit", "serve", "sweep"}


def test_a_config_error_imports_no_numpy_or_torch():
    """Validating a config imports every method's registration (base, registry, each
    method's config and hooks); none of them needs numpy or torch for that."""
    code = (
        "from ray_unlearn.platform.core.config import ConfigError, load_config\n"
        "try:\n"
        f"    load_config({os.path.join(CONFIGS, 'digits.yaml')!r}, ['unlearning.strategy=sisaa'])\n"
        "except ConfigError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('a misspelt strategy was accepted')"
    )
    assert imported_by(code, ("numpy", "torch", "pyarrow")) == []


def test_train_and_serve_survive_their_subpackages(tmp_path):
    """`ray_unlearn.train` / `ray_unlearn.serve` are subpackages too; importing them (or a
    module in them) first must not hide the functions: a fresh interpreter imports the
    subpackages, then calls `ru.train` / `ru.serve`, which must reach the API's own input
    checks (a missing config file, an unknown run) rather than fail with "module is not
    callable"."""
    code = f"""
import sys
import ray_unlearn.train, ray_unlearn.serve            # the subpackages, first
import ray_unlearn.train as t
import ray_unlearn as ru
from ray_unlearn import serve, train
from ray_unlearn.platform.core.config import ConfigError
from ray_unlearn.platform.core.run import RunError
assert t is ru.train is train and serve is ru.serve
try:
    ru.train({str(tmp_path / "missing.yaml")!r}, storage={str(tmp_path)!r})
except ConfigError as e:
    assert "missing.yaml" in str(e), e
else:
    raise SystemExit("ru.train accepted a missing config")
try:
    train({str(tmp_path / "missing.yaml")!r})
except ConfigError:
    pass
try:
    ru.serve("no-such-run", storage={str(tmp_path)!r})
except RunError as e:
    assert "no-such-run" in str(e), e
else:
    raise SystemExit("ru.serve accepted an unknown run")
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_subpackage_modules_and_signatures():
    """In this process (where tests have imported `ray_unlearn.train.job` and friends) the
    functions still work as functions: same signature as the API's, and a submodule is
    still reachable as an attribute (what `mock.patch("ray_unlearn.train.job.x")` walks)."""
    import inspect
    import pkgutil

    import ray_unlearn.api as api
    import ray_unlearn.train.job

    assert inspect.signature(ru.train) == inspect.signature(api.train)
    assert inspect.signature(ru.serve) == inspect.signature(api.serve)
    assert ru.train.job is ray_unlearn.train.job
    assert pkgutil.resolve_name("ray_unlearn.train.job") is ray_unlearn.train.job
    with pytest.raises(ValueError, match="does not exist"):
        ru.train("no/such/config.yaml")


def _trained_owner(ctx) -> str:
    """An owner with training rows (some owners hold only held-out test rows)."""
    return str(ctx.plan.owner_ids[ctx.plan.shards == 0][0])


def test_forget_status_audit_in_process(tiny_run):
    ctx = tiny_run
    root = ctx.storage.uri
    owner = _trained_owner(ctx)
    before = ru.audit(ctx.run_id, owner=owner, storage=root)
    assert before["live_versions_containing"] and not before["requests"]

    doc = ru.forget(ctx.run_id, owner=owner, storage=root, request_id="api-1")
    assert doc["state"] == "done" and doc["created"] and doc["samples"] > 0
    assert doc["versions_retired"] and doc["versions_created"]

    st = ru.status(ctx.run_id, "api-1", storage=root)
    assert st["state"] == "done" and st["samples"] == doc["samples"]
    after = ru.audit(ctx.run_id, owner=owner, storage=root)
    assert after["clean"] and not after["live_versions_containing"]

    again = ru.forget(ctx.run_id, owner=owner, storage=root, request_id="api-1")
    assert not again["created"] and again["state"] == "done"  # idempotent


def test_bad_input_changes_nothing(tiny_run):
    ctx = tiny_run
    root = ctx.storage.uri
    owner = _trained_owner(ctx)
    with pytest.raises(ValueError, match="exactly one of owner"):
        ru.forget(ctx.run_id, owner=owner, samples=[1], storage=root)
    with pytest.raises(ValueError, match="exactly one of owner"):
        ru.forget(ctx.run_id, storage=root)
    with pytest.raises(ValueError, match="without waiting"):
        ru.forget(ctx.run_id, owner=owner, wait=False, strategy="sisa", storage=root)
    with pytest.raises(ValueError, match="s3t"):
        ru.forget(ctx.run_id, owner=owner, strategy="s3t", storage=root)
    assert ctx.deletion_log.records() == []


def test_no_wait_logs_and_leaves_pending(tiny_run):
    ctx = tiny_run
    owner = _trained_owner(ctx)
    doc = ru.forget(ctx.run_id, owner=owner, wait=False, storage=ctx.storage.uri)
    assert doc["state"] == "pending"
    audit = ru.audit(ctx.run_id, owner=owner, storage=ctx.storage.uri)
    assert audit["pending_requests"] == 1
