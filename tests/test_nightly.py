"""The nightly job: list new scenes, skip processed ones, classify the rest on Ray, record bad
scenes and finish; against local folders and the S3-compatible server (real Ray, real models)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bimors.data.synthetic_scene import write_synthetic_scene
from bimors.pipelines.nightly import list_scenes, read_scene_manifest, run_nightly, scene_key
from model_fixtures import SCENE_CLASSES

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def nightly_config(tiny_config):
    return tiny_config.model_copy(update={"scene": tiny_config.scene.model_copy(update={"tile_size": 64})})


def make_scenes(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_synthetic_scene(folder / "a.tif", SCENE_CLASSES, (2, 2), block=64, bands=3, dtype="uint8")
    (folder / "tile-2026").mkdir(exist_ok=True)
    write_synthetic_scene(folder / "tile-2026" / "b.tif", SCENE_CLASSES, (1, 3), block=64, nodata_blocks=[(0, 0)], seed=1)
    (folder / "broken.tif").write_bytes(b"II*\x00 truncated in transit")
    (folder / "notes.txt").write_text("not a scene")


def test_scene_listing_keys_and_stac(tmp_path, nightly_config):
    make_scenes(tmp_path / "in")
    stac = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": "x", "assets": {"thumb": {"href": "x.png", "roles": ["thumbnail"]},
                                                     "visual": {"href": "../extra/x.tif", "roles": ["data"], "type": "image/tiff"}}}]}
    (tmp_path / "catalog").mkdir()
    (tmp_path / "catalog" / "items.json").write_text(json.dumps(stac))
    scenes = list_scenes(str(tmp_path / "in"), nightly_config, stac=str(tmp_path / "catalog" / "items.json"))
    assert scenes == sorted([str(tmp_path / "in" / "a.tif"), str(tmp_path / "in" / "broken.tif"),
                             str(tmp_path / "in" / "tile-2026" / "b.tif"), str(tmp_path / "extra" / "x.tif")])
    assert scene_key(str(tmp_path / "in" / "tile-2026" / "b.tif"), str(tmp_path / "in")) == "tile-2026/b"


def test_nightly_classifies_new_scenes_records_bad_ones_and_reruns_do_nothing(ray_cluster, tmp_path, nightly_config, learner_checkpoint):
    make_scenes(tmp_path / "in")
    out = tmp_path / "products"
    first = run_nightly(nightly_config, str(tmp_path / "in"), str(out), str(learner_checkpoint))
    assert (first.listed, first.skipped, first.classified, first.failed) == (3, 0, 2, 1)
    assert first.tiles == 4 + 3
    assert "broken.tif" in next(iter(first.failures)) and "not a readable raster" in next(iter(first.failures.values()))
    for key in ("a", "tile-2026/b"):
        assert {p.name for p in (out / key).iterdir()} == {"class_map.tif", "tiles.parquet", "preview.png", "summary.json"}
    manifest = read_scene_manifest(str(out), nightly_config).to_pylist()
    assert sorted((r["key"], r["status"]) for r in manifest) == [("a", "ok"), ("broken", "error"), ("tile-2026/b", "ok")]
    assert json.loads((out / "_runs" / f"{first.run_id}.json").read_text())["classified"] == 2

    again = run_nightly(nightly_config, str(tmp_path / "in"), str(out), str(learner_checkpoint))
    assert (again.listed, again.skipped, again.classified, again.failed) == (3, 3, 0, 0)
    assert len(read_scene_manifest(str(out), nightly_config)) == 3  # nothing new recorded

    write_synthetic_scene(tmp_path / "in" / "c.tif", SCENE_CLASSES, (1, 1), block=64, bands=3, dtype="uint8")
    (out / "a" / "summary.json").unlink()  # a's manifest row still says it is done
    third = run_nightly(nightly_config, str(tmp_path / "in"), str(out), str(learner_checkpoint), retry_failed=True)
    assert (third.classified, third.failed, third.skipped) == (1, 1, 2)  # c is new, broken is retried


def test_nightly_workflow_on_s3(ray_cluster, tmp_path, nightly_config, learner_checkpoint, s3_server, model_dir):
    make_scenes(tmp_path / "in")
    bucket = s3_server.create_bucket("acq")
    client = s3_server.client()
    for path in (tmp_path / "in").rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"2026-11-24/{path.relative_to(tmp_path / 'in').as_posix()}")
    args = [sys.executable, str(REPO / "workflows" / "nightly.py"), "--config", str(REPO / "configs" / "quickstart.yaml"),
            "--input", f"s3://{bucket}/2026-11-24", "--output", f"s3://{bucket}/products", "--model", str(learner_checkpoint),
            f"model.backbone.name={model_dir / 'clip-tiny'}", f"model.captioner.name={model_dir / 'blip2-tiny'}",
            f"storage.cache_dir={model_dir / 'cache'}", "scene.tile_size=64", f"storage.endpoint_url={s3_server.endpoint_url}",
            # the session's Ray workers were started without AWS variables (as a cluster's would be without an
            # IAM role), so the credentials travel in the config; the driver reads the same server through them
            "storage.key=testing", "storage.secret=testing", "storage.region=us-east-1"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "3 scenes = 0 already done + 2 classified + 1 failed" in done.stdout
    assert "failed: s3://" in done.stdout and "broken.tif" in done.stdout
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="products/")["Contents"]}
    assert "products/tile-2026/b/class_map.tif" in keys and "products/a/tiles.parquet" in keys
    assert any(k.startswith("products/_manifest/") for k in keys)

    again = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0 and "3 scenes = 3 already done + 0 classified + 0 failed" in again.stdout


def test_nightly_bad_model_or_input_fails_fast_with_a_reason(tmp_path, learner_checkpoint):
    make_scenes(tmp_path / "in")
    base = [sys.executable, str(REPO / "workflows" / "nightly.py"), "--config", str(REPO / "configs" / "quickstart.yaml"),
            "--output", str(tmp_path / "out")]
    missing = subprocess.run([*base, "--input", str(tmp_path / "nowhere"), "--model", str(learner_checkpoint)],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "nowhere" in missing.stderr and "Traceback" not in missing.stderr
    bad_model = subprocess.run([*base, "--input", str(tmp_path / "in"), "--model", str(tmp_path)],
                               capture_output=True, text=True, timeout=120)
    assert bad_model.returncode == 2 and "not a learner checkpoint" in bad_model.stderr


def corrupt_block(path: Path, row: int, col: int) -> None:
    """Overwrite one compressed block of a tiled GeoTIFF with garbage (a bad sector, a torn upload)."""
    import rasterio

    with rasterio.open(path) as ds:
        offset = int(ds.get_tag_item(f"BLOCK_OFFSET_{col}_{row}", "TIFF", bidx=1))
        size = int(ds.get_tag_item(f"BLOCK_SIZE_{col}_{row}", "TIFF", bidx=1))
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xde\xad" * (size // 2))


def test_a_tile_that_cannot_be_read_is_recorded_and_its_scene_finishes(ray_cluster, tmp_path, nightly_config, learner_checkpoint):
    """One torn block in an 8-bit and in a 16-bit scene (whose stretch's overview read meets it too)."""
    import pyarrow.parquet as pq
    import rasterio
    import rasterio.shutil

    (tmp_path / "in").mkdir()
    for dtype in ("uint8", "uint16"):
        write_synthetic_scene(tmp_path / f"plain-{dtype}.tif", SCENE_CLASSES, (2, 3), block=64, bands=3, dtype=dtype)
        # 64-px blocks, one per tile, so a broken block breaks exactly one tile
        rasterio.shutil.copy(tmp_path / f"plain-{dtype}.tif", tmp_path / "in" / f"torn-{dtype}.tif", driver="GTiff",
                             tiled=True, blockxsize=64, blockysize=64, compress="deflate")
        corrupt_block(tmp_path / "in" / f"torn-{dtype}.tif", 1, 2)
    report = run_nightly(nightly_config, str(tmp_path / "in"), str(tmp_path / "out"), str(learner_checkpoint))
    assert (report.classified, report.failed, report.tiles) == (2, 0, 12)
    for dtype in ("uint8", "uint16"):
        out = tmp_path / "out" / f"torn-{dtype}"
        summary = json.loads((out / "summary.json").read_text())
        assert (summary["classified"], summary["errors"]) == (5, 1)
        failed = [t for t in pq.read_table(out / "tiles.parquet").to_pylist() if t["status"] == "error"]
        assert [(t["row_off"], t["col_off"]) for t in failed] == [(64, 128)] and failed[0]["error"].startswith("read: ")
        with rasterio.open(out / "class_map.tif") as ds:
            classes = ds.read(1)
        assert (classes[64:, 128:] == 255).all() and (classes[:64] != 255).all()  # nothing painted for the torn tile
