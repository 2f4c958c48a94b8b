"""Featurize: tiles in object storage -> Parquet feature store, on Ray Data.

decode (tasks) -> caption + caption embedding (BLIP-2/BERT actor pool) -> CLIP image features
(actor pool) -> shard writers (actor pool). Tiles already in the store (stored or failed) are skipped
before the dataset is built, so a re-run writes nothing and a killed run resumes where it stopped.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from bimors.config import Config
from bimors.console import Progress
from bimors.data.manifest import build_manifest, read_manifest
from bimors.data.protocols import protocol_rows
from bimors.data.synthetic import generate_synthetic
from bimors.pipelines.feature_store import FeatureStore
from bimors.pipelines.runtime import actor_pool, ensure_ray
from bimors.pipelines.shard_writer import ShardWriter
from bimors.pipelines.stages import CaptionStage, ClipStage, decode_batch

log = logging.getLogger(__name__)


@dataclass
class FeaturizeSummary:
    store: str
    inputs: int  # tiles this run was asked to featurize
    already_done: int  # of those, tiles the store already held (stored or failed)
    stored: int  # newly stored by this run
    errors: int  # newly failed in this run
    errors_by_stage: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def tiles_per_second(self) -> float:
        return (self.stored + self.errors) / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        stages = ", ".join(f"{n} {s}" for s, n in sorted(self.errors_by_stage.items()))
        return (
            f"featurize: {self.inputs} tiles = {self.already_done} already in the store + {self.stored} stored"
            f" + {self.errors} errors{f' ({stages})' if stages else ''}; {self.seconds:.1f} s"
            f" ({self.tiles_per_second:.1f} tiles/s) -> {self.store}"
        )


def store_identity(cfg: Config) -> dict[str, Any]:
    """What makes stored features what they are: a store never mixes features of other models."""
    from bimors.models.clip_backbone import needs_forced_quick_gelu

    backbone = cfg.model.backbone
    identity = {
        "backbone": backbone.model_dump(mode="json"),
        "captioner": cfg.model.captioner.model_dump(mode="json"),
        "caption_encoder": cfg.model.caption_encoder.model_dump(mode="json"),
        "decode": cfg.data.decode.model_dump(mode="json"),
        "max_side": cfg.featurize.max_side,
        "visual_tokens": cfg.featurize.visual_tokens,
    }
    if stores_layer_means(cfg):  # an optional column (OPTIONAL_COLUMNS): recorded only when held
        identity["layer_means"] = True
    if needs_forced_quick_gelu(backbone.name, backbone.pretrained):
        # stores featurized before bimors honoured the tag's QuickGELU hold GELU features: never mix them
        identity["quick_gelu"] = True
    return identity


#: store identity keys that name extra columns: a store holding one serves configs that do not read it
OPTIONAL_COLUMNS = ("layer_means",)


def open_store(cfg: Config, store: FeatureStore) -> dict[str, Any]:
    """Check (or record) the store's identity against the config; returns the store's identity."""
    return store.ensure_identity(store_identity(cfg), OPTIONAL_COLUMNS)


def stores_layer_means(cfg: Config) -> bool:
    """The per-block token means are stored when a method of the config reads them (APPLeNet)."""
    from bimors.models.methods import LEARNERS

    return any("layer_means" in LEARNERS[method].uses for method in cfg.methods())


def select_tiles(manifest: pa.Table, cfg: Config) -> pa.Table:
    """The tiles the configured protocol will ever read (``scope=protocol``), or all of them."""
    if cfg.featurize.scope == "all":
        return manifest
    wanted: set[str] = set()
    for seed in cfg.featurize.seeds:
        for rows in protocol_rows(manifest, cfg.data.shots, seed).values():
            wanted.update(rows.column("tile_id").to_pylist())
    return manifest.filter(pc.is_in(manifest["tile_id"], pa.array(sorted(wanted), pa.string())))


def prepare_dataset(cfg: Config, data: str | None = None) -> pa.Table:
    """The manifest of ``data`` (default ``data.root``).

    ``data.generate_synthetic`` writes the synthetic dataset into the config's own ``data.root``
    only: a folder given explicitly (``--data``) is the user's dataset and is read as it is."""
    if data is None:
        if cfg.data.generate_synthetic and cfg.data.root:
            generate_synthetic(cfg.data.root, cfg.data.synthetic, cfg.storage)
        return build_manifest(cfg.data, cfg.storage)
    return build_manifest(cfg.data.model_copy(update={"root": data}), cfg.storage)


def featurize(cfg: Config, output: str, data: str | None = None, manifest_uri: str | None = None) -> FeaturizeSummary:
    """Featurize every selected tile of ``data`` (or of the manifest Parquet at ``manifest_uri``)
    into the store at ``output``; returns the counts."""
    start = time.perf_counter()
    manifest = read_manifest(manifest_uri, cfg.storage) if manifest_uri else prepare_dataset(cfg, data)
    store = FeatureStore(output, cfg.storage)
    open_store(cfg, store)
    store.write_manifest(manifest)
    summary = featurize_manifest(cfg, store, select_tiles(manifest, cfg))  # checks the identity again: cheap
    summary.seconds = time.perf_counter() - start
    return summary


def featurize_manifest(cfg: Config, store: FeatureStore, selected: pa.Table) -> FeaturizeSummary:
    """Featurize the tiles of ``selected`` (manifest rows) that ``store`` does not hold yet."""
    start = time.perf_counter()
    identity = open_store(cfg, store)
    done = store.done_tile_ids()
    todo = selected.filter(pc.invert(pc.is_in(selected["tile_id"], pa.array(sorted(done), pa.string()))))
    summary = FeaturizeSummary(store.uri, selected.num_rows, selected.num_rows - todo.num_rows, 0, 0)
    if todo.num_rows:
        _run(cfg, todo, store, summary, layer_means=bool(identity.get("layer_means")))
    summary.seconds = time.perf_counter() - start
    return summary


def decoded_tiles(cfg: Config, rows: pa.Table):
    """A Ray dataset of ``rows`` (manifest rows: tile_id, uri, ...) read and decoded by Ray Data
    tasks, a bad tile recorded on its row (``decode_batch``); featurize's first step, and how
    evaluation reads the tiles of a learner that takes pixels."""
    import ray.data

    block = cfg.featurize.decode.batch_size
    return ray.data.from_arrow([rows.slice(i, block) for i in range(0, rows.num_rows, block)]).map_batches(
        decode_batch,
        fn_kwargs={"decode_cfg": cfg.data.decode, "storage_cfg": cfg.storage, "max_side": cfg.featurize.max_side},
        batch_size=block,
        batch_format="numpy",
        num_cpus=cfg.featurize.decode.num_cpus,
    )


def _run(cfg: Config, todo: pa.Table, store: FeatureStore, summary: FeaturizeSummary, layer_means: bool) -> None:
    import ray.data

    ensure_ray()
    fc = cfg.featurize
    ds = decoded_tiles(cfg, todo)
    for stage_cls, stage, extra in ((CaptionStage, fc.caption, {}), (ClipStage, fc.clip, {"layer_means": layer_means})):
        ds = ds.map_batches(
            stage_cls,
            fn_constructor_kwargs={"cfg": cfg, "num_gpus": stage.num_gpus, **extra},
            batch_size=stage.batch_size,
            batch_format="numpy",
            compute=actor_pool(stage),
            num_cpus=stage.num_cpus,
            num_gpus=stage.num_gpus or None,
        )
    ds = ds.map_batches(
        ShardWriter,
        fn_constructor_kwargs={"store_uri": store.uri, "storage_cfg": cfg.storage},
        batch_size=fc.shard_rows,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=fc.writers, max_tasks_in_flight_per_actor=1),
        num_cpus=fc.writer_cpus,
    )
    failures: Counter[str] = Counter()
    with Progress("featurize", todo.num_rows, "tiles") as progress:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for stage in batch["stage"]:
                if stage:
                    failures[str(stage)] += 1
                else:
                    summary.stored += 1
            summary.errors = sum(failures.values())
            progress.update(len(batch["stage"]), f"{summary.errors} errors" if summary.errors else None)
    summary.errors_by_stage = dict(failures)
