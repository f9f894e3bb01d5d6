"""ray-unlearn: machine unlearning on Ray.

The Python API (the same operations as the ``ray-unlearn`` command, which uses it)::

    import ray_unlearn as ru

    run = ru.train("configs/digits.yaml", ["partition.shards=4"])   # -> {"run_id": ...}
    ru.forget(run["run_id"], owner="owner-00017")                    # log, fence, execute
    ru.status(run["run_id"], request_id)                             # a request's state
    ru.audit(run["run_id"], owner="owner-00017")["clean"]            # no live version holds it
    ru.serve(run["run_id"], policy="lazy-wait")                      # Ray Serve + ERASER gate
    ru.sweep("configs/sweep.yaml")                                   # Ray Tune + MLflow
    ru.scores(run["run_id"], ["confidence"])                         # memorization scores

See :mod:`ray_unlearn.api`. Packages: ``platform`` (the domain, no Ray: ``core``,
``methods``, ``serving``, ``eval``), ``train`` (Ray Train jobs and the unlearning executor),
``serve`` (Ray Serve gateway), ``tune`` (sweeps).
"""

from ray_unlearn.api import audit, forget, scores, serve, status, sweep, train

__version__ = "0.1.0"
__all__ = ["__version__", "audit", "forget", "scores", "serve", "status", "sweep", "train"]
