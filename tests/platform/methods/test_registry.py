"""The method registry: a method registered in a test (no edit in core, CLI or config) gets
its config section read from YAML, its strategy selected and run by the engine, and its
request check asked before anything is logged."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import BaseModel, ConfigDict, Field

from ray_unlearn.platform import methods
from ray_unlearn.platform.core.audit import audit
from ray_unlearn.platform.core.config import ConfigError, load_config
from ray_unlearn.platform.core.deletion_log import RequestState
from ray_unlearn.platform.core.engine import LocalShards, UnlearningEngine
from ray_unlearn.platform.core.plan import TEST
from ray_unlearn.platform.core.run import create_run, open_run
from ray_unlearn.platform.core.runtime import train_all_shards
from ray_unlearn.platform.methods import Method, Section, UnlearningStrategy, register, unregister
from ray_unlearn.platform.methods.sisa import SisaRetrain
from tests.conftest import tiny_config


class ToySection(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    strength: int = Field(1, ge=1, description="carried into every update's info")


class ToyForget(UnlearningStrategy):
    name = "toy-forget"
    exact = True
    description = "test method: SISA retraining, tagged"

    def unlearn_shard(self, state, deleted):
        update = SisaRetrain(self.ctx).unlearn_shard(state, deleted)
        update.info = {"strategy": self.name, "strength": self.ctx.config.toy.strength}
        return update


CHECKED: list[tuple[str, str | None]] = []
REFUSED_OWNER = "refused-by-toy"


def _toy_check(ctx, name, owner, ids):
    CHECKED.append((name, owner))
    if name == ToyForget.name and owner == REFUSED_OWNER:
        raise ValueError(f"--strategy {name!r}: the toy method refuses owner {owner}")


def _toy_problems(cfg):
    toy = getattr(cfg, "toy", None)
    return ["toy.strength: 13 is refused by the toy method"] if toy and toy.strength == 13 else []


class ToyHook:
    """A method's hook on SISA training (core/training.py's ShardHook): counts what it sees."""

    SEEN: list[tuple[int, int, int]] = []  # (shard, generation, stage) of every finished stage

    def __init__(self, shard: int, generation: int):
        self.shard, self.generation, self.steps = shard, generation, 0

    def on_step(self, stage, step, batch_ids, before, after) -> None:
        self.steps += 1

    def on_stage(self, result) -> None:
        ToyHook.SEEN.append((self.shard, self.generation, result.stage))

    def summary(self) -> dict[str, float]:
        return {"toy_steps": self.steps}


def _toy_hook(ctx, shard, generation=0):
    if ctx.config.unlearning.strategy != ToyForget.name:
        return None
    return ToyHook(shard, generation)


@pytest.fixture
def toy_method():
    CHECKED.clear()
    method = register(
        Method(
            "toy",
            strategies=(ToyForget,),
            sections=(Section("toy", ToySection),),
            config_problems=_toy_problems,
            check_request=_toy_check,
            shard_hook=_toy_hook,
        )
    )
    yield method
    unregister("toy")


def _yaml(tmp_path, body: str):
    p = tmp_path / "run.yaml"
    p.write_text(body)
    return p


def test_toy_section_and_strategy_load_from_yaml(tmp_path, toy_method):
    cfg = load_config(_yaml(tmp_path, "unlearning: {strategy: toy-forget}\ntoy: {strength: 3}\n"))
    assert cfg.toy.strength == 3 and cfg.unlearning.strategy == "toy-forget"
    assert load_config(None).toy.strength == 1  # a section with defaults is always there
    assert "toy-forget" in methods.strategy_names()
    with pytest.raises(
        ConfigError, match=r"toy\.bogus \(in .*\): unknown key; allowed here: strength"
    ):
        load_config(_yaml(tmp_path, "toy: {bogus: 1}\n"))
    with pytest.raises(
        ConfigError, match=r"toy\.strength \(override 'toy.strength=0'\): Input should be greater"
    ):
        load_config(None, ["toy.strength=0"])
    with pytest.raises(ConfigError, match="13 is refused by the toy method"):
        load_config(None, ["toy.strength=13"])


def test_unregistered_section_and_strategy_are_refused(tmp_path, toy_method):
    unregister("toy")
    try:
        with pytest.raises(ConfigError) as err:
            load_config(_yaml(tmp_path, "toy: {strength: 3}\n"))
        assert "toy (in " in str(err.value) and "unknown key; allowed here: name," in str(err.value)
        with pytest.raises(ConfigError) as err:
            load_config(None, ["unlearning.strategy=toy-forget"])
        assert "unknown strategy 'toy-forget'; available: dpus, hs, ohs, rum, sisa, s3t" in str(
            err.value
        )
    finally:
        register(toy_method)  # the fixture unregisters it


def test_toy_strategy_runs_and_its_check_comes_before_logging(tmp_path, toy_method):
    ToyHook.SEEN.clear()
    ctx = create_run(tiny_config(tmp_path, "unlearning.strategy=toy-forget", "toy.strength=2"))
    report = train_all_shards(ctx)
    assert open_run(ctx.storage.uri, ctx.run_id).config.toy.strength == 2  # stored with the run
    # the method's hook saw every stage of every shard's training, and its figures reach the report
    shards, slices = ctx.config.partition.shards, ctx.config.partition.slices
    assert sorted(ToyHook.SEEN) == [(k, 0, r) for k in range(shards) for r in range(slices)]
    assert report["toy_steps"] > 0
    hook = methods.registry.shard_hook(ctx, 1, 3)
    assert isinstance(hook, ToyHook) and (hook.shard, hook.generation) == (1, 3)

    # refused by the toy method's check: nothing is logged
    with pytest.raises(ValueError, match="the toy method refuses owner refused-by-toy"):
        methods.check_request(ctx, "toy-forget", REFUSED_OWNER, None)
    assert ctx.deletion_log.records() == []
    assert (ToyForget.name, REFUSED_OWNER) in CHECKED

    owners = np.unique(ctx.plan.owner_ids[ctx.plan.shards != TEST])
    owner = str(owners[2])
    methods.check_request(ctx, "toy-forget", owner, None)  # accepted
    assert CHECKED[-1] == ("toy-forget", owner)
    rec = UnlearningEngine(ctx, LocalShards(ctx)).forget(owner_id=owner)
    assert rec.state == RequestState.DONE
    assert rec.details["strategy"] == "toy-forget"
    after = audit(ctx, owner_id=owner)
    assert after["clean"] and after["exact"] and after["live_versions_containing"] == {}


def test_check_request_keeps_the_cli_messages(tiny_run):
    ctx = tiny_run
    methods.check_request(ctx, None)  # the run's own strategy: nothing to check
    with pytest.raises(ValueError, match="was not trained with S3T: 's3t' does not apply"):
        methods.check_request(ctx, "s3t")
    with pytest.raises(
        ValueError, match=r"(?s)--strategy 'dpus' does not fit run .*set hybrid\.record=true"
    ):
        methods.check_request(ctx, "dpus")
    with pytest.raises(ValueError, match="unknown strategy 'nope'"):
        methods.check_request(ctx, "nope")
    methods.check_request(ctx, "rum")
    assert methods.registry.shard_hook(ctx, 0) is None  # no method adds to plain SISA training


def test_names_and_sections_have_one_owner():
    with pytest.raises(
        ValueError, match="strategy name 'sisa' of method 'again' is owned by 'sisa'"
    ):
        register(Method("again", strategies=(SisaRetrain,)))
    with pytest.raises(ValueError, match="config section 'hybrid' of method 'again'"):
        register(Method("again", sections=(Section("hybrid", ToySection),)))
    with pytest.raises(ValueError, match="method 'sisa' is already registered"):
        register(Method("sisa"))
    assert "again" not in [m.name for m in methods.methods()]


def test_builtin_methods_and_listing():
    assert [m.name for m in methods.methods()] == ["sisa", "hybrid", "rum", "s3t"]
    assert methods.strategy_names() == ["dpus", "hs", "ohs", "rum", "sisa", "s3t"]
    rows = {r["name"]: r for r in methods.registry.listing()}
    assert rows["s3t"]["exact"] is True and "run kind" in rows["s3t"]["description"]
    assert rows["sisa"]["exact"] is True and rows["dpus"]["exact"] is False


def test_a_strategy_registered_by_reference_loads_on_first_use():
    """A method may register a strategy by name and import path (its module imports torch,
    which validating a config does not need): the class replaces the ref once imported, and
    another class under the same name is refused."""
    from ray_unlearn.platform.methods.base import _REGISTRY, StrategyRef, register_strategy

    ref = StrategyRef("toy-by-ref", f"{__name__}:ToyForget")
    with pytest.raises(TypeError, match="named 'toy-forget', not 'toy-by-ref'"):
        ref.load()  # the class's own name must match
    ref = StrategyRef("toy-forget", f"{__name__}:ToyForget")
    try:
        _REGISTRY.pop("toy-forget", None)
        register_strategy(ref)
        assert "toy-forget" in methods.available_strategies()
        assert methods.get_strategy("toy-forget") is ToyForget  # loaded, and kept
        assert _REGISTRY["toy-forget"] is ToyForget
        register_strategy(ref)  # the same ref again: no-op, the class stays
        assert _REGISTRY["toy-forget"] is ToyForget

        class Other(ToyForget):
            name = "toy-forget"

        with pytest.raises(ValueError, match="already registered"):
            register_strategy(Other)
    finally:
        _REGISTRY.pop("toy-forget", None)
