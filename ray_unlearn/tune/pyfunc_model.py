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


class EnsembleModel(mlflow.pyfunc.PythonModel):
    """pyfunc: rows of ``feature_width`` numbers (a DataFrame or an (n, D) array) -> a
    DataFrame with ``label`` and ``score_<c>`` per class (vote fractions or mean
    probabilities, by the run's aggregation rule)."""

    def load_context(self, context) -> None:
        d = Path(context.artifacts["ensemble"])
        self.doc = json.loads((d / ENSEMBLE_FILE).read_text())
        self.models = [
            torch.load(d / f"shard_{k}.pt", weights_only=False).eval()
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
