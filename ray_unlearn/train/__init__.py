"""Ray layer for training and unlearning: the Ray Train job, the shard actors and the
long-lived unlearning executor."""
