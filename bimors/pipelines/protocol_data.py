"""The rows one protocol run reads: K-shot train, val and the full test split of the configured
class subset, each joined with its frozen features from the store.

Tiles whose features are missing are featurized first; tiles that could not be featurized (they
are in the store's errors table) are left out and counted, never silently.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from bimors.config import Config
from bimors.data.manifest import classnames_of
from bimors.data.protocols import protocol_rows, subsample_classes
from bimors.pipelines.feature_store import ERRORS, FeatureStore

log = logging.getLogger(__name__)


@dataclass
class ProtocolData:
    classnames: list[str]  # the label space of these rows (e.g. the base classes)
    splits: dict[str, pa.Table]  # train / val / test: feature rows with labels in ``classnames``
    unfeaturized: dict[str, int] = field(default_factory=dict)  # per split, tiles left out (featurize errors)

    @property
    def caption_dim(self) -> int:
        return self.splits["train"].schema.field("caption_emb").type.list_size


def protocol_data(cfg: Config, store: FeatureStore, seed: int, subsample: str | None = None) -> ProtocolData:
    """Rows of ``seed``'s protocol for ``subsample`` (default ``data.subsample``) with their features."""
    manifest = store.read_manifest()
    all_classes = classnames_of(manifest)
    subsample = subsample or cfg.data.subsample
    selected: dict[str, pa.Table] = {}
    classnames: list[str] = []
    for split, rows in protocol_rows(manifest, cfg.data.shots, seed).items():
        selected[split], classnames = subsample_classes(rows, subsample, all_classes)
    wanted = {tid for rows in selected.values() for tid in rows.column("tile_id").to_pylist()}
    _featurize_missing(cfg, store, manifest, wanted)
    features = store.features(tile_ids=wanted)
    failed = set(store.read(ERRORS, ["tile_id"]).column("tile_id").to_pylist())
    data = ProtocolData(classnames, {})
    for split, rows in selected.items():
        data.splits[split], data.unfeaturized[split] = _join(rows, features, failed)
        if data.unfeaturized[split]:
            log.warning("%s: %d %s tiles have no features (featurize errors) and are left out",
                        store.uri, data.unfeaturized[split], split)
    return data


def _featurize_missing(cfg: Config, store: FeatureStore, manifest: pa.Table, wanted: set[str]) -> None:
    missing = wanted - store.done_tile_ids()
    if not missing:
        return
    from bimors.pipelines.featurize import featurize_manifest

    log.info("%d tiles of this protocol are not featurized yet: featurizing them first", len(missing))
    ids = manifest.column("tile_id").to_pylist()
    featurize_manifest(cfg, store, manifest.take([i for i, t in enumerate(ids) if t in missing]))


def _join(rows: pa.Table, features: pa.Table, failed: set[str]) -> tuple[pa.Table, int]:
    """``features`` rows in ``rows``' order, with ``rows``' (re-indexed) labels; failed tiles dropped."""
    index = {tid: i for i, tid in enumerate(features.column("tile_id").to_pylist())}
    take, labels, dropped = [], [], 0
    for tid, label in zip(rows.column("tile_id").to_pylist(), rows.column("label").to_pylist()):
        if tid in index:
            take.append(index[tid])
            labels.append(label)
        elif tid in failed:
            dropped += 1
        else:
            raise RuntimeError(f"tile {tid} is neither stored nor failed after featurizing")
    joined = features.take(pa.array(take, pa.int64()))
    joined = joined.set_column(joined.schema.get_field_index("label"), "label", pa.array(labels, pa.int32()))
    return joined.replace_schema_metadata(features.schema.metadata), dropped


def labels_of(table: pa.Table) -> np.ndarray:
    return table.column("label").to_numpy().astype(np.int64)
