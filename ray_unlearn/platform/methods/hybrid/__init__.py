"""Hybrid exact/approximate unlearning: workload estimate, DPUS, HS and OHS."""

from __future__ import annotations

from ray_unlearn.platform.methods.base import StrategyRef
from ray_unlearn.platform.methods.hybrid.checks import check_dpus_request, recording_hook
from ray_unlearn.platform.methods.hybrid.config import HybridConfig, config_problems
from ray_unlearn.platform.methods.registry import Method, Section, register

# by reference: the strategy module imports torch, which validating a config does not need
_STRATEGY = "ray_unlearn.platform.methods.hybrid.strategy:"

METHOD = register(
    Method(
        "hybrid",
        description="exact retraining or a direct parameter update, by predicted workload",
        strategies=(
            StrategyRef("dpus", _STRATEGY + "Dpus"),
            StrategyRef("hs", _STRATEGY + "HybridStrategy"),
            StrategyRef("ohs", _STRATEGY + "OptimizedHybrid"),
        ),
        sections=(Section("hybrid", HybridConfig),),
        shared_keys=("record", "dtype"),  # the recording hook's, on a SISA run too
        config_problems=config_problems,
        shard_hook=recording_hook,  # hybrid.record: every step's contribution, recorded
        check_request=check_dpus_request,
    )
)
