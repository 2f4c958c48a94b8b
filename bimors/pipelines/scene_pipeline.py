"""Scenes as tiles through Ray Data: the nightly job's and the endpoint's scene jobs' one pipeline.

    plan (driver) -> read windows (actor pool) -> caption (BLIP-2 + BERT pool) -> classify
    (CLIP + learner pool) -> per scene, once all its tiles are in: write the outputs (a Ray task)

Tiles, not scenes, are the unit of work, so one large scene spreads over every actor of every pool,
and captioning and classification scale apart as they do in featurize and in Serve. Each pool has
its own size (fixed or ``[min, max]``), CPUs/GPUs and batch size (``scene.read|caption|classify``),
and each actor is given one batch at a time, so none holds queued work while another is idle.

Scenes are planned on the driver (:func:`~bimors.pipelines.scene.plan_scene`: size, bands, the
stretch from one overview read); a scene that cannot be planned is reported at once and the others go
on. Their tiles are interleaved (a block of each scene in turn), so a small scene finishes early
instead of waiting behind a large one. What comes out of the classify stage is small (class,
probability, caption, a packed owned-pixels mask): the driver groups it by scene and hands each
complete scene to a writer task, so pixels never gather anywhere and scenes finish independently.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from bimors.config import Config, SceneConfig, StorageConfig
from bimors.pinned_model import PinnedModel
from bimors.pipelines.scene import (
    ScenePlan, SceneReader, SceneResult, check_classes, gdal_env, plan_scene, read_tile_row, tile_rows, write_scene,
)
from bimors.pipelines.stages import PLACEHOLDER, Batch, CaptionStage, ClassifyStage, object_array, one_line

log = logging.getLogger(__name__)

#: Columns that leave the classify stage for the driver (everything but pixels and embeddings).
RESULT_COLUMNS = (
    "scene", "tile_id", "row_off", "col_off", "height", "width", "minx", "miny", "maxx", "maxy", "owned",
    "mask", "stage", "error", "caption", "class_index", "probability",
)


@dataclass(frozen=True)
class SceneTask:
    """A scene to classify and where its outputs go."""

    uri: str
    output: str


@dataclass
class SceneOutcome:
    """How one scene ended: ``result`` when its outputs were written, else ``error``."""

    task: SceneTask
    result: SceneResult | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.result is not None


@dataclass(frozen=True)
class ModelInfo:
    """What the driver needs of the pinned model: its classes and whether it reads captions."""

    classnames: list[str]
    needs_captions: bool

    @classmethod
    def of(cls, model: PinnedModel, cfg: Config) -> "ModelInfo":
        from bimors import tracking
        from bimors.models.checkpoint import read_meta
        from bimors.models.methods import LEARNERS

        meta = read_meta(tracking.resolve_checkpoint(model.uri, cfg), cfg.storage)
        return cls(list(meta["classnames"]), "caption_emb" in LEARNERS[meta["method"]].uses)


# --------------------------------------------------------------------------------------------
# the read stage


class TileReader:
    """Ray Data actor: reads the windows of a batch of tiles. Keeps the last few scenes open (a batch
    usually comes from one scene) and uses each scene's planned stretch, so tiles match."""

    OPEN_SCENES = 4

    def __init__(self, plans: dict[int, ScenePlan], cfg: SceneConfig, storage_cfg: StorageConfig | None):
        self.plans, self.cfg, self.storage_cfg = plans, cfg, storage_cfg
        self.readers: OrderedDict[int, SceneReader] = OrderedDict()
        self.env = gdal_env(cfg)
        self.env.__enter__()  # one bounded GDAL block cache for the actor's life

    def reader(self, scene: int) -> SceneReader:
        if scene in self.readers:
            self.readers.move_to_end(scene)
            return self.readers[scene]
        plan = self.plans[scene]
        reader = SceneReader(plan.uri, self.cfg, self.storage_cfg, max_pixels=plan.height * plan.width, plan=plan)
        self.readers[scene] = reader
        while len(self.readers) > self.OPEN_SCENES:
            self.readers.popitem(last=False)[1].close()
        return reader

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["tile_id"])
        images, masks, stages, errors = [PLACEHOLDER] * n, [b""] * n, [""] * n, [""] * n
        for i in range(n):
            row = {name: batch[name][i] for name in ("scene", "row_off", "col_off", "height", "width", "owned")}
            try:
                image, masks[i], stages[i], errors[i] = read_tile_row(self.reader(int(row["scene"])), row, self.cfg.max_side)
            except Exception as err:  # noqa: BLE001 - the scene became unreadable since it was planned
                stages[i], errors[i] = "read", one_line(err)
                continue
            if image is not None:
                images[i] = image
        batch["image"] = object_array(images)
        batch["mask"] = object_array(masks)
        batch["stage"] = np.array(stages, dtype=object)
        batch["error"] = np.array(errors, dtype=object)
        return batch


# --------------------------------------------------------------------------------------------
# the pipeline


def classify_scenes(
    cfg: Config,
    tasks: Sequence[SceneTask],
    model: PinnedModel,
    max_pixels: int | None = None,
    on_tiles: Callable[[int, int], None] | None = None,
) -> Iterator[SceneOutcome]:
    """Classify ``tasks`` on the Ray cluster; yields each scene's outcome as soon as it is known
    (a scene that cannot be planned first, then scenes as their outputs are written).

    ``on_tiles(done, total)`` is called as tiles come out of the classify stage. Every task yields
    exactly one outcome; a tile that fails is recorded in its scene's outputs."""
    import ray

    from bimors.pipelines.runtime import ensure_ray

    info = ModelInfo.of(model, cfg)
    check_classes(info.classnames)
    plans: dict[int, ScenePlan] = {}
    for index, (task, planned) in enumerate(zip(tasks, _plan_all(tasks, cfg, max_pixels))):
        if isinstance(planned, ScenePlan):
            plans[index] = planned
        else:
            yield SceneOutcome(task, error=planned)
    if not plans:
        return

    ensure_ray()
    tiles = {index: tile_rows(plan, cfg.scene, index) for index, plan in plans.items()}
    total = sum(len(rows) for rows in tiles.values())
    ds = _dataset(cfg, model, info, plans, tiles)
    writer = ray.remote(write_scene).options(num_cpus=cfg.scene.writer_cpus, max_retries=0)  # the per-scene step
    collected: dict[int, list[dict[str, Any]]] = {index: [] for index in plans}
    writing: dict[Any, int] = {}
    started, done = time.time(), 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in batch.to_pylist():
            scene = row["scene"]
            collected[scene].append(row)
            if len(collected[scene]) == len(tiles[scene]):
                rows = collected.pop(scene)
                writing[writer.remote(
                    plans[scene], rows, tasks[scene].output, info.classnames, cfg.scene, cfg.storage, model.record(), started
                )] = scene
        done += batch.num_rows
        if on_tiles:
            on_tiles(done, total)
        ready, _ = ray.wait(list(writing), num_returns=len(writing), timeout=0) if writing else ([], [])
        for ref in ready:
            yield _outcome(ref, tasks[writing.pop(ref)])
    for ref in list(writing):
        yield _outcome(ref, tasks[writing.pop(ref)])
    for scene, rows in collected.items():  # every tile comes back, so this is a bug if it happens
        yield SceneOutcome(tasks[scene], error=f"internal error: {len(rows)} of {len(tiles[scene])} tiles came back")


def _plan_all(tasks: Sequence[SceneTask], cfg: Config, max_pixels: int | None) -> list[ScenePlan | str]:
    """Plan scenes a few at a time (opening a remote scene is a handful of round trips)."""

    def plan(task: SceneTask) -> ScenePlan | str:
        try:
            return plan_scene(task.uri, cfg.scene, cfg.storage, max_pixels)
        except Exception as err:  # noqa: BLE001 - a scene that cannot be opened is recorded, the others go on
            log.warning("scene %s cannot be classified: %s", task.uri, err)
            return _reason(err)

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(plan, tasks))


def _dataset(cfg: Config, model: PinnedModel, info: ModelInfo, plans: dict[int, ScenePlan], tiles: dict[int, list[dict[str, Any]]]):
    import ray.data

    from bimors.pipelines.runtime import actor_pool

    sc = cfg.scene
    # a pool the cluster cannot place fails the run after this long, saying so, instead of waiting forever
    ray.data.DataContext.get_current().wait_for_min_actors_s = sc.startup_timeout_s
    ds = ray.data.from_arrow(_interleaved_blocks(tiles, sc.read.batch_size))
    ds = ds.map_batches(
        TileReader, fn_constructor_kwargs={"plans": plans, "cfg": sc, "storage_cfg": cfg.storage},
        batch_size=sc.read.batch_size, batch_format="numpy", compute=actor_pool(sc.read), num_cpus=sc.read.num_cpus,
    )
    if info.needs_captions:
        ds = ds.map_batches(
            CaptionStage, fn_constructor_kwargs={"cfg": cfg, "num_gpus": sc.caption.num_gpus},
            batch_size=sc.caption.batch_size, batch_format="numpy", compute=actor_pool(sc.caption),
            num_cpus=sc.caption.num_cpus, num_gpus=sc.caption.num_gpus or None,
        )
    ds = ds.map_batches(
        ClassifyStage, fn_constructor_kwargs={"cfg": cfg, "model": model, "num_gpus": sc.classify.num_gpus},
        batch_size=sc.classify.batch_size, batch_format="numpy", compute=actor_pool(sc.classify),
        num_cpus=sc.classify.num_cpus, num_gpus=sc.classify.num_gpus or None,
    )
    columns = [c for c in RESULT_COLUMNS if c != "caption" or info.needs_captions]
    return ds.select_columns(columns)


def _interleaved_blocks(tiles: dict[int, list[dict[str, Any]]], size: int) -> list[pa.Table]:
    """Blocks of ``size`` tiles, a block of each scene in turn."""
    per_scene = [[rows[i : i + size] for i in range(0, len(rows), size)] for rows in tiles.values()]
    rounds = max(len(blocks) for blocks in per_scene)
    return [pa.Table.from_pylist(blocks[r]) for r in range(rounds) for blocks in per_scene if r < len(blocks)]


def _outcome(ref: Any, task: SceneTask) -> SceneOutcome:
    import ray

    try:
        return SceneOutcome(task, result=ray.get(ref))
    except Exception as err:  # noqa: BLE001 - a scene whose outputs cannot be written is recorded
        log.warning("scene %s: writing the outputs failed: %s", task.uri, err)
        return SceneOutcome(task, error=_reason(err))


def _reason(err: BaseException) -> str:
    """One line for the manifest: a user error's own message (it names the scene), else the type too."""
    from bimors.errors import user_error_in

    user = user_error_in(err)
    return (str(user).strip().splitlines() or [""])[0][:500] if user is not None else one_line(err)
