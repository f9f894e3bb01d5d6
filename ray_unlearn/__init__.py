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
``serve`` (Ray Serve gateway), ``tune`` (sweeps). ``train`` and ``serve`` are both those
subpackages and, called, the API's functions (:func:`ray_unlearn.api.train`,
:func:`ray_unlearn.api.serve`): importing ``ray_unlearn.train.job`` does not hide
``ru.train``.
"""

# The subpackages' own __init__ files import nothing (so this stays cheap); binding them
# here, made callable, means `ru.train` is the same object before and after anyone imports
# `ray_unlearn.train.<module>` (that import rebinds the package attribute to the subpackage).
from ray_unlearn import api, serve, train
from ray_unlearn.api import audit, forget, scores, status, sweep

api._make_callable(train, api.train)
api._make_callable(serve, api.serve)

__version__ = "0.1.0"
__all__ = ["__version__", "audit", "forget", "scores", "serve", "status", "sweep", "train"]
