"""Ray Tune sweeps with MLflow logging, the Pareto front and the model registry export."""
