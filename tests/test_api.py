"""The Python API (ray_unlearn.api, re-exported by the package): what the CLI does, in process."""

from __future__ import annotations

import subprocess
import sys

import pytest

import ray_unlearn as ru


def test_import_is_cheap():
    """`import ray_unlearn` must not pull torch or Ray: a CLI typo and an embedding program
    pay for them only when a function needs them."""
    code = (
        "import sys, ray_unlearn; "
        "heavy = [m for m in ('torch', 'ray', 'pyarrow', 'mlflow') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "", f"import ray_unlearn imported {out}"
    assert set(ru.__all__) >= {"train", "forget", "status", "audit", "serve", "sweep"}


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
