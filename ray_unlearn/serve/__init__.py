"""Ray Serve layer: the shard deployments and the ERASER gateway (``app``, ``shard``,
``gateway``). Called, this package is :func:`ray_unlearn.api.serve` (``ru.serve(run_id)``)."""
