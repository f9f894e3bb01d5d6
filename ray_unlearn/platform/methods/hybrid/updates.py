"""One stage's recorded contributions in memory: what DPUS subtracts, and their file format.

:class:`StageContributions` holds every optimizer step's update and the ids of its batch,
removes deleted samples' updates from them (whole batches, shares, or momentum-aware), and
turns into and from the bytes of the index and updates files (the layout and its rules:
:mod:`ray_unlearn.platform.methods.hybrid.contributions`; reading and writing them beside a
version: :mod:`~ray_unlearn.platform.methods.hybrid.update_files`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ray_unlearn.platform.core.training import StateDict

FORMAT = "ray-unlearn-contributions/2"
_FORMAT_1 = "ray-unlearn-contributions/1"  # one file, updates inside the index; still read
UPDATES_FORMAT = "ray-unlearn-updates/1"
CONTRIBUTIONS_FILE = "contributions.safetensors"
UPDATES_PREFIX = "updates-"
_DELTA, _OFFSETS, _IDS, _SEGMENTS = "delta.", "batch.offsets", "batch.ids", "batch.segments"
_SCALES = "batch.scales"
_UNTRACKED = "batch.untracked"
_EXTRA = "extra.delta."  # in the index: updates of steps appended after the stored ones
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class MissingContributions(FileNotFoundError):
    """A version has no (matching) recorded contributions: DPUS cannot unlearn from it."""


def state_digest(state: StateDict) -> str:
    """A content hash of a state dict (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"unsupported contribution dtype {dtype}; allowed: {', '.join(DTYPES)}")


@dataclass
class StageContributions:
    """The recorded updates of one stage: step ``t`` moved the weights by ``deltas[k][t]``
    and was computed on the samples ``ids[offsets[t]:offsets[t + 1]]``."""

    stage: int
    deltas: dict[str, torch.Tensor]  # name -> (steps, *param shape), recording dtype
    offsets: np.ndarray  # int64 (steps + 1,)
    ids: np.ndarray  # int64, every step's batch one after another
    digest: str = ""  # state_digest of the snapshot these updates lead to
    # first step of each optimizer run (training; OHS fine-tuning appended later): momentum
    # never crosses a segment start
    segments: np.ndarray | None = None
    # float32 (steps,): step t moved the weights by scales[t] * deltas[k][t] (None: all 1)
    scales: np.ndarray | None = None
    # the stored updates file the first ``stored`` steps of ``deltas`` were read from (a
    # path under the storage root), so that a save links it instead of writing them again
    source: str | None = field(default=None, compare=False, repr=False)
    stored: int = field(default=0, compare=False, repr=False)
    # int64: retained samples whose share of some step's update is still in the weights but
    # no longer recorded (the step left the stored files when a co-batched sample was
    # revoked): DPUS cannot remove them, so a later request for one counts as missing
    untracked: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        self.ids = np.asarray(self.ids, dtype=np.int64)
        seg = [0] if self.segments is None else self.segments
        self.segments = np.unique(np.asarray(seg, dtype=np.int64))
        n = {int(v.shape[0]) for v in self.deltas.values()}
        if n - {self.steps} or not len(self.offsets) or self.offsets[-1] != len(self.ids):
            raise ValueError("inconsistent contributions: steps of deltas, offsets and ids differ")
        if self.scales is not None:
            self.scales = np.asarray(self.scales, dtype=np.float32).reshape(-1)
            if len(self.scales) != self.steps:
                raise ValueError(
                    f"inconsistent contributions: {len(self.scales)} step scales for "
                    f"{self.steps} steps"
                )
            if (self.scales == 1.0).all():
                self.scales = None
        if self.source is None or not 0 < self.stored <= self.steps:
            self.source, self.stored = None, 0
        self.untracked = np.unique(
            np.asarray([] if self.untracked is None else self.untracked, dtype=np.int64)
        )

    @property
    def steps(self) -> int:
        return len(self.offsets) - 1

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.deltas.values())).dtype if self.deltas else torch.float32

    def batch_sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def batch_ids(self, step: int) -> np.ndarray:
        return self.ids[self.offsets[step] : self.offsets[step + 1]]

    def hits(self, deleted) -> np.ndarray:
        """(steps,) how many of ``deleted`` each step's batch held."""
        hit = np.isin(self.ids, np.asarray(deleted, dtype=np.int64))
        step_of = np.repeat(np.arange(self.steps), self.batch_sizes())
        return np.bincount(step_of[hit], minlength=self.steps)

    def step_scales(self) -> np.ndarray:
        """float32 (steps,): what each stored update is multiplied by."""
        return np.ones(self.steps, np.float32) if self.scales is None else self.scales

    def total(self, weights: np.ndarray | None = None) -> StateDict:
        """float32 ``sum_t w_t scale_t delta_t`` (every ``w_t`` 1 when ``weights`` is None):
        with no weights, the stage's whole update."""
        if weights is None and self.scales is None:
            return {k: v.float().sum(0) for k, v in self.deltas.items()}
        w = self.step_scales() if weights is None else np.asarray(weights, np.float32)
        if weights is not None and self.scales is not None:
            w = w * self.scales
        return self._weighted(np.arange(self.steps), w, scaled=True)

    def _weighted(self, steps: np.ndarray, w: np.ndarray, scaled: bool = False) -> StateDict:
        """float32 ``sum_{t in steps} w_t scale_t delta_t`` (``scaled``: ``w`` already holds
        the scales); reads only those steps' updates."""
        tw = np.asarray(w, np.float32)[steps]
        if not scaled and self.scales is not None:
            tw = tw * self.scales[steps]
        idx, tw = torch.from_numpy(np.asarray(steps, np.int64)), torch.from_numpy(tw)
        return {k: torch.tensordot(tw, v[idx].float(), dims=1) for k, v in self.deltas.items()}

    def materialized(self) -> StageContributions:
        """The same contributions with the scales folded into the updates (what operations
        that change single updates work on)."""
        if self.scales is None:
            return self
        s = torch.from_numpy(self.scales)
        deltas = {
            k: (v.float() * s.reshape((-1,) + (1,) * (v.dim() - 1))).to(v.dtype)
            for k, v in self.deltas.items()
        }
        return StageContributions(
            self.stage, deltas, self.offsets, self.ids, self.digest, self.segments
        )

    def _weights(self, deleted, scale: str, factor: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        counts = self.hits(deleted)
        if scale == "batch":
            return counts, (counts > 0).astype(np.float32)
        if scale == "share":
            share = factor * counts / np.maximum(self.batch_sizes(), 1)
            return counts, np.minimum(share, 1.0).astype(np.float32)
        raise ValueError(f"unknown DPUS scale {scale!r}; allowed: 'batch', 'share'")

    def without(
        self,
        deleted,
        scale: str = "batch",
        *,
        factor: float = 1.0,
        momentum: float = 0.0,
        bias_correction: bool = False,
    ) -> tuple[StateDict, StageContributions, int]:
        """Remove ``deleted`` samples' updates.

        Returns (the float32 update to subtract, the contributions that remain, the number
        of steps touched). ``scale="batch"``: every step whose batch held a deleted sample is
        removed whole. ``scale="share"``: such a step loses the share ``d / |batch|`` of its
        update (``d`` deleted samples in it) and the deleted ids; the share of each remaining
        sample stays ``delta / |original batch|``, so later removals stay consistent.

        ``momentum`` > 0 (see :meth:`_without_momentum`): remove a batch's *gradient* as it
        acted through the optimizer's momentum on this and the following steps, instead of
        its step's update (which mostly carries earlier batches' gradients).
        """
        lost = np.intersect1d(np.asarray(deleted, dtype=np.int64), self.untracked)
        if len(lost):
            raise MissingContributions(
                f"stage {self.stage}: the updates of samples {lost[:5].tolist()} left the "
                "record with a co-batched sample revoked earlier; DPUS cannot remove them "
                "(HS/OHS retrain exactly)"
            )
        counts, w = self._weights(deleted, scale, factor)
        if momentum > 0:
            return self.materialized()._without_momentum(
                deleted, counts, w, momentum, bias_correction
            )
        touched = np.flatnonzero(counts)
        removed = self._weighted(touched, w)
        return removed, self._drop_touched(deleted, counts, w), len(touched)

    def _drop_touched(self, deleted, counts: np.ndarray, w: np.ndarray) -> StageContributions:
        """The contributions without every step whose batch held a revoked sample: such a
        step's update was computed on the revoked rows, so it leaves the stored files whole
        (what was subtracted is the revoked share; the rest of it stays in the weights).
        The retained samples of a step that kept part of its update become ``untracked``.
        Untouched steps keep their updates and scales; the updates file is written anew
        (without the dropped rows) unless nothing was dropped."""
        keep = counts == 0
        if keep.all():
            return self
        step_of = np.repeat(np.arange(self.steps), self.batch_sizes())
        revoked = np.isin(self.ids, np.asarray(deleted, dtype=np.int64))
        part = (~keep) & (w < 1.0)  # revoked share removed, the rest still in the weights
        untracked = np.union1d(self.untracked, self.ids[part[step_of] & ~revoked])
        kept = np.flatnonzero(keep)
        # each optimizer run's first kept step starts its segment (momentum never crosses)
        starts = self.segments[self.segments < self.steps]
        seg = np.unique(np.searchsorted(kept, starts))
        seg = seg[seg < len(kept)]
        return StageContributions(
            self.stage,
            {k: v[torch.from_numpy(kept)] for k, v in self.deltas.items()},
            np.concatenate([[0], np.cumsum(self.batch_sizes()[kept])]),
            self.ids[keep[step_of]],
            "",
            seg if len(seg) else None,
            None if self.scales is None else self.scales[kept],
            untracked=untracked,
        )

    def _without_momentum(
        self, deleted, counts: np.ndarray, w: np.ndarray, beta: float, bias_correction: bool
    ) -> tuple[StateDict, StageContributions, int]:
        """Momentum-aware removal (heavy-ball SGD, or Adam's first moment).

        With momentum ``beta`` the update of step t is ``u_t = beta * u_{t-1} + i_t`` where
        ``i_t`` is step t's own gradient term (Adam: in ``c_t * u_t`` units, ``c_t = 1 -
        beta**(t+1)`` its bias correction, treating the second-moment scaling as constant).
        Batch t's gradient reaches step ``s >= t`` as ``beta**(s-t) * i_t``. So the removal of
        weight ``w_t`` of batch t's gradient is ``r_s = beta * r_{s-1} + w_s * i_s`` on every
        later step of its optimizer run, and the steps keep ``u_s - r_s``: recomputing ``i``
        from what is kept gives ``(1 - w_t) * i_t``, so later removals stay consistent. Every
        step is kept (its update still carries other batches' gradients); the removed ids
        leave its batch (a batch whose gradient is gone whole keeps no id).
        """
        touched = np.flatnonzero(counts)
        n = self.steps
        # position of each step in its optimizer run (bias correction restarts per run)
        starts = self.segments[self.segments < n]
        run_start = starts[np.searchsorted(starts, np.arange(n), side="right") - 1] if n else []
        pos = np.arange(n) - run_start
        c = (1.0 - beta ** (pos + 1.0)) if bias_correction else np.ones(n)
        c = c.astype(np.float32)
        is_start = np.zeros(n, dtype=bool)
        is_start[starts] = True
        removed, deltas = {}, {}
        first = int(touched[0]) if len(touched) else n
        for k, v in self.deltas.items():
            if first >= n:
                removed[k] = torch.zeros(v.shape[1:], dtype=torch.float32)
                deltas[k] = v
                continue
            new = v.clone()
            r_tilde = torch.zeros(v.shape[1:], dtype=torch.float32)
            prev = torch.zeros_like(r_tilde)  # c * u of the previous step of the run
            if first > 0 and not is_start[first]:
                prev = v[first - 1].float() * float(c[first - 1])
            total = torch.zeros_like(r_tilde)
            for s in range(first, n):
                if is_start[s]:
                    r_tilde.zero_()
                    prev.zero_()
                u_tilde = v[s].float() * float(c[s])
                if w[s] > 0:
                    r_tilde.mul_(beta).add_(u_tilde - beta * prev, alpha=float(w[s]))
                else:
                    r_tilde.mul_(beta)
                prev = u_tilde
                r = r_tilde / float(c[s])
                total += r
                new[s] = (v[s].float() - r).to(v.dtype)
            removed[k], deltas[k] = total, new
        step_of = np.repeat(np.arange(n), self.batch_sizes())
        gone = np.isin(self.ids, np.asarray(deleted, dtype=np.int64)) | (w[step_of] >= 1.0)
        sizes = np.bincount(step_of[~gone], minlength=n)
        rest = StageContributions(
            self.stage,
            deltas,
            np.concatenate([[0], np.cumsum(sizes)]),
            self.ids[~gone],
            "",
            self.segments,
            untracked=self.untracked,
        )
        return removed, rest, len(touched)

    def head(self, n: int) -> StageContributions:
        """The first ``n`` steps."""
        n = max(0, min(n, self.steps))
        return StageContributions(
            self.stage,
            {k: v[:n] for k, v in self.deltas.items()},
            self.offsets[: n + 1],
            self.ids[: self.offsets[n]],
            self.digest,
            self.segments[self.segments < max(n, 1)],
            None if self.scales is None else self.scales[:n],
            untracked=self.untracked,
        )

    def extended(self, other: StageContributions) -> StageContributions:
        """These steps followed by ``other``'s (same parameters). The steps already stored
        stay linked when saved; only ``other``'s are written."""
        if set(other.deltas) != set(self.deltas):
            raise ValueError("contributions of different parameter sets cannot be joined")
        deltas = {k: torch.cat([v, other.deltas[k].to(v.dtype)]) for k, v in self.deltas.items()}
        offsets = np.concatenate([self.offsets, self.offsets[-1] + other.offsets[1:]])
        segments = np.concatenate([self.segments, self.steps + other.segments])
        scales = None
        if self.scales is not None or other.scales is not None:
            scales = np.concatenate([self.step_scales(), other.step_scales()])
        return StageContributions(
            self.stage,
            deltas,
            offsets,
            np.concatenate([self.ids, other.ids]),
            other.digest,
            segments,
            scales,
            source=self.source,
            stored=self.stored,
            untracked=np.union1d(self.untracked, other.untracked),
        )

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.deltas.values()) + self.ids.nbytes

    # -- (de)serialisation ---------------------------------------------------------------
    def index_bytes(self, updates: str, stored: int | None = None) -> bytes:
        """The index file, naming its ``updates`` file, which holds the first ``stored``
        steps' updates (default: all); the updates of any later steps (appended by OHS
        fine-tuning or calibration: a few) are kept in the index itself."""
        stored = self.steps if stored is None else stored
        meta = {
            "format": FORMAT,
            "stage": str(self.stage),
            "dtype": _dtype_name(self.dtype),
            "digest": self.digest,
            "steps": str(self.steps),
            "updates": updates,
            "stored_steps": str(stored),
        }
        tensors = {
            _OFFSETS: torch.from_numpy(self.offsets),
            _IDS: torch.from_numpy(self.ids),
            _SEGMENTS: torch.from_numpy(self.segments),
            _SCALES: torch.from_numpy(self.step_scales()),
        }
        if len(self.untracked):
            tensors[_UNTRACKED] = torch.from_numpy(self.untracked)
        if stored < self.steps:
            tensors |= {_EXTRA + k: v[stored:].contiguous() for k, v in self.deltas.items()}
        return st_save(tensors, metadata=meta)

    def updates_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The updates file's tensors and metadata: every step's stored update."""
        tensors = {_DELTA + k: v.contiguous() for k, v in self.deltas.items()}
        return tensors, {"format": UPDATES_FORMAT, "steps": str(self.steps)}

    def updates_bytes(self) -> bytes:
        """The updates file: every step's stored update."""
        tensors, meta = self.updates_tensors()
        return st_save(tensors, metadata=meta)

    @classmethod
    def from_index(
        cls, blob: bytes, updates: dict[str, torch.Tensor] | None = None
    ) -> StageContributions:
        """From an index file and its updates (``delta.<param>`` tensors); an index of the
        first format holds its updates itself."""
        meta = _safetensors_metadata(blob)
        if meta.get("format") not in (FORMAT, _FORMAT_1):
            raise ValueError(f"not a contributions file (format {meta.get('format')!r})")
        t = st_load(blob)
        if meta["format"] == _FORMAT_1:
            updates = t
        elif updates is None:
            raise ValueError("the index of the second format needs its updates file")
        deltas = {k[len(_DELTA) :]: v for k, v in updates.items() if k.startswith(_DELTA)}
        stored = int(meta.get("stored_steps", meta["steps"]))
        if len(deltas) and {int(v.shape[0]) for v in deltas.values()} != {stored}:
            raise ValueError("the updates file does not match its index (steps differ)")
        extra = {k[len(_EXTRA) :]: v for k, v in t.items() if k.startswith(_EXTRA)}
        if not deltas or (extra and set(extra) != set(deltas)):
            raise ValueError("the updates and the index's extra steps name different parameters")
        if extra:
            deltas = {k: torch.cat([v, extra[k]]) for k, v in deltas.items()}
        return cls(
            int(meta["stage"]),
            deltas,
            t[_OFFSETS].numpy(),
            t[_IDS].numpy(),
            meta.get("digest", ""),
            t[_SEGMENTS].numpy() if _SEGMENTS in t else None,
            t[_SCALES].numpy() if _SCALES in t else None,
            untracked=t[_UNTRACKED].numpy() if _UNTRACKED in t else None,
        )


def _safetensors_metadata(blob: bytes) -> dict[str, str]:
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n]).get("__metadata__", {})
