"""The manifest: one row per tile, the unit every later stage (featurize, train, evaluate) keys on.

Columns ``tile_id, uri, dataset, split, label, classname``; scene tiles add window columns
(``window_col, window_row, window_width, window_height``). The label-ordered class list travels in
the Parquet schema metadata, because a subset of rows (few-shot, one split) may not contain every
class, yet the learner needs all of them, in label order.

``tile_id`` is the cache key for frozen features, so it must be the same on every machine and in
every Python process: it is a SHA-256 of a canonical string, never ``hash()``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from bimors import storage
from bimors.config import DataConfig, StorageConfig
from bimors.data.catalog import DatasetError
from bimors.data.splits import DatasetListing, TileRecord, read_dataset

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("tile_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
        pa.field("classname", pa.string(), nullable=False),
    ]
)
WINDOW_COLUMNS: tuple[str, ...] = ("window_col", "window_row", "window_width", "window_height")

_META_CLASSNAMES = b"bimors.classnames"
_META_DATASET = b"bimors.dataset"

Window = tuple[int, int, int, int]


def canonical_uri(uri: str) -> str:
    """The form of a URI that is hashed: ``file://`` dropped so a local file has one id however
    it was named, trailing slashes removed."""
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return uri.rstrip("/")


def tile_id(uri: str, window: Window | None = None) -> str:
    """First 16 hex digits of SHA-256 of ``uri`` or ``uri#window=col,row,width,height``.

    64 bits is enough that a collision in any realistic archive (billions of tiles) is unlikely,
    and short enough to read in logs and file names.
    """
    key = canonical_uri(uri)
    if window is not None:
        col, row, width, height = (int(v) for v in window)
        key = f"{key}#window={col},{row},{width},{height}"
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def records_to_table(
    records: Iterable[TileRecord], dataset: str, classnames: Sequence[str] | None = None
) -> pa.Table:
    """Manifest table for records of one dataset; ``classnames`` (label order) goes into the metadata."""
    rows = list(records)
    table = pa.table(
        {
            "tile_id": [tile_id(r.uri) for r in rows],
            "uri": [r.uri for r in rows],
            "dataset": [dataset] * len(rows),
            "split": [r.split for r in rows],
            "label": pa.array([r.label for r in rows], pa.int32()),
            "classname": [r.classname for r in rows],
        },
        schema=MANIFEST_SCHEMA,
    )
    if classnames is None:
        classnames = classnames_of(table)
    return with_classnames(table, classnames, dataset)


def listing_to_table(listing: DatasetListing) -> pa.Table:
    return records_to_table(listing.records, listing.name, listing.classnames)


def build_manifest(cfg: DataConfig, storage_cfg: StorageConfig | None = None) -> pa.Table:
    """Read ``cfg.root`` (either layout) into a manifest table."""
    return listing_to_table(read_dataset(cfg, storage_cfg))


def with_classnames(table: pa.Table, classnames: Sequence[str], dataset: str | None = None) -> pa.Table:
    """``table`` with its label-ordered class list (and dataset name) recorded in the metadata."""
    metadata = dict(table.schema.metadata or {})
    metadata[_META_CLASSNAMES] = json.dumps(list(classnames)).encode()
    if dataset is not None:
        metadata[_META_DATASET] = dataset.encode()
    return table.replace_schema_metadata(metadata)


def classnames_of(table: pa.Table) -> list[str]:
    """Label-ordered class names: from the metadata when present, otherwise from the rows
    (which only works when every label from 0 to the largest occurs)."""
    metadata = table.schema.metadata or {}
    if _META_CLASSNAMES in metadata:
        return list(json.loads(metadata[_META_CLASSNAMES]))
    by_label: dict[int, str] = {}
    for label, name in zip(table.column("label").to_pylist(), table.column("classname").to_pylist(), strict=True):
        by_label.setdefault(int(label), name)
    missing = [i for i in range(max(by_label, default=-1) + 1) if i not in by_label]
    if missing:
        raise DatasetError(f"manifest has no class-name metadata and no rows for labels {missing[:10]}")
    return [by_label[i] for i in range(len(by_label))]


def write_manifest(table: pa.Table, uri: str, storage_cfg: StorageConfig | None = None) -> None:
    """Write one Parquet file (atomically on local disks, see :func:`bimors.storage.write_bytes`)."""
    storage.write_parquet(uri, table, storage_cfg)


def read_manifest(uri: str, storage_cfg: StorageConfig | None = None) -> pa.Table:
    data = storage.read_bytes(uri, storage_cfg)
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as err:
        raise DatasetError(f"{uri} is not a readable Parquet manifest: {err}") from None
    missing = [name for name in MANIFEST_SCHEMA.names if name not in table.column_names]
    if missing:
        raise DatasetError(f"{uri} is not a manifest: missing column(s) {', '.join(missing)} "
                           f"(a manifest has {', '.join(MANIFEST_SCHEMA.names)})")
    return table
