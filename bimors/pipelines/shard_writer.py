"""The featurize pipeline's last stage: each batch's stored rows become one features shard, its
failures one errors shard. Kept apart from the model stages so that a writer actor imports pyarrow,
not torch (a second or two less for every writer a pipeline starts)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from bimors.config import StorageConfig
from bimors.data.manifest import MANIFEST_SCHEMA
from bimors.pipelines.feature_store import ERROR_SCHEMA, ERRORS, FEATURES, FeatureStore, tensor_column, with_shapes

Batch = dict[str, np.ndarray]


class ShardWriter:
    """Writes each batch's stored rows as one features shard and its failures as one errors shard.
    An actor rather than tasks: one long-lived process instead of a stream of short-lived workers."""

    def __init__(self, store_uri: str, storage_cfg: StorageConfig | None):
        self.store = FeatureStore(store_uri, storage_cfg)

    def __call__(self, batch: Batch) -> Batch:
        return write_batch(batch, self.store)


def write_batch(batch: Batch, store: FeatureStore) -> Batch:
    failed = np.array([bool(e) for e in batch["error"]], dtype=bool)
    ok = ~failed
    if ok.any():
        columns: dict[str, Any] = {
            name: pa.array(batch[name][ok].tolist(), type=MANIFEST_SCHEMA.field(name).type) for name in MANIFEST_SCHEMA.names
        }
        columns["caption"] = pa.array(batch["caption"][ok].tolist(), pa.string())
        shapes = {}
        for name, dtype in (("caption_emb", pa.float32()), ("image_emb", pa.float32()), ("visual_tokens", pa.float16()),
                            ("layer_means", pa.float16())):
            if name in batch:
                values = np.asarray(batch[name][ok])
                columns[name] = tensor_column(values, dtype)
                shapes[name] = values.shape[1:]
        store.write_shard(FEATURES, with_shapes(pa.table(columns), shapes))
    if failed.any():
        errors = pa.table(
            {name: pa.array(batch[name][failed].tolist(), pa.string()) for name in ERROR_SCHEMA.names},
            schema=ERROR_SCHEMA,
        )
        store.write_shard(ERRORS, errors)
    return {"tile_id": batch["tile_id"], "stage": batch["stage"]}
