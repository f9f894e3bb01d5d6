"""The domain: data, plans, training, unlearning strategies, deletion log, store, audit.

Pure Python + torch + pyarrow. Nothing here imports Ray: every decision is a plain function
that the Ray layers (``ray_unlearn.train``, ``.serve``, ``.tune``) only place and move.
"""
