"""What the hybrid method adds around training and before a request is logged."""

from __future__ import annotations


def recording_hook(ctx, shard: int, generation: int = 0):
    """``hybrid.record``: the hook that records every training step's contribution beside
    its version (what dpus/hs/ohs subtract), in process and on Ray Train workers alike; None
    when the run does not record."""
    if not ctx.config.hybrid.record:
        return None
    from ray_unlearn.platform.methods.hybrid.recording import RecordingHook

    return RecordingHook(ctx, shard, generation=generation)


def check_dpus_request(ctx, name: str, owner: str | None, ids) -> None:
    """``dpus`` cannot fall back to retraining: every version it would correct must have
    the deleted samples' recorded contributions (an exact SISA retrain does not record them)."""
    if name != "dpus":
        return
    from ray_unlearn.platform.methods.hybrid.contributions import versions_without_contributions

    try:
        wanted = ctx.plan.samples_of_owner(owner) if owner is not None else ids
        missing = versions_without_contributions(ctx, wanted)
    except (KeyError, ValueError):
        return  # unknown owner or ids: submit_request reports them
    for k, versions in missing.items():
        raise ValueError(
            f"--strategy dpus: shard {k}'s versions {', '.join(versions)} have no recorded "
            "contributions of these samples (an exact retrain wrote them without recording, "
            "or an earlier DPUS dropped the steps they shared with a revoked sample), so DPUS "
            "cannot correct them; use hs or ohs, which retrain such a shard exactly"
        )
