"""The registered model as an MLflow pyfunc, logged "from code" (this file) so nothing is pickled.

:func:`bimors.tracking.register_model` logs this file with two artifacts: ``checkpoint`` (the
learner checkpoint folder) and ``config`` (the run's config YAML, secrets left out). Loading it
with ``mlflow.pyfunc.load_model("models:/bimors@candidate")`` gives a model that classifies tiles
given by URI, through the same :class:`~bimors.pipelines.inference.Predictor` as every other path.
"""

from __future__ import annotations

import threading
from typing import Any

import mlflow
import pandas as pd

OUTPUT_COLUMNS = ["uri", "label", "probability", "caption"]


class BimorsModel(mlflow.pyfunc.PythonModel):
    """Input: a DataFrame with a ``uri`` column (local paths, file:// or s3:// tiles).
    Output: one row per tile with the most probable class, its probability and the caption."""

    def __init__(self) -> None:
        self._predictor: Any = None
        self._lock = threading.Lock()

    def load_context(self, context: Any) -> None:
        from bimors.config import load_config

        self.config = load_config(context.artifacts["config"])
        self.checkpoint = context.artifacts["checkpoint"]

    @property
    def predictor(self) -> Any:
        """Built on first use, not at load time: the frozen encoders are large, and a process that
        only inspects the model (its signature, its requirements) should not pay for them."""
        with self._lock:
            if self._predictor is None:
                import torch

                from bimors.pipelines.inference import Predictor

                device = "cuda" if torch.cuda.is_available() else "cpu"
                self._predictor = Predictor.from_checkpoint(self.config, self.checkpoint, device=device, encoders=True)
            return self._predictor

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from bimors.data.tiles import read_tile

        if "uri" not in model_input.columns:
            raise ValueError(f"model input needs a 'uri' column; got columns {list(model_input.columns)}")
        uris = [str(u) for u in model_input["uri"]]
        cfg = self.config
        images = [read_tile(u, cfg.data.decode, cfg.storage, cfg.featurize.max_side) for u in uris]
        predictor = self.predictor
        probs, captions = predictor.predict_images(images)
        best = probs.argmax(axis=1) if len(uris) else []
        return pd.DataFrame(
            {
                "uri": uris,
                "label": [predictor.classnames[i] for i in best],
                "probability": [float(probs[row, i]) for row, i in enumerate(best)],
                "caption": captions if captions else [""] * len(uris),
            },
            columns=OUTPUT_COLUMNS,
        )


mlflow.models.set_model(BimorsModel())
