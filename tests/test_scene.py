"""Whole-scene inference: tile grid, windowed reads, scene-wide stretch, nodata, and the outputs
(COG class map in the scene's CRS, per-tile Parquet, PNG preview), locally and on S3."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from PIL import Image
from rasterio.transform import from_origin
from rasterio.windows import Window

from bimors.config import ConfigError, SceneConfig, load_config
from bimors.data.synthetic_scene import write_synthetic_scene
from bimors.pipelines.scene import NODATA, SceneError, SceneReader, axis_starts, classify_scene, tile_grid
from bimors.storage import StorageError
from model_fixtures import SCENE_CLASSES

LEVELS = 4  # classes of the level scene: class i is the constant value 1000 * (i + 1) in every band


def level_scene(path, grid=(4, 6), block=32, nodata_blocks=((0, 0),), crs="EPSG:32632") -> np.ndarray:
    """A 16-bit, 4-band scene of constant blocks; returns the class of each block (-1: nodata = 0)."""
    rows, cols = grid
    truth = np.array([[(r + c) % LEVELS for c in range(cols)] for r in range(rows)])
    data = np.zeros((4, rows * block, cols * block), np.uint16)
    for r in range(rows):
        for c in range(cols):
            if (r, c) in nodata_blocks:
                truth[r, c] = -1
                continue
            data[:, r * block : (r + 1) * block, c * block : (c + 1) * block] = 1000 * (truth[r, c] + 1)
    with rasterio.open(
        path, "w", driver="GTiff", width=cols * block, height=rows * block, count=4, dtype="uint16", nodata=0,
        crs=crs, transform=from_origin(300_000, 4_000_000, 20, 20),
    ) as out:
        out.write(data)
    return truth


def by_level(images):
    """An oracle classifier for the level scene: after the scene-wide percentile stretch the four
    levels land on 0, 85, 170 and 255."""
    probs = np.full((len(images), LEVELS), 0.1 / (LEVELS - 1), np.float32)
    for i, image in enumerate(images):
        probs[i, min(LEVELS - 1, int(round(float(np.median(image)) / 85)))] = 0.9
    return probs, [f"tile {i}" for i in range(len(images))]


def test_grid_covers_every_pixel_exactly_once_including_edges():
    assert axis_starts(100, 32, 32) == [0, 32, 64, 68]
    assert axis_starts(20, 32, 16) == [0]
    for height, width, tile, stride in [(100, 130, 32, 32), (97, 64, 32, 20), (20, 50, 32, 32), (256, 256, 64, 48)]:
        cfg = SceneConfig(tile_size=tile, stride=stride)
        owner = np.zeros((height, width), int)
        for t in tile_grid(height, width, cfg):
            r0, r1, c0, c1 = t.owned
            owner[r0:r1, c0:c1] += 1
            w = t.window
            assert w.row_off + w.height <= height and w.col_off + w.width <= width  # windows stay inside
            assert w.row_off <= r0 and r1 <= w.row_off + w.height and w.col_off <= c0 and c1 <= w.col_off + w.width
        assert (owner == 1).all()


def test_stride_larger_than_tile_is_refused():
    with pytest.raises(ConfigError, match="stride"):
        load_config(None, ["scene.tile_size=64", "scene.stride=100"])


def test_class_map_lands_on_the_right_pixels_in_the_scene_crs(tmp_path):
    truth = level_scene(tmp_path / "scene.tif")
    cfg = SceneConfig(tile_size=32, classify={"batch_size": 5})
    names = [f"level{i}" for i in range(LEVELS)]
    result = classify_scene(str(tmp_path / "scene.tif"), str(tmp_path / "out"), by_level, names, cfg)

    assert (result.tiles, result.classified, result.nodata, result.errors) == (24, 23, 1, 0)
    with rasterio.open(tmp_path / "scene.tif") as src, rasterio.open(tmp_path / "out" / "class_map.tif") as out:
        assert out.crs == src.crs and out.transform == src.transform and (out.width, out.height) == (src.width, src.height)
        assert out.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert out.profile["compress"].lower() == "deflate" and out.profile["tiled"]
        assert json.loads(out.tags()["class_names"]) == names
        assert out.descriptions == ("class", "confidence_percent")
        assert out.colormap(1)[0][:3] != out.colormap(1)[1][:3]
        classes, confidence = out.read(1), out.read(2)
    expected = np.kron(truth, np.ones((32, 32), int))
    expected[expected < 0] = NODATA
    assert (classes == expected).all()
    assert set(np.unique(confidence)) == {90, NODATA}

    table = pq.read_table(tmp_path / "out" / "tiles.parquet")
    assert table.schema.metadata[b"crs"] == b"EPSG:32632" and json.loads(table.schema.metadata[b"class_names"]) == names
    tiles = table.to_pylist()
    assert len(tiles) == 24
    nodata = [t for t in tiles if t["status"] == "nodata"]
    assert len(nodata) == 1 and nodata[0]["row_off"] == 0 and nodata[0]["class_name"] is None
    first = next(t for t in tiles if (t["row_off"], t["col_off"]) == (32, 64))
    assert first["class_name"] == names[truth[1, 2]] and first["probability"] == pytest.approx(0.9)
    assert first["caption"].startswith("tile")
    # bounds in the scene CRS: x from the origin plus 64 px * 20 m, y down from the top
    assert (first["minx"], first["maxx"]) == (300_000 + 64 * 20, 300_000 + 96 * 20)
    assert (first["miny"], first["maxy"]) == (4_000_000 - 64 * 20, 4_000_000 - 32 * 20)

    preview = Image.open(tmp_path / "out" / "preview.png")
    assert preview.format == "PNG" and preview.width > 100
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["classified"] == 23 and sum(summary["classes"].values()) == 23


def test_overlapping_tiles_each_own_their_nearest_pixels(tmp_path):
    level_scene(tmp_path / "scene.tif", grid=(3, 5), nodata_blocks=())
    cfg = SceneConfig(tile_size=32, stride=20, classify={"batch_size": 7})
    classify_scene(str(tmp_path / "scene.tif"), str(tmp_path / "out"), by_level, list("abcd"), cfg)
    with rasterio.open(tmp_path / "out" / "class_map.tif") as out:
        classes = out.read(1)
    rows = {(t["row_off"], t["col_off"]): t for t in pq.read_table(tmp_path / "out" / "tiles.parquet").to_pylist()}
    grid = tile_grid(96, 160, cfg)
    assert len(rows) == len(grid) == 5 * 8  # rows 0,20,40,60 + 64 flush with the edge
    for t in grid:
        r0, r1, c0, c1 = t.owned
        assert (classes[r0:r1, c0:c1] == rows[(int(t.window.row_off), int(t.window.col_off))]["class_index"]).all()


def test_stretch_comes_from_the_whole_scene_so_tiles_match(tmp_path):
    level_scene(tmp_path / "scene.tif", nodata_blocks=())
    with SceneReader(str(tmp_path / "scene.tif"), SceneConfig()) as reader:
        dark = reader.rgb(*reader.read(Window(0, 0, 32, 32)))  # level 0 block
        bright = reader.rgb(*reader.read(Window(96, 0, 32, 32)))  # level 3 block
    # a per-tile stretch would turn both constant tiles into the same image
    assert dark.max() == 0 and bright.min() == 255


def test_multiband_16bit_scene_with_band_selection_and_a_real_model(tmp_path, tiny_config, learner_checkpoint):
    from bimors.pinned_model import load_pinned, pin_model

    write_synthetic_scene(tmp_path / "s2.tif", SCENE_CLASSES, (2, 3), block=64, bands=4, nodata_blocks=[(1, 2)])
    cfg = tiny_config.scene.model_copy(update={"tile_size": 64, "classify": tiny_config.scene.classify.model_copy(update={"batch_size": 4}),
                                               "decode": tiny_config.scene.decode.model_copy(update={"bands": [4, 2, 1]})})
    predictor = load_pinned(tiny_config, pin_model(str(learner_checkpoint), tiny_config))
    result = classify_scene(str(tmp_path / "s2.tif"), str(tmp_path / "out"), predictor.predict_images,
                            predictor.classnames, cfg)
    assert (result.classified, result.nodata, result.errors) == (5, 1, 0)
    tiles = [t for t in pq.read_table(tmp_path / "out" / "tiles.parquet").to_pylist() if t["status"] == "ok"]
    assert all(t["caption"] for t in tiles)
    # the same tiles classified directly give the same classes: one inference path
    with SceneReader(str(tmp_path / "s2.tif"), cfg) as reader:
        images = [reader.rgb(*reader.read(Window(t["col_off"], t["row_off"], 64, 64))) for t in tiles]
    probs, _ = predictor.predict_images(images)
    assert [t["class_index"] for t in tiles] == probs.argmax(1).tolist()
    assert [t["probability"] for t in tiles] == pytest.approx(probs.max(1).tolist(), rel=1e-5)


def test_plain_png_scene_without_georeferencing(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (90, 130, 3), np.uint8)).save(tmp_path / "photo.png")
    result = classify_scene(str(tmp_path / "photo.png"), str(tmp_path / "out"), by_level, list("abcd"), SceneConfig(tile_size=64))
    assert result.tiles == 6 and result.classified == 6  # 2 rows (0, 26) x 3 columns (0, 64, 66)
    with rasterio.open(tmp_path / "out" / "class_map.tif") as out:
        assert out.crs is None and (out.width, out.height) == (130, 90)


def test_a_failing_batch_is_recorded_and_the_scene_finishes(tmp_path):
    level_scene(tmp_path / "scene.tif", nodata_blocks=())
    calls = []

    def flaky(images):
        calls.append(len(images))
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return by_level(images)

    result = classify_scene(str(tmp_path / "scene.tif"), str(tmp_path / "out"), flaky, list("abcd"), SceneConfig(tile_size=32, classify={"batch_size": 8}))
    assert (result.tiles, result.classified, result.errors) == (24, 16, 8)
    failed = [t for t in pq.read_table(tmp_path / "out" / "tiles.parquet").to_pylist() if t["status"] == "error"]
    assert len(failed) == 8 and all("out of memory" in t["error"] for t in failed)
    with rasterio.open(tmp_path / "out" / "class_map.tif") as out:
        classes = out.read(1)
    for t in failed:  # nothing is painted where classification failed
        assert (classes[t["row_off"] : t["row_off"] + 32, t["col_off"] : t["col_off"] + 32] == NODATA).all()
    assert (classes != NODATA).sum() == 16 * 32 * 32


@pytest.mark.parametrize("content, error, match", [
    (b"", SceneError, "not a readable raster"),
    (b"this is not an image at all", SceneError, "not a readable raster"),
])
def test_bad_scenes_fail_with_a_reason(tmp_path, content, error, match):
    (tmp_path / "bad.tif").write_bytes(content)
    with pytest.raises(error, match=match):
        classify_scene(str(tmp_path / "bad.tif"), str(tmp_path / "out"), by_level, list("abcd"), SceneConfig())
    assert not (tmp_path / "out").exists()


def test_missing_oversized_and_wrong_band_scenes(tmp_path):
    with pytest.raises(StorageError, match="missing.tif"):
        classify_scene(str(tmp_path / "missing.tif"), str(tmp_path / "out"), by_level, list("abcd"), SceneConfig())
    level_scene(tmp_path / "scene.tif")
    with pytest.raises(SceneError, match="over the limit of 1,000"):
        classify_scene(str(tmp_path / "scene.tif"), str(tmp_path / "out"), by_level, list("abcd"), SceneConfig(max_pixels=1000))
    with pytest.raises(SceneError, match="band 7"):
        SceneReader(str(tmp_path / "scene.tif"), SceneConfig.model_validate({"decode": {"bands": [7, 2, 1]}}))


def test_scene_on_s3_is_read_in_windows_and_outputs_go_to_s3(tmp_path, s3_server, s3_storage):
    import s3fs

    truth = level_scene(tmp_path / "scene.tif")
    bucket = s3_server.create_bucket("scenes")
    s3_server.client().upload_file(str(tmp_path / "scene.tif"), bucket, "in/scene.tif")
    result = classify_scene(f"s3://{bucket}/in/scene.tif", f"s3://{bucket}/out/scene", by_level, list("abcd"),
                            SceneConfig(tile_size=32), s3_storage)
    assert result.classified == int((truth >= 0).sum())
    fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": s3_server.endpoint_url})
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/out/scene")) == [
        "class_map.tif", "preview.png", "summary.json", "tiles.parquet"]
    with fs.open(f"{bucket}/out/scene/class_map.tif") as f, rasterio.open(f) as out:
        assert out.crs.to_epsg() == 32632


def test_nodata_from_the_config_when_the_file_declares_none(tmp_path):
    level_scene(tmp_path / "scene.tif")
    with rasterio.open(tmp_path / "scene.tif", "r+") as ds:
        ds.nodata = None  # the zero block is now ordinary data ...
    plain = classify_scene(str(tmp_path / "scene.tif"), str(tmp_path / "a"), by_level, list("abcd"), SceneConfig(tile_size=32))
    assert plain.nodata == 0
    declared = classify_scene(str(tmp_path / "scene.tif"), str(tmp_path / "b"), by_level, list("abcd"),
                              SceneConfig(tile_size=32, nodata=0))  # ... unless the config says what nodata is
    assert declared.nodata == 1 and declared.classified == 23
