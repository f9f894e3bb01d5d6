"""Ray Tune sweeps with MLflow logging. Not built yet: see issue 7."""
