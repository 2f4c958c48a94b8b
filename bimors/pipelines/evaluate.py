"""Evaluation: a learner checkpoint scores feature rows through the shared inference path, on a
Ray Data actor pool (the text encoder runs once per tile x class, which wants a GPU at scale).

Every row given is scored; the report carries the counts so a table can never hide a subsample.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa

from bimors.config import Config
from bimors.console import Progress
from bimors.pipelines.metrics import ClassificationReport, classification_report
from bimors.pipelines.stages import pick_device


class PredictStage:
    """One Predictor per actor; a batch of feature rows in, (tile_id, label, prediction, probability) out."""

    def __init__(self, cfg: Config, checkpoint: str, classnames: list[str]):
        from bimors.pipelines.inference import Predictor

        self.predictor = Predictor.from_checkpoint(cfg, checkpoint, pick_device(cfg.evaluate.predict.num_gpus), classnames)

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        probs = self.predictor.predict_table(batch, batch_size=len(batch) or 1)
        return {
            "tile_id": batch.column("tile_id").to_numpy(zero_copy_only=False),
            "label": batch.column("label").to_numpy(),
            "prediction": probs.argmax(-1),
            "probability": probs.max(-1),
        }


def predict_rows(cfg: Config, checkpoint: str, classnames: Sequence[str], rows: pa.Table, label: str = "evaluate") -> pa.Table:
    """Predictions for every row of ``rows`` (feature-store rows with labels in ``classnames``)."""
    import ray.data

    from bimors.pipelines.runtime import actor_pool, ensure_ray

    if rows.num_rows == 0:
        return pa.table({"tile_id": pa.array([], pa.string()), "label": pa.array([], pa.int64()),
                         "prediction": pa.array([], pa.int64()), "probability": pa.array([], pa.float32())})
    ensure_ray()
    stage = cfg.evaluate.predict
    ds = ray.data.from_arrow(rows).map_batches(
        PredictStage,
        fn_constructor_kwargs={"cfg": cfg, "checkpoint": checkpoint, "classnames": list(classnames)},
        batch_size=stage.batch_size,
        batch_format="pyarrow",
        compute=actor_pool(stage),
        num_cpus=stage.num_cpus,
        num_gpus=stage.num_gpus or None,
    )
    batches = []
    with Progress(label, rows.num_rows, "tiles") as progress:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            batches.append(batch)
            progress.update(batch.num_rows)
    return pa.concat_tables(batches)


def evaluate_rows(
    cfg: Config, checkpoint: str, classnames: Sequence[str], rows: pa.Table, label: str = "evaluate"
) -> ClassificationReport:
    """Score every row; ``label`` names the stage on the console (e.g. ``evaluate base classes``)."""
    predicted = predict_rows(cfg, checkpoint, classnames, rows, label)
    if predicted.num_rows != rows.num_rows:
        raise RuntimeError(f"scored {predicted.num_rows} of {rows.num_rows} rows")
    return classification_report(
        predicted.column("label").to_numpy(), predicted.column("prediction").to_numpy(), list(classnames)
    )
