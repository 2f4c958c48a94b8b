"""The nightly acquisition job: classify every scene under an input prefix that has not been
classified yet, across the cluster, and leave a manifest so the next run skips it.

Layout under the output prefix::

    <output>/<scene key>/class_map.tif, tiles.parquet, preview.png, summary.json
    <output>/_manifest/<run id>.parquet    one row per scene attempted by that run
    <output>/_runs/<run id>.json           the run summary

A scene counts as processed when a manifest row says so or its ``summary.json`` exists (written
last, so a run killed midway loses no finished scene). Failed scenes are recorded with the reason
and not retried unless asked: re-running the same night does nothing new.
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from bimors import storage
from bimors.config import Config
from bimors.console import Progress
from bimors.pinned_model import PinnedModel, pin_model

log = logging.getLogger(__name__)

MANIFEST = "_manifest"
RUNS = "_runs"
MANIFEST_SCHEMA = pa.schema(
    [
        ("scene", pa.string()),
        ("key", pa.string()),
        ("status", pa.string()),  # ok | error
        ("output", pa.string()),
        ("tiles", pa.int64()),
        ("error", pa.string()),
        ("run_id", pa.string()),
        ("finished_at", pa.string()),
    ]
)


@dataclass
class NightlyReport:
    run_id: str
    input: str
    output: str
    model: str  # as requested (--model)
    model_identity: dict[str, Any] = field(default_factory=dict)  # what it was pinned to (bimors.pinned_model)
    listed: int = 0
    skipped: int = 0
    classified: int = 0
    failed: int = 0
    tiles: int = 0
    seconds: float = 0.0
    failures: dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        return (
            f"nightly {self.run_id}: {self.listed} scenes = {self.skipped} already done + {self.classified} "
            f"classified + {self.failed} failed; {self.tiles} tiles in {self.seconds:.1f} s"
        )


# --------------------------------------------------------------------------------------------
# what to process


def normalise(uri: str) -> str:
    """Remote URIs as given, local ones as absolute paths (scene keys are relative to them)."""
    return uri.rstrip("/") if storage.is_remote(uri) else str(storage.local_path(uri).resolve())


def list_scenes(input_uri: str, cfg: Config, stac: str | None = None) -> list[str]:
    """Scene URIs under ``input_uri`` with a scene suffix, plus the data assets of a STAC
    ItemCollection file (relative hrefs resolved against the file's folder); sorted, unique."""
    input_uri = normalise(input_uri)
    suffixes = tuple(s.lower() for s in cfg.scene.suffixes)
    fs, base = storage.filesystem(input_uri, cfg.storage)
    with storage.translated_errors(input_uri, cfg.storage):
        found = fs.find(base) if fs.isdir(base) else ([base] if fs.exists(base) else None)
    if found is None:
        raise storage.StorageError(f"{input_uri}: no such file or prefix")
    remote = storage.is_remote(input_uri)
    scenes = {fs.unstrip_protocol(p) if remote else p for p in found if p.lower().endswith(suffixes)}
    if stac:
        scenes.update(stac_assets(stac, cfg))
    return sorted(scenes)


def stac_assets(item_collection_uri: str, cfg: Config) -> list[str]:
    """Data-asset hrefs of a STAC ItemCollection (or a single Item): the asset with role ``data``,
    else the first GeoTIFF/COG asset of each item."""
    try:
        doc = json.loads(storage.read_bytes(item_collection_uri, cfg.storage))
    except json.JSONDecodeError as err:
        raise storage.StorageError(f"{item_collection_uri}: not a STAC JSON document ({err})") from None
    items = doc.get("features") if doc.get("type") == "FeatureCollection" else [doc] if doc.get("type") == "Feature" else None
    if items is None:
        raise storage.StorageError(f"{item_collection_uri}: expected a STAC ItemCollection or Item")
    base = item_collection_uri.rsplit("/", 1)[0]
    hrefs = []
    for item in items:
        assets = item.get("assets") or {}
        chosen = next((a for a in assets.values() if "data" in (a.get("roles") or [])), None)
        chosen = chosen or next((a for a in assets.values() if "tiff" in (a.get("type") or "")), None)
        if chosen is None or not chosen.get("href"):
            raise storage.StorageError(f"{item_collection_uri}: item {item.get('id')!r} has no data asset")
        href = chosen["href"]
        hrefs.append(href if "://" in href or href.startswith("/") else _resolve(base, href))
    return hrefs


def _resolve(base: str, href: str) -> str:
    scheme, sep, path = base.rpartition("://")
    return f"{scheme}{sep}{posixpath.normpath(posixpath.join(path, href))}"


def scene_key(scene_uri: str, input_uri: str) -> str:
    """Output folder name of a scene: its path under the input prefix, without the suffix."""
    base = input_uri.rstrip("/") + "/"
    relative = scene_uri[len(base):] if scene_uri.startswith(base) else scene_uri.split("://", 1)[-1].lstrip("/")
    stem, _ = posixpath.splitext(relative)
    return stem


def read_scene_manifest(output_uri: str, cfg: Config) -> pa.Table:
    fs, base = storage.filesystem(output_uri, cfg.storage)
    folder = posixpath.join(base, MANIFEST)
    with storage.translated_errors(output_uri, cfg.storage):
        files = sorted(f for f in fs.find(folder) if f.endswith(".parquet")) if fs.exists(folder) else []
        tables = [pq.read_table(f, filesystem=fs, schema=MANIFEST_SCHEMA) for f in files]
    return pa.concat_tables(tables) if tables else MANIFEST_SCHEMA.empty_table()


def finished_keys(output_uri: str, cfg: Config) -> set[str]:
    """Keys whose ``summary.json`` exists (finished even if their run never wrote its manifest)."""
    fs, base = storage.filesystem(output_uri, cfg.storage)
    if not fs.exists(base):
        return set()
    root = base.rstrip("/") + "/"
    return {posixpath.dirname(p[len(root):]) for p in fs.find(base) if p.endswith("/summary.json") and p.startswith(root)}


# --------------------------------------------------------------------------------------------
# the job


def run_nightly(
    cfg: Config, input_uri: str, output_uri: str, model_uri: str, stac: str | None = None, retry_failed: bool = False
) -> NightlyReport:
    """Classify the scenes under ``input_uri`` that no earlier run finished (tiles through
    :func:`~bimors.pipelines.scene_pipeline.classify_scenes`) and record every one in the manifest."""
    from bimors.pipelines.scene_pipeline import SceneTask, classify_scenes

    started = time.perf_counter()
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    report = NightlyReport(run_id, input_uri, output_uri, model_uri)
    input_uri = normalise(input_uri)
    scenes = list_scenes(input_uri, cfg, stac)
    report.listed = len(scenes)

    manifest = read_scene_manifest(output_uri, cfg)
    done = finished_keys(output_uri, cfg)
    for row in manifest.to_pylist():
        if row["status"] == "ok" or not retry_failed:
            done.add(row["key"])
    todo = [(s, scene_key(s, input_uri)) for s in scenes if scene_key(s, input_uri) not in done]
    report.skipped = report.listed - len(todo)
    log.info("nightly: %d scenes listed, %d already processed, %d to classify", report.listed, report.skipped, len(todo))

    if todo:
        pinned = pin_model(model_uri, cfg)  # once, here: a bad --model fails before any actor starts
        report.model_identity = pinned.record()
        log.info("nightly: model %s pinned to %s (%s)", model_uri, pinned.uri, pinned.digest)
        keys = dict(todo)
        tasks = [SceneTask(s, storage.join(output_uri, k)) for s, k in todo]
        rows: list[dict[str, Any]] = []
        tiles: list[Progress] = []  # made once the scenes are planned and their tiles counted

        def on_tiles(done: int, total: int) -> None:
            if not tiles:
                tiles.append(Progress("tiles", total, "tiles"))
            tiles[0].update(done - tiles[0].done)
            if done == total:
                tiles[0].close()

        with Progress("nightly", len(tasks), "scenes") as progress:
            for outcome in classify_scenes(cfg, tasks, pinned, on_tiles=on_tiles):
                rows.append({
                    "scene": outcome.task.uri, "key": keys[outcome.task.uri], "status": "ok" if outcome.ok else "error",
                    "output": outcome.task.output, "tiles": outcome.result.tiles if outcome.result else 0,
                    "error": outcome.error, "run_id": run_id, "finished_at": datetime.now(timezone.utc).isoformat(),
                })
                failed = sum(r["status"] == "error" for r in rows)
                progress.update(1, f"{failed} failed" if failed else None)
        _write_manifest(output_uri, run_id, rows, cfg, pinned)
        for row in rows:
            if row["status"] == "ok":
                report.classified += 1
                report.tiles += row["tiles"]
            else:
                report.failed += 1
                report.failures[row["scene"]] = row["error"] or ""
        if len(rows) != len(todo):
            raise RuntimeError(f"{len(todo)} scenes submitted but {len(rows)} came back")
    report.seconds = round(time.perf_counter() - started, 3)
    storage.write_bytes(storage.join(output_uri, RUNS, f"{run_id}.json"), json.dumps(asdict(report), indent=2).encode(), cfg.storage)
    return report


def _write_manifest(output_uri: str, run_id: str, rows: Sequence[dict[str, Any]], cfg: Config, model: PinnedModel) -> None:
    schema = MANIFEST_SCHEMA.with_metadata({"bimors.model": json.dumps(model.record())})
    table = pa.Table.from_pylist(list(rows), schema=schema)
    storage.write_parquet(storage.join(output_uri, MANIFEST, f"{run_id}.parquet"), table, cfg.storage)
