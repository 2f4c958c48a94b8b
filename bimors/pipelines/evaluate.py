"""Evaluation: a learner checkpoint scores test splits through the shared inference path, on a Ray
Data actor pool (the text encoder runs once per tile x class, which wants a GPU at scale).

Features stream from the store to the predict actors (one Ray Data read task per shard, only the
columns the learner reads), so the driver never holds a split's features, only the small
predictions. A learner that prompts the image tower (MaPLe) has no stored features: its tiles are
read and decoded by Ray Data tasks instead, as featurize does. All splits of a run (base and new
classes) are scored in one pass. Every row given is scored; the report carries the counts so a
table can never hide a subsample.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bimors.config import Config
from bimors.console import Progress
from bimors.pipelines.feature_store import FEATURES, FeatureStore, with_shapes
from bimors.pipelines.inference import STORED_FEATURES
from bimors.pipelines.metrics import ClassificationReport, classification_report
from bimors.pipelines.protocol_data import EvalSplit
from bimors.pipelines.stages import pick_device

PREDICTION_SCHEMA = pa.schema([("tile_id", pa.string()), ("split", pa.string()), ("label", pa.int64()),
                               ("prediction", pa.int64()), ("probability", pa.float32())])


class PredictStage:
    """Store rows in, predictions out; one Predictor per split (one backbone shared by them), since
    base and new classes are scored against different class lists."""

    def __init__(self, cfg: Config, checkpoint: str, splits: dict[str, tuple[list[str], dict[str, int]]], shapes: dict[str, Any]):
        from bimors.models.clip_backbone import FrozenCLIP
        from bimors.pipelines.inference import Predictor

        device = pick_device(cfg.evaluate.predict.num_gpus)
        backbone = FrozenCLIP.load(cfg.model.backbone, cfg.storage, device)
        self.predictors = {
            name: Predictor.from_checkpoint(cfg, checkpoint, device, classnames, backbone=backbone)
            for name, (classnames, _) in splits.items()
        }
        self.split_of = {tid: (name, label) for name, (_, labels) in splits.items() for tid, label in labels.items()}
        self.shapes = shapes

    def __call__(self, batch: pa.Table | dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if isinstance(batch, dict):  # decoded tiles, for a learner that prompts the image tower
            usable = [i for i, err in enumerate(batch["error"]) if not err]
            tile_ids = [str(batch["tile_id"][i]) for i in usable]
            score = lambda predictor, rows: predictor.classify_images([batch["image"][usable[i]] for i in rows])  # noqa: E731
        else:
            table = with_shapes(batch, self.shapes)
            tile_ids = table.column("tile_id").to_pylist()
            score = lambda predictor, rows: predictor.predict_table(table.take(pa.array(rows, pa.int64())), batch_size=len(rows))  # noqa: E731
        found = [self.split_of.get(tid) for tid in tile_ids]
        out: dict[str, list] = {name: [] for name in PREDICTION_SCHEMA.names}
        for name, predictor in self.predictors.items():
            rows = [i for i, f in enumerate(found) if f is not None and f[0] == name]
            if not rows:
                continue
            probs = score(predictor, rows)
            out["tile_id"] += [tile_ids[i] for i in rows]
            out["split"] += [name] * len(rows)
            out["label"] += [found[i][1] for i in rows]
            out["prediction"] += probs.argmax(-1).tolist()
            out["probability"] += probs.max(-1).tolist()
        return {
            "tile_id": np.array(out["tile_id"], object), "split": np.array(out["split"], object),
            "label": np.array(out["label"], np.int64), "prediction": np.array(out["prediction"], np.int64),
            "probability": np.array(out["probability"], np.float32),
        }


def predict_splits(cfg: Config, checkpoint: str, store: FeatureStore, splits: dict[str, EvalSplit], label: str = "evaluate") -> dict[str, pa.Table]:
    """Predictions for every row of every split, streamed from the store (or the tiles) in one pass."""
    from bimors.pipelines.runtime import actor_pool, ensure_ray

    total = sum(s.rows.num_rows for s in splits.values())
    empty = {name: PREDICTION_SCHEMA.empty_table() for name in splits}
    if total == 0:
        return empty
    ensure_ray()
    uses = _learner_uses(cfg, checkpoint)
    source, batch_format = (_decoded_tiles(cfg, store, splits), "numpy") if "pixels" in uses else (_stored_rows(cfg, store, uses), "pyarrow")
    stage = cfg.evaluate.predict
    ds = source.map_batches(
        PredictStage,
        fn_constructor_kwargs={
            "cfg": cfg, "checkpoint": checkpoint, "shapes": store.shapes(),
            "splits": {name: (list(s.classnames), s.labels()) for name, s in splits.items()},
        },
        batch_size=stage.batch_size,
        batch_format=batch_format,
        compute=actor_pool(stage),
        num_cpus=stage.num_cpus,
        num_gpus=stage.num_gpus or None,
    )
    batches = []
    with Progress(label, total, "tiles") as progress:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            batches.append(batch.cast(PREDICTION_SCHEMA))
            progress.update(batch.num_rows)
    predicted = pa.concat_tables([PREDICTION_SCHEMA.empty_table(), *batches])
    return {name: predicted.filter(pc.equal(predicted["split"], name)) for name in splits}


def evaluate_splits(
    cfg: Config, checkpoint: str, store: FeatureStore, splits: dict[str, EvalSplit], label: str = "evaluate"
) -> dict[str, ClassificationReport]:
    """Score every row of every split; ``label`` names the stage on the console."""
    reports = {}
    for name, predicted in predict_splits(cfg, checkpoint, store, splits, label).items():
        expected = splits[name].rows.num_rows
        if predicted.num_rows != expected:
            raise RuntimeError(f"scored {predicted.num_rows} of {expected} rows of the {name} split")
        reports[name] = classification_report(
            predicted.column("label").to_numpy(), predicted.column("prediction").to_numpy(), list(splits[name].classnames)
        )
    return reports


def _read_shards(batch: dict[str, np.ndarray], store_uri: str, storage_cfg: Any, columns: list[str]) -> pa.Table:
    store = FeatureStore(store_uri, storage_cfg)
    tables = [t for t in (store.read_shard(str(uri), columns) for uri in batch["shard"]) if t is not None]
    return pa.concat_tables(tables) if tables else pa.table({c: pa.array([], pa.string()) for c in columns[:1]})


def _stored_rows(cfg: Config, store: FeatureStore, uses: frozenset[str]):
    """One read task per shard, through the store's own reader (projection to the columns the
    learner reads, ranged reads, its fault rules), at a fraction of a CPU: reading is I/O, and a
    cluster whose CPUs the predict actors hold must still schedule it (ray.data.read_parquet lists
    files in a 1-CPU task that then never runs)."""
    import ray.data

    shards = store.shards(FEATURES)
    columns = ["tile_id", *(c for c in STORED_FEATURES if c in uses)]
    return ray.data.from_items([{"shard": uri} for uri in shards], override_num_blocks=max(1, len(shards))).map_batches(
        _read_shards,
        fn_kwargs={"store_uri": store.uri, "storage_cfg": store.storage_cfg, "columns": columns},
        batch_size=1,
        batch_format="numpy",
        num_cpus=cfg.evaluate.read_cpus,
    )


def _decoded_tiles(cfg: Config, store: FeatureStore, splits: dict[str, EvalSplit]):
    """The splits' tiles read and decoded by Ray Data tasks (featurize's decode step)."""
    from bimors.pipelines.featurize import decoded_tiles

    wanted = pa.array(sorted({t for s in splits.values() for t in s.rows.column("tile_id").to_pylist()}), pa.string())
    manifest = store.read_manifest()
    return decoded_tiles(cfg, manifest.filter(pc.is_in(manifest["tile_id"], wanted)).select(["tile_id", "uri"]))


def _learner_uses(cfg: Config, checkpoint: str) -> frozenset[str]:
    """What the checkpoint's learner reads (nothing else is fetched from the store)."""
    from bimors.models.checkpoint import read_meta
    from bimors.models.methods import LEARNERS

    return LEARNERS[read_meta(checkpoint, cfg.storage)["method"]].uses
