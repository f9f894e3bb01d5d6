"""ERASER serving policies: when deletions execute and what an uncertified inference gets.

Two independent option groups (DESIGN.md, section 2):

- ``timing``: "immediate" executes each deletion on arrival; "batched" when ``batch_count``
  requests are pending or the oldest is ``batch_window_s`` old; "lazy" only when an
  inference is blocked waiting on the pending deletions, or a deadline is due.
- ``uncertified``: what an inference whose answer is not certified
  (:mod:`ray_unlearn.platform.serving.certify`) gets: "wait" for the affected shards to be
  unlearned and answer from the new models; "exclude" answer from the unaffected shards
  alone; "reject" answer 503 with Retry-After. All three expose nothing. The fourth value,
  "stale", serves the not-yet-unlearned models and exists only for the naive-postponed
  baseline; it must be switched on twice (``expose_stale=True`` as well).

Every deletion executes at most ``deadline_s`` after arrival whatever the timing (the right
to be forgotten has a deadline), so a policy under which a deletion could wait forever is
rejected. The decision helpers at the end are pure functions of the policy, the pending
requests and the clock: the gateway calls them; the tests pin them down.

ERASER's third option, *contexts* (single: the serving copy of a shard retrains in place;
double: a shadow copy retrains), is deliberately absent. Here retraining always happens in
the executor's own shard actors, never in the serving replicas, and the gateway never
queries a shard with a pending deletion for a certified or excluded answer, so both values
would serve the same answers at the same latency. An old preset name or a ``contexts`` key
is rejected with the preset that replaces it (:data:`REMOVED_CONTEXTS`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ray_unlearn.platform.core.config_errors import did_you_mean

Timing = Literal["immediate", "batched", "lazy"]
Uncertified = Literal["wait", "exclude", "reject", "stale"]
AnswerMode = Literal["certified", "excluded", "wait", "reject", "stale"]


class ServingPolicy(BaseModel):
    """One ERASER serving policy. Immutable; every contradiction is reported at once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("custom", min_length=1, description="Preset name or a label.")
    description: str = Field("", description="One line: what the policy trades for what.")
    timing: Timing = Field("immediate", description="When pending deletions execute.")
    uncertified: Uncertified = Field("wait", description="What an uncertified inference gets.")
    certify: bool = Field(
        True,
        description="Answer certified inferences from the current models. False never trusts "
        "a certificate: every inference is uncertified while a deletion is pending or "
        "executing (the inference-oblivion baseline).",
    )
    expose_stale: bool = Field(
        False,
        description="Serve stale models to uncertified inferences, exposing deleted data. "
        "Only for the naive-postponed baseline; needs uncertified='stale'.",
    )
    deadline_s: float = Field(
        60.0, description="Every deletion executes at most this long after arrival (> 0)."
    )
    batch_count: int | None = Field(
        None, description="batched: execute once this many requests are pending."
    )
    batch_window_s: float | None = Field(
        None, description="batched: execute once the oldest pending request is this old."
    )
    max_batch: int | None = Field(
        None,
        description="At most this many requests per execution, oldest first (None: every "
        "pending one). 1 executes deletions one by one, as the inference-oblivion baseline "
        "does.",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_contexts(cls, data: Any) -> Any:
        # Named before pydantic's generic "extra inputs are not permitted", so a config
        # written for an earlier release learns what to do instead.
        if isinstance(data, Mapping) and "contexts" in data:
            raise ValueError(
                f"the 'contexts' option was removed (got contexts={data['contexts']!r}): "
                "retraining always runs in the executor's shard actors, never in the "
                "serving copies, so single and double served identically; delete the key "
                "(timing and uncertified choose the policy)"
            )
        return data

    @model_validator(mode="after")
    def _coherent(self) -> ServingPolicy:
        problems: list[str] = []
        if math.isnan(self.deadline_s) or self.deadline_s <= 0:
            problems.append(f"deadline_s must be > 0 (inf allowed), got {self.deadline_s}")
        if self.timing == "batched":
            if self.batch_count is None and self.batch_window_s is None:
                problems.append(
                    "timing='batched' needs batch_count and/or batch_window_s (neither is set)"
                )
        else:
            for field in ("batch_count", "batch_window_s"):
                if getattr(self, field) is not None:
                    problems.append(
                        f"{field} applies only to timing='batched' (got timing={self.timing!r}); "
                        f"leave it unset"
                    )
        if self.batch_count is not None and self.batch_count < 1:
            problems.append(f"batch_count must be >= 1, got {self.batch_count}")
        if self.max_batch is not None and self.max_batch < 1:
            problems.append(
                f"max_batch must be >= 1 or null (every pending request), got {self.max_batch}"
            )
        if (
            self.max_batch is not None
            and self.batch_count is not None
            and self.max_batch < self.batch_count
        ):
            problems.append(
                f"max_batch={self.max_batch} is below batch_count={self.batch_count}: a full "
                "batch could never execute at once"
            )
        if self.batch_window_s is not None and not self.batch_window_s > 0:
            problems.append(f"batch_window_s must be > 0, got {self.batch_window_s}")
        if self.deadline_s == math.inf:
            if self.timing == "lazy":
                problems.append(
                    "timing='lazy' needs a finite deadline_s: with uncertified="
                    f"{self.uncertified!r} a deletion could otherwise never execute"
                )
            if self.timing == "batched" and self.batch_window_s is None:
                problems.append(
                    "timing='batched' with only batch_count needs a finite deadline_s or a "
                    "batch_window_s: under light load a batch might never fill"
                )
        if self.expose_stale != (self.uncertified == "stale"):
            problems.append(
                "expose_stale=True goes with uncertified='stale' only, and uncertified='stale' "
                f"needs expose_stale=True (got expose_stale={self.expose_stale}, "
                f"uncertified={self.uncertified!r}); safe choices: 'wait', 'exclude', 'reject'"
            )
        if self.expose_stale and self.certify:
            problems.append(
                "expose_stale=True needs certify=False: the naive-postponed baseline answers "
                "from the stale models whatever a certificate says (exposure is measured "
                "separately)"
            )
        if problems:
            raise ValueError(f"serving policy {self.name!r}: " + "; ".join(problems))
        return self

    @property
    def is_baseline(self) -> bool:
        """A baseline policy: it never trusts a certificate, or it exposes deleted data."""
        return not self.certify or self.expose_stale


def _preset(name: str, description: str, timing: str, uncertified: str, **kw):
    if timing == "batched":
        kw = {"batch_count": 8, "batch_window_s": 10.0, **kw}
    return ServingPolicy(
        name=name,
        description=description,
        timing=timing,
        uncertified=uncertified,
        **kw,
    )


PRESETS: dict[str, ServingPolicy] = {
    p.name: p
    for p in [
        _preset("immediate-wait", "Execute each deletion on arrival; uncertified inferences "
                "wait for the retrained shard. Simple, fresh, slowest under load.",
                "immediate", "wait"),
        _preset("immediate-exclude", "Execute each deletion on arrival; uncertified answers "
                "come from the unaffected shards meanwhile. No waiting, some accuracy lost.",
                "immediate", "exclude"),
        _preset("batched-wait", "Retrain once per batch (8 requests or 10 s); uncertified "
                "inferences wait for the batch. Less compute, longer waits.",
                "batched", "wait"),
        _preset("batched-exclude", "Retrain once per batch; uncertified answers from the "
                "unaffected shards. Low latency, moderate compute.",
                "batched", "exclude"),
        _preset("lazy-wait", "Execute only when an uncertified inference needs it or a "
                "deadline is due; certified answers never wait.",
                "lazy", "wait"),
        _preset("lazy-exclude", "Deletions execute at their deadline only; uncertified "
                "answers from the unaffected shards. Least compute.",
                "lazy", "exclude"),
        _preset("lazy-reject", "Execute at the deadline only; uncertified inferences get "
                "503 + Retry-After. Least compute; clients must retry.",
                "lazy", "reject"),
        _preset("inference-oblivion", "Baseline: each deletion executes on arrival, one at a "
                "time, and every inference waits while any deletion is pending or executing.",
                "immediate", "wait", certify=False, max_batch=1),
        _preset("naive-postponed", "Baseline: deletions postponed to their deadline while the "
                "stale models keep serving. Never waits; exposes deleted data.",
                "lazy", "stale", certify=False, expose_stale=True),
    ]
}  # fmt: skip

# Presets of earlier releases that named a context ("single-..." / "double-..."): both
# contexts served identically here (module docstring), so each maps to the preset without
# the prefix. Used only to word the error; an old name is never accepted silently.
REMOVED_CONTEXTS: dict[str, str] = {
    f"{ctx}-{name}": name
    for ctx in ("single", "double")
    for name in PRESETS
    if name not in ("inference-oblivion", "naive-postponed")
}


def list_policies() -> list[str]:
    """Names of the presets, in a stable order (ERASER combinations first, then baselines)."""
    return list(PRESETS)


def get_policy(spec: str | Mapping[str, Any] | ServingPolicy) -> ServingPolicy:
    """A policy from a preset name, or a mapping of fields.

    A mapping may name a ``preset`` to start from; its other keys override the preset's
    fields. Switching a batched preset to another timing drops the preset's batch fields
    unless the mapping sets them. Without ``name`` the result is called
    ``"<preset>+key=value,..."`` so a tweaked preset is never mistaken for the original.
    """
    if isinstance(spec, ServingPolicy):
        return spec
    if isinstance(spec, str):
        if spec in REMOVED_CONTEXTS:
            raise ValueError(
                f"serving policy {spec!r} was removed with the contexts option (single and "
                f"double served identically); use {REMOVED_CONTEXTS[spec]!r}"
            )
        if spec not in PRESETS:
            raise ValueError(
                f"unknown serving policy {spec!r}{did_you_mean(spec, list_policies())}; "
                f"presets: {', '.join(list_policies())}"
            )
        return PRESETS[spec]
    if not isinstance(spec, Mapping):
        raise ValueError(f"a serving policy is a preset name or a mapping, got {type(spec)}")
    fields = dict(spec)
    preset = fields.pop("preset", None)
    if preset is None:
        return ServingPolicy(**fields)
    base = get_policy(str(preset))
    if not fields:
        return base
    merged = base.model_dump()
    if fields.get("timing", base.timing) != "batched":
        merged.update(batch_count=None, batch_window_s=None)
    if "name" not in fields:
        tweaks = ",".join(f"{k}={v}" for k, v in sorted(fields.items()) if k != "description")
        merged["name"] = f"{base.name}+{tweaks}" if tweaks else base.name
    merged.update(fields)
    return ServingPolicy(**merged)


# -- decisions the gateway takes -------------------------------------------------------------


@dataclass(frozen=True)
class PendingView:
    """One pending (not yet executing) deletion request, as the scheduler sees it."""

    received_at: float
    deadline: float | None = None  # the request's own deadline, if it asked for one


def _deadline(policy: ServingPolicy, request: PendingView) -> float:
    """When ``request`` must execute: its own deadline or the policy's, whichever is first."""
    due = request.received_at + policy.deadline_s
    return due if request.deadline is None else min(due, request.deadline)


def due_for_execution(
    policy: ServingPolicy, pending: Sequence[PendingView], now: float, uncertified_waiting: bool
) -> bool:
    """Should the pending deletions execute now?

    ``uncertified_waiting`` means an inference is blocked on them (:func:`answer_mode` said
    "wait"). Any timing executes when a deadline is due. Immediate executes whenever anything
    is pending; batched when the batch is full or the oldest request has waited a window
    (a blocked inference waits for the batch: that is the trade batched makes); lazy only
    when an inference is blocked, which under "exclude" happens only in its fallback (no
    unaffected shard left), and under "reject" or "stale" never.
    """
    if not pending:
        return False
    if any(_deadline(policy, p) <= now for p in pending):
        return True
    if policy.timing == "immediate":
        return True
    if policy.timing == "batched":
        if policy.batch_count is not None and len(pending) >= policy.batch_count:
            return True
        oldest = min(p.received_at for p in pending)
        return policy.batch_window_s is not None and oldest + policy.batch_window_s <= now
    return uncertified_waiting


def next_wakeup(policy: ServingPolicy, pending: Sequence[PendingView], now: float) -> float | None:
    """Earliest t >= now at which :func:`due_for_execution` turns true by the clock alone.

    That is, with no inference waiting: ``now`` if it already is, None if time alone never
    makes it (nothing pending). A scheduler sleeps until then, or until a request arrives.
    """
    if not pending:
        return None
    if due_for_execution(policy, pending, now, uncertified_waiting=False):
        return now
    times = [_deadline(policy, p) for p in pending]
    if policy.timing == "batched" and policy.batch_window_s is not None:
        times.append(min(p.received_at for p in pending) + policy.batch_window_s)
    finite = [t for t in times if math.isfinite(t)]
    return max(now, min(finite)) if finite else None


def answer_mode(
    policy: ServingPolicy,
    certified: bool,
    *,
    pending: bool = True,
    any_unaffected: bool = True,
) -> AnswerMode:
    """What the gateway does with one inference instance.

    - ``certified``: the instance's certificate holds for the current affected set (shards
      with a deletion pending or executing).
    - ``pending``: some deletion is pending or executing. False: the models are current and
      every policy answers "certified" (even one that never trusts a certificate).
    - ``any_unaffected``: some shard has no deletion pending; False when every shard is
      affected, and then "exclude" has nothing to answer with and falls back to "wait".

    Returns "certified" (answer now from the unaffected shards: a certificate depends only
    on them and covers the affected ones dropping out), "excluded" (answer from the
    unaffected shards), "wait" (block until the affected shards are unlearned; lazy timing
    then executes them), "reject" (503 + Retry-After) or "stale" (answer from the stale
    models: exposure).
    """
    if not pending or (certified and policy.certify):
        return "certified"
    if policy.uncertified == "exclude":
        return "excluded" if any_unaffected else "wait"
    return policy.uncertified  # "wait", "reject" or (naive baseline only) "stale"
