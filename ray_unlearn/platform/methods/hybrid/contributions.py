"""Contributions: each training batch's parameter update, with the ids of its samples.

What DPUS (direct parameter update) subtracts. While a shard trains, every optimizer step
``t`` of stage ``r`` is recorded as ``delta_t = params_after - params_before`` and the
sample ids of its batch; so a stage snapshot is, up to rounding, its parent plus the sum
of its stage's updates: ``W_r = W_{r-1} + sum_t delta_t``.

Storage, per slice version, beside its checkpoint, in two safetensors files:

``models/<version>/contributions.safetensors`` (:func:`contribution_path`), the index:

    batch.offsets    int64 (steps + 1,): step t's batch is ids[offsets[t]:offsets[t + 1]]
    batch.ids        int64: the sample ids of every step's batch, one after another
    batch.segments   int64: the first step of each optimizer run (training, then any OHS
                     fine-tuning): momentum does not cross them
    batch.scales     float32 (steps,): step t moved the weights by ``scales[t] * delta_t``
    batch.untracked  int64 (optional): retained samples whose share of a dropped step is
                     still in the weights, unrecorded (see "Why two files")

with metadata (format, stage, dtype, steps, the digest of the snapshot the updates lead to,
and the name of the updates file); and ``models/<version>/updates-<token>.safetensors``:

    delta.<param>    (steps, *param shape) in the recording dtype: every step's update

The index is written last and names its updates file, so a version has contributions or it
has none, and :func:`load_contributions` checks the digest against its weights, so
contributions of another attempt are never used. Size: ``epochs / batch_size`` steps per
sample, each a full parameter update: about ``epochs / batch_size * n_params * bytes`` per
training sample.

Why two files. Steps appended after the stored ones (OHS fine-tuning, calibration: a few)
go into the index, and the stored updates file is hard-linked (a server-side copy on
object stores) into the new version instead of read and written again. On a local disk the
updates are memory-mapped when loaded: only the rows a removal touches are read.

What DPUS leaves behind. A step whose batch held a revoked sample was computed on that
row, so after any DPUS (whole-batch or share) the step leaves the stored files of the new
version whole: its update is not kept rescaled. With ``share`` the retained samples' part
of the step stays in the weights but is no longer recorded: those samples are listed as
``batch.untracked``, and a later DPUS for one of them raises
:class:`MissingContributions` (HS/OHS then retrain exactly; DPUS alone refuses, as for a
version without contributions; :func:`versions_without_contributions` says so before a
request is logged). Dropping steps rewrites the updates file without their rows; a DPUS
that touches no step of a stage links it as before.

Contributions are derived from their batch's samples: after a deletion they must go with
the data. DPUS writes the new versions' contributions without the revoked samples'
updates; a retired version's contributions must be purged with its weights
(:func:`purge_contributions`).

Where it lives, in this package: ``updates.py`` (one stage's record in memory, its
subtraction, its file bytes), ``update_files.py`` (the files beside a version) and
``recording.py`` (the training hook that records them); this module names them in one place.
"""

from ray_unlearn.platform.methods.hybrid.recording import (
    ContributionRecorder,
    RecordedTraining,
    RecordingHook,
    recording_hook,
    train_and_record,
)
from ray_unlearn.platform.methods.hybrid.update_files import (
    contribution_bytes,
    contribution_path,
    has_contributions,
    load_contributions,
    purge_contributions,
    save_contributions,
    untracked_samples,
    versions_without_contributions,
)
from ray_unlearn.platform.methods.hybrid.updates import (
    CONTRIBUTIONS_FILE,
    DTYPES,
    FORMAT,
    UPDATES_FORMAT,
    UPDATES_PREFIX,
    MissingContributions,
    StageContributions,
    state_digest,
)

__all__ = [
    "CONTRIBUTIONS_FILE",
    "DTYPES",
    "FORMAT",
    "UPDATES_FORMAT",
    "UPDATES_PREFIX",
    "ContributionRecorder",
    "MissingContributions",
    "RecordedTraining",
    "RecordingHook",
    "StageContributions",
    "contribution_bytes",
    "contribution_path",
    "has_contributions",
    "load_contributions",
    "purge_contributions",
    "recording_hook",
    "save_contributions",
    "state_digest",
    "train_and_record",
    "untracked_samples",
    "versions_without_contributions",
]
