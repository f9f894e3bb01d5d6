"""Training: the one supervised loop, and SISA shard training on it.

:func:`run_steps` is the loop every plain supervised model of the platform trains in (SISA
stages, memorization subset models, LiRA and MIA shadow models), with an ``on_step`` hook;
:func:`train_run_shard` is the one SISA driver (in process and on Ray Train workers), with a
:class:`ShardHook` through which a method adds to a run's training (hybrid records every
step's update) without a loop of its own.

SISA: one model per shard, trained slice by slice with a snapshot per slice.

Stage r (0-based) continues from stage r-1's weights and trains on the shard's slices
0..r. Its length is set by the *new* slice alone: ``ceil(epochs * |slice r| / batch)``
optimizer steps drawn from the cumulative data, so a shard's total work equals ``epochs``
passes over its data, and a stage's work never depends on later slices.

Exactness. Every random choice is a function of (seed, shard, slice, pass): the initial
weights of (seed, shard), the batch order of (seed, shard, slice, pass) over the stage's
rows sorted by sample id. The optimizer is created afresh at each stage, so a snapshot
(weights only) is the complete state. Hence retraining from the snapshot before the first
affected slice, on the data without the deleted samples, performs exactly the operations
that training from scratch on that data performs: the results are equal bit for bit on
CPU for a fixed thread count (tests/platform/core/test_training.py checks it), and on CUDA
with deterministic kernels (``training.device``; core/device.py, docs/gpu.md). The model and
each stage's rows move to the device; snapshots come back to the CPU, so checkpoints do not
depend on where they were trained.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ray_unlearn.platform.core.config import ModelConfig, TrainingConfig
from ray_unlearn.platform.core.device import module_device, resolve_device, to_cpu_state
from ray_unlearn.platform.core.models import build_model

if TYPE_CHECKING:
    from ray_unlearn.platform.core.run import RunContext

StateDict = dict[str, torch.Tensor]
# on_step(step, batch_rows, params_before, params_after) of :func:`run_steps`: called after
# each optimizer step with the batch's row indices and the parameters (by name) before and
# after it; ``params_after`` are the live tensors (copy what you keep).
LoopHook = Callable[[int, Any, StateDict, StateDict], None]
# on_step(stage, step, batch_sample_ids, params_before, params_after) of a SISA stage: the
# same, with the batch's sample ids. Records contributions (methods/hybrid/recording.py).
StepHook = Callable[[int, int, np.ndarray, StateDict, StateDict], None]

_INIT, _BATCHES = 0x494E4954, 0x42415443  # "INIT", "BATC": separate seed streams


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (numpy SeedSequence hashing)."""
    return int(
        np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0]
        >> 1
    )


def configure_threads(n: int) -> None:
    """Set torch's intra-op threads (results are reproducible for a fixed count)."""
    if n > 0 and torch.get_num_threads() != n:
        torch.set_num_threads(n)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads, then restore the caller's count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def take_rows(t: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """``t[rows]`` (a new tensor) for a shard's CPU tensors, copied by numpy: numpy asks the
    kernel for transparent huge pages for large arrays (madvise) and torch's allocator does
    not, so the copy of a 20k x 600 float32 shard less 5 rows took 8 ms instead of 40 ms
    (page faults; 2 cores, 2026-12-04), and the rows stay in the kind of memory the run's
    loader gives them (``RunContext.shard_data`` builds them with numpy). Same values."""
    if t.device.type != "cpu" or t.dtype == torch.bfloat16:  # no numpy view of these
        return t[torch.from_numpy(rows)]
    return torch.from_numpy(np.take(t.numpy(), rows, axis=0))


@dataclass
class ShardData:
    """The rows of one shard, sorted by sample id (the canonical order batches are drawn from)."""

    shard: int
    sample_ids: np.ndarray  # int64 (n,)
    slices: np.ndarray  # int32 (n,)
    features: torch.Tensor  # float32 (n, D)
    labels: torch.Tensor  # int64 (n,)
    num_slices: int

    def __post_init__(self) -> None:
        order = np.argsort(self.sample_ids, kind="stable")
        if not np.array_equal(order, np.arange(len(order))):
            self.sample_ids, self.slices = self.sample_ids[order], self.slices[order]
            self.features, self.labels = (
                take_rows(self.features, order),
                take_rows(self.labels, order),
            )

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_without_last"}

    def without(self, sample_ids: Iterable[int]) -> ShardData:
        ids = np.unique(np.fromiter(sample_ids, dtype=np.int64))
        # a deletion asks twice for the same rows (the runtime keeps the remaining rows, the
        # strategy retrains on them): the second copy of the features (rows x D float32,
        # ~20 ms at 12k x 600) is the first one
        last = self.__dict__.get("_without_last")
        if last is not None and np.array_equal(last[0], ids):
            return last[1]
        drop = np.isin(self.sample_ids, ids)
        if not drop.any():
            return self
        keep = np.flatnonzero(~drop)
        out = ShardData(
            self.shard,
            self.sample_ids[keep],
            self.slices[keep],
            take_rows(self.features, keep),
            take_rows(self.labels, keep),
            self.num_slices,
        )
        self.__dict__["_without_last"] = (ids, out)
        return out

    def slice_sizes(self) -> np.ndarray:
        return np.bincount(self.slices, minlength=self.num_slices)

    def ids_through(self, stage: int) -> np.ndarray:
        """Sample ids a stage-``stage`` snapshot was trained on (slices 0..stage)."""
        return self.sample_ids[self.slices <= stage]


@dataclass
class StageResult:
    stage: int
    state: StateDict
    sample_ids: np.ndarray  # ids of slices 0..stage
    metrics: dict[str, float] = field(default_factory=dict)


def init_model(
    model_cfg: ModelConfig, feature_shape, num_classes: int, seed: int, shard: int
) -> nn.Module:
    """The shard's initial model: weights depend only on (seed, shard)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, shard, _INIT))
        return build_model(model_cfg, feature_shape, num_classes)


def _optimizer(model: nn.Module, cfg: TrainingConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay
    )


def stage_steps(new_samples: int, epochs: int, batch_size: int) -> int:
    """Optimizer steps of a stage whose new slice holds ``new_samples`` samples."""
    return math.ceil(epochs * new_samples / batch_size)


def stage_batches(
    n_rows: int, steps: int, batch_size: int, seed: int, shard: int, stage: int
) -> Iterable[np.ndarray]:
    """Row indices of each batch: seeded passes over ``n_rows`` rows, cut at ``steps`` batches."""
    done, pass_no = 0, 0
    while done < steps:
        rng = np.random.default_rng(derive_seed(seed, shard, stage, pass_no, _BATCHES))
        perm = rng.permutation(n_rows)
        for i in range(0, n_rows, batch_size):
            if done == steps:
                return
            yield perm[i : i + batch_size]
            done += 1
        pass_no += 1


def run_steps(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    batches: Iterable[np.ndarray | torch.Tensor],
    *,
    on_step: LoopHook | None = None,
) -> tuple[float, int]:
    """The one supervised loop: one cross-entropy step of ``opt`` per batch (row indices
    into ``x`` (n, D) and ``y`` (n,), on the model's device), in order. Returns (sum of batch loss x batch size,
    rows seen). SISA stages, the memorization and LiRA/MIA shadow models all train here.

    ``on_step(step, batch_rows, params_before, params_after)`` (optional) sees every step;
    it reads, never changes, the training (the copies it costs are made only when given).
    """
    model.train()
    loss_sum, seen = 0.0, 0
    params = dict(model.named_parameters()) if on_step is not None else None
    for step, batch in enumerate(batches):
        idx = torch.as_tensor(batch).to(x.device)
        xb, yb = x[idx], y[idx]
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        if params is None:
            opt.step()
        else:
            before = {k: p.detach().clone() for k, p in params.items()}
            opt.step()
            on_step(step, batch, before, {k: p.detach() for k, p in params.items()})
        loss_sum += float(loss.detach()) * len(batch)
        seen += len(batch)
    return loss_sum, seen


def train_stage(
    model: nn.Module,
    data: ShardData,
    stage: int,
    cfg: TrainingConfig,
    seed: int,
    *,
    on_step: StepHook | None = None,
) -> dict[str, float]:
    """Train ``model`` in place for one stage; returns metrics (loss, steps, samples, seconds).

    ``on_step`` (optional) sees every optimizer step with the sample ids of its batch.
    """
    rows = np.flatnonzero(data.slices <= stage)
    new = int((data.slices == stage).sum())
    steps = stage_steps(new, cfg.epochs, cfg.batch_size) if len(rows) else 0
    t0, cpu0 = time.perf_counter(), time.process_time()
    model.train()
    opt = _optimizer(model, cfg)
    dev = module_device(model)
    # batches of stage positions (0..len(rows)-1), the same for every device
    batches = stage_batches(len(rows), steps, cfg.batch_size, seed, data.shard, stage)
    if dev.type == "cpu":
        # On the CPU the batches index the shard's own tensors through ``rows``: gathering
        # the stage's rows into a new tensor first (rows x D float32, freshly allocated and
        # page-faulted) cost 62 ms at 20k x 600 (6 ms at 4k), 15-30% of a one-slice
        # retraining of a 100k-sample purchase shard at 3 epochs. The rows a batch reads,
        # and so every step, are the same (tests/platform/core/test_training.py).
        x_all, y_all, ids = data.features, data.labels, data.sample_ids
        batches = (rows[b] for b in batches)
    else:
        # the stage's rows, once, on the model's device: batches index them there
        sel = torch.from_numpy(rows)
        x_all, y_all = data.features[sel].to(dev), data.labels[sel].to(dev)
        ids = data.sample_ids[rows]
    hook = None
    if on_step is not None:

        def hook(step: int, batch, before: StateDict, after: StateDict) -> None:
            on_step(stage, step, ids[batch], before, after)

    loss_sum, seen = run_steps(model, opt, x_all, y_all, batches, on_step=hook)
    return {
        "loss": loss_sum / seen if seen else float("nan"),
        "steps": float(steps),
        "samples_seen": float(seen),
        "train_rows": float(len(rows)),
        "seconds": time.perf_counter() - t0,
        # CPU seconds of this process (all torch threads): the work done, unlike wall time
        # not inflated when serving or other jobs compete for the cores.
        "cpu_seconds": time.process_time() - cpu0,
        # where the stage ran (1.0: a CUDA device), kept in the version's manifest
        "cuda": float(dev.type == "cuda"),
    }


def snapshot(model: nn.Module) -> StateDict:
    """The model's weights as CPU tensors (a copy), wherever it trains."""
    return to_cpu_state(model.state_dict())


def iter_stages(
    data: ShardData,
    model_cfg: ModelConfig,
    train_cfg: TrainingConfig,
    *,
    seed: int,
    feature_shape,
    num_classes: int,
    start_stage: int = 0,
    start_state: StateDict | None = None,
    on_step: StepHook | None = None,
) -> Iterator[StageResult]:
    """Train stages ``start_stage..R-1`` one at a time, yielding each stage's snapshot as
    soon as it is trained; stage ``start_stage`` continues from ``start_state`` (the snapshot
    of stage ``start_stage - 1``), or from the seeded initial weights when it is 0.
    ``on_step``: see :func:`train_stage`. Shards are independent, so the stages of several
    shards may be interleaved (the Ray Train job does) with the results of one at a time.
    """
    configure_threads(train_cfg.torch_threads)  # part of what makes training reproducible
    if start_stage > 0 and start_state is None:
        raise ValueError(f"start_stage={start_stage} needs the snapshot of stage {start_stage - 1}")
    device = resolve_device(train_cfg.device)  # before any CUDA work: sets determinism up
    # seeded on the CPU generator, then moved: the same initial weights on every device
    model = init_model(model_cfg, feature_shape, num_classes, seed, data.shard)
    if start_stage > 0:
        model.load_state_dict(start_state)
    model.to(device)
    for stage in range(start_stage, data.num_slices):
        metrics = train_stage(model, data, stage, train_cfg, seed, on_step=on_step)
        yield StageResult(stage, snapshot(model), data.ids_through(stage), metrics)


def train_shard(
    data: ShardData,
    model_cfg: ModelConfig,
    train_cfg: TrainingConfig,
    *,
    seed: int,
    feature_shape,
    num_classes: int,
    start_stage: int = 0,
    start_state: StateDict | None = None,
    on_stage: Callable[[StageResult], None] | None = None,
    on_step: StepHook | None = None,
) -> list[StageResult]:
    """Every stage of :func:`iter_stages`, each given to ``on_stage`` when it is trained."""
    results = []
    for res in iter_stages(
        data,
        model_cfg,
        train_cfg,
        seed=seed,
        feature_shape=feature_shape,
        num_classes=num_classes,
        start_stage=start_stage,
        start_state=start_state,
        on_step=on_step,
    ):
        if on_stage is not None:
            on_stage(res)
        results.append(res)
    return results


class ShardHook(Protocol):
    """What a method adds to a run's training without a loop of its own (hybrid's
    contribution recorder): it sees every optimizer step and every finished stage of one
    shard, and reads, never changes, the training."""

    def on_step(
        self, stage: int, step: int, batch_ids: np.ndarray, before: StateDict, after: StateDict
    ) -> None: ...

    def on_stage(self, result: StageResult) -> None: ...

    def summary(self) -> dict[str, float]:
        """Figures to add to the training report (summed over shards)."""
        ...


def train_run_shard(
    ctx: RunContext, shard: int, *, hook: ShardHook | None = None
) -> Iterator[StageResult]:
    """The SISA driver: shard ``shard`` of run ``ctx`` trained from its seeded initial
    weights on all its rows, stage by stage (generation 0). Both the in-process training
    (``core.runtime.train_all_shards``) and the Ray Train workers (``ray_unlearn.train.job``,
    which only place shards on workers and ship the snapshots) run it. Each stage is given
    to ``hook.on_stage`` before it is yielded.
    """
    cfg = ctx.config
    stages = iter_stages(
        ctx.shard_data(shard),
        cfg.model,
        cfg.training,
        seed=cfg.seed,
        feature_shape=ctx.feature_shape,
        num_classes=ctx.num_classes,
        on_step=None if hook is None else hook.on_step,
    )
    for res in stages:
        if hook is not None:
            hook.on_stage(res)
        yield res


@torch.no_grad()
def predict_proba(model: nn.Module, features: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """(n, D) -> (n, classes) softmax probabilities, on the CPU, computed on the model's
    device (the features move there a batch at a time)."""
    model.eval()
    dev = module_device(model)
    out = [
        F.softmax(model(features[i : i + batch_size].to(dev)), dim=1).cpu()
        for i in range(0, len(features), batch_size)
    ]
    return torch.cat(out) if out else torch.empty(0)
