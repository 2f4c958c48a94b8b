"""The rows one protocol run reads: K-shot train and val of the configured class subset with their
frozen features, and the test splits to score (tile ids and labels; their features stay in the
store until evaluation streams them to the predict actors).

The manifest and the store's tile ids are read once per run, for every split at once (base and new
classes of a base-to-new run included). Tiles whose features are missing are featurized first;
tiles that could not be featurized (they are in the store's errors table) are left out and counted,
never silently.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from bimors.config import Config
from bimors.data.manifest import classnames_of
from bimors.data.protocols import protocol_rows, subsample_classes
from bimors.pipelines.feature_store import FeatureStore

log = logging.getLogger(__name__)


@dataclass
class EvalSplit:
    """Tiles to score and their labels in ``classnames``; the features are read when scored."""

    classnames: list[str]
    rows: pa.Table  # tile_id, label: manifest rows of tiles that have features
    unfeaturized: int = 0  # tiles left out (featurize errors)

    def labels(self) -> dict[str, int]:
        return dict(zip(self.rows.column("tile_id").to_pylist(), self.rows.column("label").to_pylist()))


@dataclass
class ProtocolData:
    classnames: list[str]  # the label space of training (e.g. the base classes)
    splits: dict[str, pa.Table]  # train / val: feature rows with labels in ``classnames`` (K-shot: small)
    tests: dict[str, EvalSplit] = field(default_factory=dict)  # "base" and "new", or the subsample's name
    unfeaturized: dict[str, int] = field(default_factory=dict)  # train / val tiles left out (featurize errors)
    dataset: str = "dataset"  # the dataset's name (manifest metadata)

    @property
    def caption_dim(self) -> int:
        return self.splits["train"].schema.field("caption_emb").type.list_size


def protocol_data(cfg: Config, store: FeatureStore, seed: int, subsample: str | None = None) -> ProtocolData:
    """Train/val rows of ``seed``'s protocol for ``subsample`` (default ``data.subsample``) with their
    features, and the test splits to evaluate: base and new classes when training on the base half."""
    from bimors.pipelines.featurize import open_store

    open_store(cfg, store)  # a store without a column this method reads is refused here, not in a Ray worker
    subsample = subsample or cfg.data.subsample
    tests = ("base", "new") if subsample == "base" else (subsample,)
    manifest = store.read_manifest()
    all_classes = classnames_of(manifest)
    per_split = protocol_rows(manifest, cfg.data.shots, seed)
    train_val = {split: subsample_classes(per_split[split], subsample, all_classes) for split in ("train", "val")}
    test_rows = {name: subsample_classes(per_split["test"], name, all_classes) for name in tests}
    wanted = {tid for rows, _ in (*train_val.values(), *test_rows.values()) for tid in rows.column("tile_id").to_pylist()}
    stored, failed = _featurized(cfg, store, manifest, wanted)

    classnames = train_val["train"][1]
    features = store.features(tile_ids={t for rows, _ in train_val.values() for t in rows.column("tile_id").to_pylist()})
    data = ProtocolData(classnames, {}, dataset=(manifest.schema.metadata or {}).get(b"bimors.dataset", b"dataset").decode())
    for split, (rows, _) in train_val.items():
        data.splits[split], data.unfeaturized[split] = _join(rows, features, failed)
    for name, (rows, names) in test_rows.items():
        data.tests[name] = scored_split(rows, names, stored, failed)
    for name, count in [*data.unfeaturized.items(), *((f"test ({n})", s.unfeaturized) for n, s in data.tests.items())]:
        if count:
            log.warning("%s: %d %s tiles have no features (featurize errors) and are left out", store.uri, count, name)
    return data


def eval_split(cfg: Config, store: FeatureStore, seed: int, subsample: str = "all") -> EvalSplit:
    """Only the test split of ``subsample`` (a transfer target: nothing of it is trained on)."""
    manifest = store.read_manifest()
    rows, names = subsample_classes(protocol_rows(manifest, cfg.data.shots, seed)["test"], subsample, classnames_of(manifest))
    stored, failed = _featurized(cfg, store, manifest, set(rows.column("tile_id").to_pylist()))
    return scored_split(rows, names, stored, failed)


def scored_split(rows: pa.Table, classnames: list[str], stored: set[str], failed: set[str]) -> EvalSplit:
    ids = rows.column("tile_id").to_pylist()
    missing = [t for t in ids if t not in stored and t not in failed]
    if missing:
        raise RuntimeError(f"tile {missing[0]} is neither stored nor failed after featurizing")
    keep = [i for i, t in enumerate(ids) if t in stored]
    return EvalSplit(classnames, rows.take(pa.array(keep, pa.int64())).select(["tile_id", "label"]), len(ids) - len(keep))


def _featurized(cfg: Config, store: FeatureStore, manifest: pa.Table, wanted: set[str]) -> tuple[set[str], set[str]]:
    """(stored, failed) tile ids of the store after featurizing whatever of ``wanted`` is missing."""
    stored, failed = store.tile_ids()
    missing = wanted - stored - failed
    if not missing:
        return stored, failed
    from bimors.pipelines.featurize import featurize_manifest

    log.info("%d tiles of this protocol are not featurized yet: featurizing them first", len(missing))
    ids = manifest.column("tile_id").to_pylist()
    featurize_manifest(cfg, store, manifest.take([i for i, t in enumerate(ids) if t in missing]))
    return store.tile_ids()


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
