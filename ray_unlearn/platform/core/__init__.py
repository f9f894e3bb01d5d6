"""The core of a run, which knows no method by name: config, data, plan, storage, model
versions and their registry, the deletion log, training, the shard runtime, the unlearning
engine, publishing, compaction, audit."""
