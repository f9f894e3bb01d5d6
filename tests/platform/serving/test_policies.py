"""ERASER serving policies: presets, validation, and the gateway's decision helpers."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from ray_unlearn.platform.serving.policies import (
    PRESETS,
    REMOVED_CONTEXTS,
    PendingView,
    ServingPolicy,
    answer_mode,
    due_for_execution,
    get_policy,
    list_policies,
    next_wakeup,
)

BASELINES = {"inference-oblivion", "naive-postponed"}


# -- presets ---------------------------------------------------------------------------------


def test_presets_validate_with_distinct_names_and_descriptions():
    assert list_policies() == list(PRESETS)
    assert len(set(list_policies())) == len(PRESETS)
    for name, policy in PRESETS.items():
        assert policy.name == name and policy.description
        assert ServingPolicy(**policy.model_dump()) == policy  # round-trips through validation
    ordinary = [p for p in PRESETS.values() if not p.is_baseline]
    assert len(ordinary) == 7 and len(PRESETS) == 9
    assert {p.name for p in PRESETS.values() if p.is_baseline} == BASELINES
    # the ordinary presets are distinct policies (no two behave alike) covering every value
    combos = {(p.timing, p.uncertified) for p in ordinary}
    assert len(combos) == len(ordinary)
    assert {t for t, _ in combos} == {"immediate", "batched", "lazy"}
    assert {u for _, u in combos} == {"wait", "exclude", "reject"}
    for p in ordinary:  # the name says the policy
        assert p.name == f"{p.timing}-{p.uncertified}"
    assert not any(p.expose_stale for p in ordinary)


def test_baselines():
    oblivion = PRESETS["inference-oblivion"]
    assert (oblivion.timing, oblivion.uncertified) == ("immediate", "wait")
    assert not oblivion.certify and not oblivion.expose_stale
    naive = PRESETS["naive-postponed"]
    assert naive.expose_stale and not naive.certify and naive.uncertified == "stale"
    assert naive.timing in ("batched", "lazy") and math.isfinite(naive.deadline_s)


def test_policies_are_frozen():
    with pytest.raises(ValidationError):
        PRESETS["lazy-wait"].timing = "immediate"


# -- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "needles"),
    [
        ({"timing": "lazy", "batch_count": 4}, ["batch_count", "timing='batched'"]),
        ({"timing": "immediate", "batch_window_s": 2.0}, ["batch_window_s", "timing='batched'"]),
        ({"timing": "batched"}, ["timing='batched'", "batch_count", "batch_window_s"]),
        ({"timing": "batched", "batch_count": 0}, ["batch_count must be >= 1"]),
        ({"timing": "batched", "batch_window_s": -1.0}, ["batch_window_s must be > 0"]),
        ({"deadline_s": 0.0}, ["deadline_s must be > 0"]),
        ({"max_batch": 0}, ["max_batch must be >= 1"]),
        (
            {"timing": "batched", "batch_count": 8, "max_batch": 2},
            ["max_batch=2", "batch_count=8"],
        ),
        ({"deadline_s": math.nan}, ["deadline_s must be > 0"]),
        ({"timing": "lazy", "uncertified": "exclude", "deadline_s": math.inf}, ["finite"]),
        ({"timing": "lazy", "uncertified": "reject", "deadline_s": math.inf}, ["deadline_s"]),
        ({"timing": "lazy", "deadline_s": math.inf}, ["timing='lazy'", "deadline_s"]),
        (
            {"timing": "batched", "batch_count": 4, "deadline_s": math.inf},
            ["batch_window_s", "finite deadline_s"],
        ),
        ({"expose_stale": True, "certify": False}, ["expose_stale", "uncertified='stale'"]),
        ({"uncertified": "stale", "certify": False}, ["expose_stale", "uncertified='stale'"]),
        (
            {"uncertified": "stale", "expose_stale": True, "certify": True},
            ["expose_stale", "certify=False"],
        ),
    ],
)
def test_nonsense_is_rejected_naming_fields(fields, needles):
    with pytest.raises(ValidationError) as err:
        ServingPolicy(**fields)
    for needle in needles:
        assert needle in str(err.value)


def test_every_problem_reported_at_once():
    with pytest.raises(ValidationError) as err:
        ServingPolicy(
            timing="lazy", batch_count=3, deadline_s=-5, expose_stale=True, uncertified="wait"
        )
    text = str(err.value)
    for needle in ["batch_count applies only", "deadline_s must be > 0", "expose_stale"]:
        assert needle in text


def test_unknown_fields_and_values_rejected():
    with pytest.raises(ValidationError, match="extra"):
        ServingPolicy(timeing="lazy")
    with pytest.raises(ValidationError, match="'wait', 'exclude', 'reject' or 'stale'"):
        ServingPolicy(uncertified="later")


def test_contexts_removed_with_a_replacement_named():
    assert "contexts" not in ServingPolicy.model_fields
    with pytest.raises(ValidationError, match="'contexts' option was removed.*delete the key"):
        ServingPolicy(contexts="double", timing="lazy")
    with pytest.raises(ValueError, match="'contexts' option was removed"):
        get_policy({"preset": "lazy-wait", "contexts": "single"})
    # every old name is refused, never aliased, and names the preset that replaces it
    assert len(REMOVED_CONTEXTS) == 14
    for old, new in REMOVED_CONTEXTS.items():
        assert new in PRESETS and old.split("-", 1)[1] == new
        with pytest.raises(ValueError, match=f"{old!r} was removed.*use {new!r}"):
            get_policy(old)
    with pytest.raises(ValueError, match="was removed.*use 'batched-exclude'"):
        get_policy({"preset": "double-batched-exclude", "deadline_s": 3})


def test_sensible_custom_policies_accepted():
    ServingPolicy(timing="batched", batch_count=1)  # effectively immediate, but coherent
    ServingPolicy(timing="immediate", deadline_s=math.inf)  # immediate needs no deadline
    ServingPolicy(timing="batched", batch_window_s=5.0, deadline_s=math.inf)
    ServingPolicy(certify=False, uncertified="exclude")


# -- get_policy ------------------------------------------------------------------------------


def test_get_policy_by_name_mapping_and_overrides():
    assert get_policy("lazy-wait") is PRESETS["lazy-wait"]
    assert get_policy(PRESETS["lazy-exclude"]) is PRESETS["lazy-exclude"]
    assert get_policy({"preset": "lazy-wait"}) is PRESETS["lazy-wait"]
    tweaked = get_policy({"preset": "lazy-wait", "deadline_s": 30})
    assert tweaked.deadline_s == 30 and tweaked.timing == "lazy"
    assert tweaked.name == "lazy-wait+deadline_s=30"
    named = get_policy({"preset": "lazy-wait", "uncertified": "exclude", "name": "mine"})
    assert named.name == "mine" and named.uncertified == "exclude"
    custom = get_policy({"timing": "batched", "batch_count": 4})
    assert custom.name == "custom" and custom.batch_count == 4
    # leaving batched drops the preset's batch fields; explicitly set ones still conflict
    lazy = get_policy({"preset": "batched-wait", "timing": "lazy"})
    assert lazy.batch_count is None and lazy.batch_window_s is None
    with pytest.raises(ValidationError, match="batch_count applies only"):
        get_policy({"preset": "batched-wait", "timing": "lazy", "batch_count": 3})
    with pytest.raises(ValidationError, match="timing='batched' needs"):
        get_policy({"preset": "lazy-wait", "timing": "batched"})


def test_get_policy_unknown():
    with pytest.raises(ValueError, match="unknown serving policy 'nope'.*lazy-wait"):
        get_policy("nope")
    with pytest.raises(ValueError, match="did you mean 'lazy-reject'"):
        get_policy("lazy-rejct")
    with pytest.raises(ValueError, match="naive-postponed"):
        get_policy({"preset": "nope", "deadline_s": 3})
    with pytest.raises(ValueError, match="preset name or a mapping"):
        get_policy(42)


# -- due_for_execution / next_wakeup ---------------------------------------------------------

IMMEDIATE = ServingPolicy(timing="immediate", deadline_s=60)
BATCHED = ServingPolicy(timing="batched", batch_count=3, batch_window_s=10.0, deadline_s=60)
COUNT_ONLY = ServingPolicy(timing="batched", batch_count=3, deadline_s=60)
LAZY = ServingPolicy(timing="lazy", deadline_s=60)
LAZY_EXCLUDE = ServingPolicy(timing="lazy", uncertified="exclude", deadline_s=60)


def _at(*times: float, deadline: float | None = None) -> list[PendingView]:
    return [PendingView(received_at=t, deadline=deadline) for t in times]


def test_nothing_pending_is_never_due():
    for policy in [IMMEDIATE, BATCHED, LAZY, *PRESETS.values()]:
        assert not due_for_execution(policy, [], 1e9, uncertified_waiting=True)
        assert next_wakeup(policy, [], 0.0) is None


def test_immediate():
    assert due_for_execution(IMMEDIATE, _at(5.0), 5.0, False)
    assert next_wakeup(IMMEDIATE, _at(5.0), 5.0) == 5.0


def test_batched_count_window_and_deadline():
    assert not due_for_execution(BATCHED, _at(0.0, 1.0), 5.0, uncertified_waiting=True)
    assert due_for_execution(BATCHED, _at(0.0, 1.0, 2.0), 5.0, False)  # 3 pending = count
    assert not due_for_execution(BATCHED, _at(0.0, 1.0), 9.99, False)
    assert due_for_execution(BATCHED, _at(0.0, 1.0), 10.0, False)  # oldest is a window old
    assert next_wakeup(BATCHED, _at(1.0, 0.5), 2.0) == 10.5
    # a request's own earlier deadline comes first
    early = [*_at(1.0), PendingView(received_at=2.0, deadline=4.0)]
    assert next_wakeup(BATCHED, early, 2.0) == 4.0
    assert not due_for_execution(BATCHED, early, 3.9, False)
    assert due_for_execution(BATCHED, early, 4.0, False)
    # count only: the policy deadline is the timer
    assert next_wakeup(COUNT_ONLY, _at(1.0, 2.0), 2.0) == 61.0
    assert due_for_execution(COUNT_ONLY, _at(1.0, 2.0), 61.0, False)
    assert not due_for_execution(COUNT_ONLY, _at(1.0, 2.0), 60.9, False)


def test_lazy_waits_for_a_blocked_inference_or_a_deadline():
    assert not due_for_execution(LAZY, _at(0.0, 1.0, 2.0, 3.0), 30.0, False)
    assert due_for_execution(LAZY, _at(0.0), 30.0, uncertified_waiting=True)
    assert due_for_execution(LAZY, _at(0.0, 20.0), 60.0, False)  # oldest deadline
    assert next_wakeup(LAZY, _at(20.0, 5.0), 30.0) == 65.0
    assert next_wakeup(LAZY, _at(0.0), 70.0) == 70.0  # overdue: wake now
    assert next_wakeup(LAZY, [PendingView(0.0, deadline=10.0)], 1.0) == 10.0
    # under exclude a blocked inference only exists in the no-unaffected-shard fallback
    assert due_for_execution(LAZY_EXCLUDE, _at(0.0), 1.0, uncertified_waiting=True)
    assert not due_for_execution(LAZY_EXCLUDE, _at(0.0), 1.0, uncertified_waiting=False)


def test_infinite_deadline_has_no_timer():
    policy = ServingPolicy(timing="batched", batch_window_s=5.0, deadline_s=math.inf)
    assert next_wakeup(policy, _at(1.0), 2.0) == 6.0
    forever = ServingPolicy(timing="immediate", deadline_s=math.inf)
    assert next_wakeup(forever, _at(1.0), 2.0) == 2.0  # already due


def test_baselines_scheduling():
    oblivion, naive = PRESETS["inference-oblivion"], PRESETS["naive-postponed"]
    assert due_for_execution(oblivion, _at(0.0), 0.0, False)
    assert not due_for_execution(naive, _at(0.0), naive.deadline_s - 1, False)
    assert due_for_execution(naive, _at(0.0), naive.deadline_s, False)
    assert next_wakeup(naive, _at(3.0), 4.0) == 3.0 + naive.deadline_s


@pytest.mark.parametrize("name", list(PRESETS))
def test_next_wakeup_is_the_first_due_instant(name):
    policy = PRESETS[name]
    pending = [PendingView(0.0), PendingView(1.5, deadline=40.0), PendingView(2.0)]
    now = 2.0
    wake = next_wakeup(policy, pending, now)
    assert wake is not None and wake >= now
    assert due_for_execution(policy, pending, wake, False)
    for t in [now + (wake - now) * f for f in (0.0, 0.5, 0.999)]:
        if t < wake:
            assert not due_for_execution(policy, pending, t, False)


# -- answer_mode -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "uncertified"),
    [
        ("immediate-wait", "wait"),
        ("immediate-exclude", "excluded"),
        ("batched-wait", "wait"),
        ("batched-exclude", "excluded"),
        ("lazy-wait", "wait"),
        ("lazy-exclude", "excluded"),
        ("lazy-reject", "reject"),
        ("inference-oblivion", "wait"),
        ("naive-postponed", "stale"),
    ],
)
def test_answer_mode_table(name, uncertified):
    policy = PRESETS[name]
    assert answer_mode(policy, False) == uncertified
    assert answer_mode(policy, True) == ("certified" if policy.certify else uncertified)
    # nothing pending: the current models are the post-deletion models, for every policy
    for certified in (True, False):
        assert answer_mode(policy, certified, pending=False) == "certified"


def test_exclude_falls_back_to_wait_when_every_shard_is_affected():
    policy = PRESETS["batched-exclude"]
    assert answer_mode(policy, False, any_unaffected=False) == "wait"
    assert answer_mode(policy, True, any_unaffected=False) == "certified"
    assert answer_mode(PRESETS["lazy-reject"], False, any_unaffected=False) == "reject"


def test_every_preset_answers_something_sensible():
    allowed = {"certified", "excluded", "wait", "reject", "stale"}
    for policy in PRESETS.values():
        for certified in (True, False):
            mode = answer_mode(policy, certified)
            assert mode in allowed
            assert mode != "stale" or policy.expose_stale
