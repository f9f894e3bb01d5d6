"""A run: its config, data, plan, model store and deletion log, all under one run id.

``create_run`` materialises everything a later process needs (config, plan, run info) in
the storage root; ``open_run`` rebuilds the same context from there, in any process.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
import yaml

from ray_unlearn.platform.core.compaction import (
    copy_name,
    has_copy,
    load_copy,
    read_copy_rows,
    write_copy,
)
from ray_unlearn.platform.core.config import CoreRunConfig as RunConfig
from ray_unlearn.platform.core.config import config_from_dict, config_to_yaml
from ray_unlearn.platform.core.data import (
    Records,
    load_dataset,
    records_from_table,
    split_train_test,
)
from ray_unlearn.platform.core.deletion_log import DeletionLog
from ray_unlearn.platform.core.models import check_model, text_encoder_of
from ray_unlearn.platform.core.plan import TEST, PartitionPlan, make_plan
from ray_unlearn.platform.core.storage import RunLayout, Storage
from ray_unlearn.platform.core.training import ShardData
from ray_unlearn.platform.core.versions import ModelStore
from ray_unlearn.platform.methods import registry


class RunError(ValueError):
    """A run id that does not exist, or a run whose stored state does not fit its data."""


def new_run_id(name: str) -> str:
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


@dataclass
class RunContext:
    storage: Storage
    layout: RunLayout
    config: RunConfig
    plan: PartitionPlan
    info: dict = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return self.layout.run_id

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.info["feature_shape"])

    @property
    def num_classes(self) -> int:
        return int(self.info["num_classes"])

    @cached_property
    def config_digest(self) -> str:
        return hashlib.sha256(config_to_yaml(self.config).encode()).hexdigest()[:16]

    @cached_property
    def records(self) -> Records:
        """Every record of the dataset (train and test) still held: the run's own copy
        (compacted without deleted rows), or the source for runs made before copies."""
        if has_copy(self.storage, self.layout):
            recs = load_copy(self.storage, self.layout, self.config.data)
            missing = np.setdiff1d(self.plan.sample_ids, recs.sample_ids)
            if len(missing):  # a compaction removes rows of logged requests only
                requested = self.deletion_log.requested_sample_ids()
                missing = missing[~np.isin(missing, np.fromiter(requested, np.int64))]
        else:
            recs = load_dataset(self.config.data, self.storage, text_encoder_of(self.config.model))
            missing = np.setdiff1d(self.plan.sample_ids, recs.sample_ids)
        if len(missing):
            raise RunError(
                f"run {self.run_id}: the dataset {self.config.data.source!r} lacks {len(missing)} sample ids "
                f"of the run's plan (e.g. {missing[:5].tolist()}); was the source changed after training?"
            )
        return recs

    @cached_property
    def model_store(self) -> ModelStore:
        return ModelStore(self.storage, self.layout)

    @cached_property
    def deletion_log(self) -> DeletionLog:
        return DeletionLog(self.storage, self.layout)

    def present(self, ids: np.ndarray) -> np.ndarray:
        """``ids`` minus those compacted out of the run's copy (deleted rows: gone for good)."""
        recs = self.records
        if len(recs) == len(self.plan.sample_ids):
            return ids
        return ids[np.isin(ids, recs.sample_ids)]

    def rows(self, ids: np.ndarray) -> Records:
        """The records of ``ids`` still held (rows compacted away are dropped), sorted by id.

        When the whole data set is not in memory already, only these rows are read from the
        run's copy (a row group at a time: ``core/data/shard_read.py``), so a Train worker or
        shard actor holds its own shard and never the others' rows."""
        ids = np.asarray(ids, dtype=np.int64)
        if "records" in self.__dict__ or not has_copy(self.storage, self.layout):
            recs = self.records
            ids = self.present(ids)
            return recs.subset(recs.index_of(ids))
        table = read_copy_rows(self.storage, self.layout, ids)
        got = table.column("sample_id").to_numpy() if table.num_rows else np.empty(0, np.int64)
        missing = np.setdiff1d(ids, got)
        if len(missing):  # a compaction removes rows of logged requests only
            requested = np.fromiter(self.deletion_log.requested_sample_ids(), np.int64)
            missing = missing[~np.isin(missing, requested)]
            if len(missing):
                raise RunError(
                    f"run {self.run_id}: the run's copy of its data lacks {len(missing)} sample "
                    f"ids of the plan (e.g. {missing[:5].tolist()}) that no deletion removed"
                )
        if table.num_rows == 0:
            d = int(np.prod(self.feature_shape))
            return Records(
                np.empty(0, np.int64),
                np.empty(0, str),
                np.empty(0, np.int64),
                np.empty((0, d), np.float32),
                self.num_classes,
                self.feature_shape,
            )
        source = f"{self.storage.uri.rstrip('/')}/{copy_name(self.storage, self.layout)}"
        return records_from_table(table, source, self.config.data)

    def split_records(self, split: str, exclude=()) -> Records:
        """'train' or 'test' records in plan order (sorted by id), minus ``exclude`` ids
        (and rows compacted away)."""
        ids = self.plan.sample_ids[(self.plan.shards == TEST) == (split == "test")]
        if len(exclude):
            ids = ids[~np.isin(ids, np.asarray(list(exclude), dtype=np.int64))]
        return self.rows(ids)

    def shard_data(self, shard: int, exclude=()) -> ShardData:
        """The live rows of ``shard`` (``exclude``: ids deleted so far), read alone when
        the whole data set is not loaded (:meth:`rows`)."""
        ids, slices = self.plan.shard_members(shard)
        if len(exclude):
            keep = ~np.isin(ids, np.asarray(list(exclude), dtype=np.int64))
            ids, slices = ids[keep], slices[keep]
        recs = self.rows(ids)
        if len(recs) != len(ids):  # compacted: deleted rows gone
            keep = np.isin(ids, recs.sample_ids)
            ids, slices = ids[keep], slices[keep]
        pos = recs.index_of(ids)
        return ShardData(
            shard=shard,
            sample_ids=ids,
            slices=slices,
            features=torch.from_numpy(np.ascontiguousarray(recs.features[pos])),
            labels=torch.from_numpy(recs.labels[pos].astype(np.int64)),
            num_slices=self.plan.num_slices,
        )


def _pin_threads(cfg: RunConfig) -> RunConfig:
    """Fix ``training.torch_threads`` (0 = this machine's CPUs, at most 4): results are only
    bit-for-bit reproducible for a fixed thread count, so a run keeps one for good."""
    if cfg.training.torch_threads:
        return cfg
    cfg = cfg.model_copy(deep=True)
    cfg.training.torch_threads = cfg.training.pinned_threads()
    return cfg


def create_run(cfg: RunConfig, run_id: str | None = None) -> RunContext:
    """Load the data, split it, plan the partition and record all of it under a new run id."""
    cfg = _pin_threads(cfg)
    storage = Storage(cfg.storage)
    layout = RunLayout(run_id or new_run_id(cfg.name))
    if storage.exists(layout.run_info):
        raise RunError(f"run {layout.run_id} already exists under {storage.uri}")
    records = load_dataset(cfg.data, storage, text_encoder_of(cfg.model))
    model = check_model(cfg.model, records.feature_shape, records.num_classes)  # before any write
    registry.check_model(cfg, model)  # the method's own assumptions (S3T: head, blocks)
    train, test = split_train_test(records, cfg.data.test_fraction, cfg.seed)
    plan = make_plan(
        train.sample_ids,
        train.owner_ids,
        num_shards=cfg.partition.shards,
        num_slices=cfg.partition.slices,
        seed=cfg.seed,
        group_by=cfg.partition.group_by,
        test_ids=test.sample_ids,
        test_owners=test.owner_ids,
    )
    info = {
        "run_id": layout.run_id,
        "created_at": time.time(),
        "data_source": cfg.data.source,
        "num_train": len(train),
        "num_test": len(test),
        "num_owners": len(plan.owners),
        "feature_shape": list(records.feature_shape),
        "num_classes": records.num_classes,
    }
    storage.write_bytes(layout.config, config_to_yaml(cfg).encode())
    write_copy(storage, layout, records)  # the run's own data: compacted as deletions finish
    storage.write_table(layout.plan, plan.to_table())
    storage.write_json(layout.run_info, info)
    ctx = RunContext(storage, layout, cfg, plan, info)
    ctx.__dict__["records"] = records  # already loaded: spare the second read
    return ctx


def open_run(storage_root: str, run_id: str) -> RunContext:
    storage = Storage(storage_root)
    layout = RunLayout(run_id)
    if not storage.exists(layout.run_info):
        known = storage.listdir("runs")
        hint = f"; runs there: {', '.join(known[-5:])}" if known else "; no runs there yet"
        raise RunError(f"no run {run_id!r} under storage root {storage.uri}{hint}")
    cfg = _pin_threads(
        config_from_dict(yaml.safe_load(storage.read_bytes(layout.config)), layout.config)
    )
    plan = PartitionPlan.from_table(storage.read_table(layout.plan))
    return RunContext(storage, layout, cfg, plan, storage.read_json(layout.run_info))
