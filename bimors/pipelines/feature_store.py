"""The Parquet feature store: frozen features computed once per tile, keyed by ``tile_id``.

Layout under the store URI::

    store.json              which frozen models and decode settings produced the features
    manifest.parquet        every tile of the dataset (tile_id, uri, dataset, split, label, classname)
    features/part-*.parquet one row per stored tile (manifest columns + caption, caption_emb,
                            image_emb, visual_tokens, and layer_means when a method reads them)
    errors/part-*.parquet   one row per failed tile (tile_id, uri, stage, error)
    quarantine/<kind>/…     shards that were read whole and were not valid Parquet (kept, not deleted)

Every tile ends up in exactly one of ``features`` and ``errors``. Shards are named after a hash of
the tile ids they hold and written whole (atomic rename locally, a single PUT on S3), so a retried
or restarted write can only replace a shard with the same content, and a killed run leaves no
half-visible shard. Embeddings are fixed-size lists of floats; their shapes travel in the schema
metadata so that the store reads back without Ray.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bimors import storage
from bimors.config import StorageConfig
from bimors.data.manifest import read_manifest, write_manifest
from bimors.errors import BimorsError

log = logging.getLogger(__name__)

FEATURES = "features"
ERRORS = "errors"
QUARANTINE = "quarantine"  # shards whose bytes were read whole and are not valid Parquet
ERROR_SCHEMA = pa.schema(
    [
        pa.field("tile_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("error", pa.string(), nullable=False),
    ]
)
EMBEDDING_COLUMNS = ("caption_emb", "image_emb", "visual_tokens", "layer_means")
#: Rows per Parquet row group of a shard. Shards are sorted by tile_id, so the row groups' min/max
#: statistics let a selection of tiles skip the groups (and their visual tokens) it does not need.
ROW_GROUP_ROWS = 64
_SHAPES_KEY = b"bimors.shapes"


class StoreMismatchError(BimorsError, ValueError):
    """The store was built by other frozen models or settings; mixing features would be wrong."""


def tensor_column(values: np.ndarray, dtype: pa.DataType) -> pa.FixedSizeListArray:
    """[N, *shape] array -> fixed-size list column of length prod(shape)."""
    flat = np.ascontiguousarray(values).reshape(len(values), -1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=dtype), flat.shape[1])


def column_to_numpy(table: pa.Table, name: str) -> np.ndarray:
    """A fixed-size list column -> [N, *shape] array, using the shape recorded in the metadata."""
    column = table.column(name).combine_chunks()
    shapes = json.loads((table.schema.metadata or {}).get(_SHAPES_KEY, b"{}"))
    flat = column.values.to_numpy(zero_copy_only=False).reshape(len(column), -1)
    return flat.reshape(len(column), *shapes.get(name, flat.shape[1:]))


def with_shapes(table: pa.Table, shapes: dict[str, Sequence[int]]) -> pa.Table:
    metadata = dict(table.schema.metadata or {})
    metadata[_SHAPES_KEY] = json.dumps({k: list(v) for k, v in shapes.items()}).encode()
    return table.replace_schema_metadata(metadata)


def shard_name(tile_ids: Iterable[str]) -> str:
    digest = hashlib.sha256("\n".join(sorted(tile_ids)).encode()).hexdigest()[:20]
    return f"part-{digest}.parquet"


class FeatureStore:
    def __init__(self, uri: str, storage_cfg: StorageConfig | None = None):
        self.uri = uri.rstrip("/")
        self.storage_cfg = storage_cfg

    def path(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)

    # ------------------------------------------------------------------ identity and manifest

    def ensure_identity(self, identity: dict[str, Any], optional: Sequence[str] = ()) -> dict[str, Any]:
        """Record what produced the features, or refuse to add to a store made by something else.
        ``optional`` keys name extra stored columns (true when held): a store holding one serves
        configs that do not read it, one without it cannot serve a config that does. Returns the
        store's identity, whose optional columns every new shard must hold too."""
        uri = self.path("store.json")
        if storage.exists(uri, self.storage_cfg):
            stored = json.loads(storage.read_bytes(uri, self.storage_cfg))
            core = lambda d: {k: v for k, v in d.items() if k not in optional}  # noqa: E731
            if core(stored) != core(identity):
                diffs = sorted(k for k in set(stored) | set(identity) if stored.get(k) != identity.get(k))
                raise StoreMismatchError(
                    f"feature store {self.uri} was built with other settings ({', '.join(diffs)} differ); "
                    "use another --output, or the settings it was built with"
                )
            lacking = [k for k in optional if identity.get(k) and not stored.get(k)]
            if lacking:
                raise StoreMismatchError(
                    f"feature store {self.uri} was built without {', '.join(lacking)}, which a method of this config "
                    "reads; featurize into another --output (a store keeps the columns of its first run)"
                )
            return stored
        storage.write_bytes(uri, json.dumps(identity, indent=2, sort_keys=True).encode(), self.storage_cfg)
        return identity

    def identity(self) -> dict[str, Any]:
        return json.loads(storage.read_bytes(self.path("store.json"), self.storage_cfg))

    def write_manifest(self, manifest: pa.Table) -> None:
        write_manifest(manifest, self.path("manifest.parquet"), self.storage_cfg)

    def read_manifest(self) -> pa.Table:
        return read_manifest(self.path("manifest.parquet"), self.storage_cfg)

    # ------------------------------------------------------------------ shards

    def shards(self, kind: str) -> list[str]:
        fs, base = storage.filesystem(self.path(kind), self.storage_cfg)
        with storage.translated_errors(self.path(kind), self.storage_cfg):
            if not fs.exists(base):
                return []
            names = fs.ls(base, detail=False)
        return sorted(self.path(kind, n.rsplit("/", 1)[-1]) for n in names if n.endswith(".parquet"))

    def shapes(self) -> dict[str, list[int]]:
        """The embedding shapes recorded in the features shards' metadata (from one shard's footer)."""
        shards = self.shards(FEATURES)
        if not shards:
            return {}
        fs, path = storage.filesystem(shards[0], self.storage_cfg)
        with storage.translated_errors(shards[0], self.storage_cfg), fs.open(path, "rb", cache_type="none") as handle:
            metadata = pq.read_schema(handle).metadata or {}
        return json.loads(metadata.get(_SHAPES_KEY, b"{}"))

    def read_shard(self, uri: str, columns: Sequence[str] | None, tile_ids: pa.Array | None = None) -> pa.Table | None:
        """The ``columns`` of one shard (Parquet projection: ``done_tile_ids`` reads the ``tile_id``
        chunks, not the visual tokens), or ``None`` when its bytes, read completely, are not valid
        Parquet (a torn or corrupt file): only then is it moved aside (``quarantine/``) and its
        tiles recomputed.

        A storage error (timeout, refused or reset connection, 5xx, 403) is retried by the client
        with bounded back-off and then raised as :class:`~bimors.storage.StorageError`, naming the
        URI: it says nothing about the shard's content, so nothing in the store is touched.

        With ``tile_ids``, only those rows, and only the row groups whose tile_id range can hold
        one of them are fetched."""
        wanted = list(columns) if columns else None
        where = None if tile_ids is None else pc.field("tile_id").isin(tile_ids)
        fs, path = storage.filesystem(uri, self.storage_cfg)
        try:  # ranged reads: the footer and the wanted columns' chunks, not the whole shard
            with fs.open(path, "rb", cache_type="none") as handle:
                return pq.read_table(handle, columns=wanted, filters=where)
        except (pa.ArrowException, ValueError) as err:  # bad content, or a fault pyarrow wrapped: read it whole
            log.debug("ranged read of %s failed (%s); reading it whole", uri, err)
        except Exception as err:  # noqa: BLE001 - the storage failed (after the client's retries)
            raise storage.storage_error(uri, err, self.storage_cfg) from err
        data = storage.read_bytes(uri, self.storage_cfg)  # a storage error is raised here, nothing is touched
        try:
            return pq.read_table(pa.BufferReader(data), columns=wanted, filters=where)
        except (pa.ArrowException, OSError, ValueError) as err:  # parsing bytes in memory: the content is bad
            self._quarantine(uri, err)
            return None

    def _quarantine(self, uri: str, err: BaseException) -> None:
        name = uri.rsplit("/", 1)[-1]
        kind = uri.rsplit("/", 2)[-2]
        target = self.path(QUARANTINE, kind, f"{name}.{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}")
        log.warning("shard %s is not valid Parquet (%s); moved to %s, its tiles will be recomputed", uri, err, target)
        storage.move(uri, target, self.storage_cfg)

    def read(self, kind: str, columns: Sequence[str] | None = None, tile_ids: set[str] | None = None) -> pa.Table:
        """All shards of ``features`` or ``errors`` as one table (unreadable shards are dropped);
        with ``tile_ids``, only those rows (filtered in the Parquet reader, so memory and bytes read
        follow the selection)."""
        wanted = None if tile_ids is None else pa.array(sorted(tile_ids), pa.string())
        tables = [t for t in (self.read_shard(u, columns, wanted) for u in self.shards(kind)) if t is not None]
        if not tables:
            if kind == ERRORS:
                return ERROR_SCHEMA.empty_table()
            return pa.table({name: pa.array([], pa.string()) for name in (columns or ["tile_id"])})
        return pa.concat_tables(tables, promote_options="default")

    def tile_ids(self) -> tuple[set[str], set[str]]:
        """(stored, failed) tile ids: the ``tile_id`` column of every shard, nothing else."""
        stored, failed = (set(self.read(kind, ["tile_id"]).column("tile_id").to_pylist()) for kind in (FEATURES, ERRORS))
        return stored, failed

    def done_tile_ids(self) -> set[str]:
        """Tiles already stored or already recorded as failed."""
        stored, failed = self.tile_ids()
        return stored | failed

    def write_shard(self, kind: str, table: pa.Table) -> str:
        uri = self.path(kind, shard_name(table.column("tile_id").to_pylist()))
        table = table.sort_by("tile_id")  # so the row groups' tile_id statistics prune selections
        storage.write_parquet(uri, table, self.storage_cfg, row_group_size=ROW_GROUP_ROWS)
        return uri

    def features(self, columns: Sequence[str] | None = None, tile_ids: set[str] | None = None) -> pa.Table:
        return self.read(FEATURES, columns, tile_ids)

    def errors(self) -> pa.Table:
        return self.read(ERRORS)
