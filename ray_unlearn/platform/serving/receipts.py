"""Receipts of answers, and their replay against the manifests and the deletion log.

A receipt says how one instance was answered: which model versions voted (shard -> version),
which live shards were left out (``excluded``: a deletion was pending on them), and the
certificate's inputs: for ``vote`` the label of every voting shard, for ``mean_prob`` the
voting shards' mean probabilities. From those a client re-derives the certificate without
trusting the gateway. The margin is ``min over c' != c* of lead(c*, c') - m``: the
certificate holds when it is > 0, or == 0 when the tie-break (smallest label) favours c*.

:func:`replay` checks answers from outside the gateway. A request's promise starts at its
acknowledgement (``deletions/acks``; or when it was done, if no acknowledgement was recorded).
An answer committed after that is a violation when a version that voted was trained on any
of the request's samples (per the version's stored sample ids), or when it claims a
certificate that does not hold for the shards it excluded. No Ray here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ray_unlearn.platform.core.deletion_log import RequestState
from ray_unlearn.platform.core.run import RunContext
from ray_unlearn.platform.core.storage import StorageError
from ray_unlearn.platform.serving.fence import read_acks

_TOL = 1e-9  # mean_prob receipts carry means, the certificate compares sums: rounding slack


def _lead_margin(scores: np.ndarray, label: int, m: int) -> tuple[float, bool]:
    """scores: (C,) vote counts or summed probabilities of the voting shards.
    Returns (margin, holds) of the certificate for winner ``label`` with m excluded shards."""
    lead = scores[label] - scores  # (C,) lead of the winner over every class
    others = np.arange(len(scores)) != label
    if not others.any():
        return float("inf"), True
    slack = lead[others] - m
    favoured = np.arange(len(scores))[others] > label  # ties go to the smaller label
    holds = bool(np.all((slack > -_TOL * max(1, m)) | ((np.abs(slack) <= _TOL) & favoured)))
    return float(slack.min()), holds


def make_receipt(
    rule: str,
    voting: dict[int, str],
    excluded: list[int],
    shard_probs: dict[int, np.ndarray],
    label: int,
    scores: list[float],
) -> dict[str, Any]:
    """The receipt of one instance. ``shard_probs``: shard -> (C,) probabilities of this
    instance for (at least) the voting shards; ``scores``: the aggregate answered."""
    m = len(excluded)
    receipt: dict[str, Any] = {
        "versions": {str(k): v for k, v in sorted(voting.items())},
        "excluded": sorted(int(k) for k in excluded),
    }
    if rule == "vote":
        votes = {k: int(np.argmax(shard_probs[k])) for k in sorted(voting)}
        counts = np.bincount(list(votes.values()), minlength=len(scores)).astype(float)
        receipt["votes"] = {str(k): v for k, v in votes.items()}
    else:
        counts = np.asarray(scores, dtype=np.float64) * len(voting)
    receipt["margin"] = _lead_margin(counts, label, m)[0] if voting else None
    return receipt


def check_certificate(entry: dict[str, Any]) -> str | None:
    """None if the certificate an answer claims holds; else why not. Only answers that claim
    one are checked: ``certified`` (and ``waited``) answers with excluded shards."""
    excluded = entry.get("excluded") or []
    if entry.get("mode") not in ("certified", "waited") or not excluded:
        return None
    versions, label = entry.get("versions") or {}, int(entry["label"])
    if not versions:
        return "claims a certificate but no shard voted"
    if entry.get("rule") == "vote":
        votes = entry.get("votes") or {}
        if set(votes) != set(versions):
            return "claims a certificate but its votes do not name the voting shards"
        counts = np.bincount(
            [int(v) for v in votes.values()], minlength=max(label, *map(int, votes.values())) + 1
        ).astype(float)
        if int(np.argmax(counts)) != label:
            return f"label {label} is not the plurality of its votes"
    else:
        probs = np.asarray(entry.get("probabilities") or [], dtype=np.float64)
        if probs.ndim != 1 or len(probs) <= label:
            return "claims a certificate but carries no probabilities"
        counts = probs * len(versions)
        if abs(counts[label] - counts.max()) > _TOL * len(versions):
            return f"label {label} is not the argmax of its probabilities"
    margin, holds = _lead_margin(counts, label, len(excluded))
    if not holds:
        return f"certificate fails: margin {margin:g} with {len(excluded)} excluded shards"
    return None


@dataclass(frozen=True)
class Promise:
    """From ``start`` (unix s) on, no answer may come from a version holding ``sample_ids``."""

    request_id: str
    start: float
    sample_ids: np.ndarray


def promises(ctx: RunContext) -> list[Promise]:
    """One per request acknowledged (or done), earliest start first."""
    acks = read_acks(ctx.storage, ctx.layout)
    out = []
    for r in ctx.deletion_log.records():
        rid = r.request.request_id
        starts = [t for t in (acks.get(rid), r.done_at) if t is not None]
        if r.state is RequestState.DONE or rid in acks:
            out.append(Promise(rid, min(starts), np.asarray(r.request.sample_ids, np.int64)))
    return sorted(out, key=lambda p: p.start)


def replay(ctx: RunContext, answers: list[dict[str, Any]]) -> dict[str, Any]:
    """Check ``answers`` (journal records) against the manifests and the log's promises."""
    proms = promises(ctx)
    first_conflict: dict[str, tuple[float, str] | None] = {}
    unknown: set[str] = set()

    def conflict(vid: str) -> tuple[float, str] | None:
        if vid not in first_conflict:
            try:
                held = ctx.model_store.sample_ids(vid)
            except (StorageError, OSError, KeyError, ValueError):
                unknown.add(vid)
                first_conflict[vid] = None
                return None
            first_conflict[vid] = next(
                ((p.start, p.request_id) for p in proms if np.isin(p.sample_ids, held).any()),
                None,
            )
        return first_conflict[vid]

    violations = []
    for e in answers:
        at = float(e["committed_at"])
        why = []
        for shard, vid in sorted((e.get("versions") or {}).items()):
            c = conflict(str(vid))
            if vid in unknown:
                why.append(f"version {vid} (shard {shard}) has no stored sample ids to check")
            elif c is not None and at > c[0]:
                why.append(
                    f"version {vid} (shard {shard}) holds samples of request {c[1]}, "
                    f"acknowledged {at - c[0]:.3f} s before this answer"
                )
        cert = check_certificate(e)
        if cert:
            why.append(cert)
        if why:
            violations.append(
                {
                    "committed_at": at,
                    "replica": e.get("replica"),
                    "answer": e.get("answer"),
                    "mode": e.get("mode"),
                    "reasons": why,
                }
            )
    return {
        "run_id": ctx.run_id,
        "answers": len(answers),
        "promises": len(proms),
        "versions_checked": len(first_conflict),
        "violations": violations,
        "n_violations": len(violations),
        "clean": not violations,
    }
