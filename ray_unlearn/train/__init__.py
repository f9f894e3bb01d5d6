"""Ray layer for training and unlearning: the Ray Train job, the shard actors and the
long-lived unlearning executor. Called, this package is :func:`ray_unlearn.api.train`
(``ru.train("configs/digits.yaml")``)."""
