"""The domain, without Ray.

* ``core``: what every run has (config, data, plan, storage, model versions, deletion log,
  training, the shard runtime, the unlearning engine, publishing, audit);
* ``methods``: unlearning methods as plug-ins (SISA, S3T, hybrid, RUM) behind one registry;
* ``serving``: certificates, ERASER policies, the gateway fence, answer journal and replay;
* ``eval``: accuracy and membership-inference attacks.

Pure Python + torch + pyarrow. Nothing here imports Ray: every decision is a plain function
that the Ray layers (``ray_unlearn.train``, ``.serve``, ``.tune``) only place and move.
"""
