"""The pyfunc model class a registered ensemble loads with (kept apart from
``model_export``: MLflow checks ``predict``'s type hints when the class is created and warns,
so only registering and loading import it)."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch

ENSEMBLE_FILE = "ensemble.json"


def serving_device(doc: dict) -> torch.device:
    """Where a loaded ensemble predicts: as a Serve shard replica does (a GPU this process
    may use, else the CPU; the CPU for a run pinned to ``training.device=cpu``)."""
    from ray_unlearn.platform.core.device import usable_device

    return usable_device(doc.get("training_device", "auto"))


def load_shard_module(path: Path, device: torch.device) -> torch.nn.Module:
    """A pickled shard module onto ``device``: ``map_location`` moves every storage, so a
    module exported from a CUDA process (an S3T model's backbone, older exports) loads on a
    CPU-only machine, where a plain ``torch.load`` fails looking for CUDA."""
    return torch.load(path, map_location=device, weights_only=False).eval()


class EnsembleModel(mlflow.pyfunc.PythonModel):
    """pyfunc: rows of ``feature_width`` numbers (a DataFrame or an (n, D) array) -> a
    DataFrame with ``label`` and ``score_<c>`` per class (vote fractions or mean
    probabilities, by the run's aggregation rule)."""

    def load_context(self, context) -> None:
        d = Path(context.artifacts["ensemble"])
        self.doc = json.loads((d / ENSEMBLE_FILE).read_text())
        device = serving_device(self.doc)
        self.models = [
            load_shard_module(d / f"shard_{k}.pt", device)
            for k in sorted(self.doc["versions"], key=int)
        ]

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        from ray_unlearn.platform.core.aggregate import aggregate
        from ray_unlearn.platform.core.training import predict_proba

        # MLflow hands a DataFrame's values over as a read-only view (pandas copy-on-write);
        # torch.from_numpy shares the memory and warns on it: copy only such an input
        x = np.require(np.asarray(model_input, dtype=np.float32), requirements=["C", "W"])
        if x.ndim != 2 or x.shape[1] != self.doc["feature_width"]:
            raise ValueError(
                f"input of shape {x.shape}: each row needs {self.doc['feature_width']} numbers"
            )
        probs = np.stack([predict_proba(m, torch.from_numpy(x)).numpy() for m in self.models])
        labels, scores = aggregate(probs, self.doc["rule"])
        out = pd.DataFrame(
            np.asarray(scores), columns=[f"score_{c}" for c in range(scores.shape[1])]
        )
        out.insert(0, "label", np.asarray(labels, dtype=np.int64))
        return out
