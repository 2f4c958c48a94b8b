"""The procedural dataset: deterministic, laid out as class folders, idempotent, learnable."""

import json
import time

import numpy as np
import pytest
from PIL import Image

from bimors.config import DataConfig, SyntheticConfig
from bimors.data.catalog import DatasetError
from bimors.data.decode import decode_image
from bimors.data.splits import read_dataset
from bimors.data.synthetic import (
    MARKER_NAME,
    generate_synthetic,
    has_texture,
    render_tile,
)

SMALL = SyntheticConfig(classes=["forest", "river", "beach"], images_per_class=4, image_size=32, seed=3)


def test_tiles_are_a_pure_function_of_their_arguments():
    tile = render_tile("harbor", 5, 48, seed=7)
    assert tile.dtype == np.uint8 and tile.shape == (48, 48, 3)
    assert np.array_equal(tile, render_tile("harbor", 5, 48, seed=7))
    assert not np.array_equal(tile, render_tile("harbor", 6, 48, seed=7))
    assert not np.array_equal(tile, render_tile("harbor", 5, 48, seed=8))
    # pinned (to a tolerance that survives last-bit differences of SIMD maths between CPUs) so that
    # a change of generator, which changes every cached feature and result, is noticed
    expected = {
        "forest": [33.126, 85.267, 35.085],
        "harbor": [79.442, 117.732, 127.611],
        "oil_well": [120.915, 192.217, 186.558],
    }
    for name, means in expected.items():
        assert render_tile(name, 0, 32, seed=0).reshape(-1, 3).mean(axis=0) == pytest.approx(means, abs=0.05)
    assert tile.std() > 5  # texture, not a flat fill


def test_every_default_class_has_a_scene_texture_and_unknown_names_a_pattern():
    assert all(has_texture(c) for c in SyntheticConfig().classes)
    assert has_texture("storagetanks") and has_texture("Dense_Residential_Area")
    assert not has_texture("oil_well")
    a, b = render_tile("oil_well", 0, 32), render_tile("oil_well", 1, 32)
    other = render_tile("solar_panel", 0, 32)
    # an unknown class is consistent with itself and unlike another unknown class
    assert np.abs(a.mean((0, 1)) - b.mean((0, 1))).max() < np.abs(a.mean((0, 1)) - other.mean((0, 1))).max()


def test_layout_and_readback(tmp_path):
    root = tmp_path / "synthetic"
    result = generate_synthetic(str(root), SMALL)
    assert (result.files, result.written) == (12, 12)
    assert sorted(p.name for p in root.iterdir()) == [MARKER_NAME, "beach", "forest", "river"]
    assert sorted(p.name for p in (root / "river").iterdir()) == [f"river_{i:04d}.png" for i in range(4)]
    image = decode_image((root / "river" / "river_0002.png").read_bytes())
    assert np.array_equal(image, render_tile("river", 2, 32, seed=3))  # PNG is lossless
    listing = read_dataset(DataConfig(root=str(root)))  # the marker is hidden, so it is not a class
    assert listing.classnames == ("beach", "forest", "river")
    assert len(listing.records) == 12
    marker = json.loads((root / MARKER_NAME).read_text())
    assert marker["fingerprint"] == result.fingerprint and marker["config"]["seed"] == 3


def test_generation_is_deterministic_across_roots(tmp_path):
    generate_synthetic(str(tmp_path / "a"), SMALL)
    generate_synthetic(f"file://{tmp_path}/b", SMALL)
    for path in sorted((tmp_path / "a").rglob("*.png")):
        twin = tmp_path / "b" / path.relative_to(tmp_path / "a")
        assert path.read_bytes() == twin.read_bytes()


def test_idempotent_and_replaces_only_its_own_files(tmp_path):
    root = tmp_path / "synthetic"
    generate_synthetic(str(root), SMALL)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.png")}
    again = generate_synthetic(str(root), SMALL)
    assert again.written == 0
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.png")} == before

    smaller = SMALL.model_copy(update={"classes": ["forest", "desert"], "images_per_class": 2})
    result = generate_synthetic(str(root), smaller)
    assert result.written == 4 and result.fingerprint != again.fingerprint
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*.png")) == [
        "desert/desert_0000.png", "desert/desert_0001.png", "forest/forest_0000.png", "forest/forest_0001.png",
    ]
    assert not (root / "river").exists()


def test_refuses_to_write_into_foreign_data(tmp_path):
    root = tmp_path / "real"
    (root / "airport").mkdir(parents=True)
    (root / "airport" / "a.jpg").write_bytes(b"precious")
    with pytest.raises(DatasetError, match="did not write"):
        generate_synthetic(str(root), SMALL)
    assert (root / "airport" / "a.jpg").read_bytes() == b"precious"


def test_jpeg_output(tmp_path):
    generate_synthetic(str(tmp_path / "j"), SMALL, image_format="jpeg")
    path = tmp_path / "j" / "beach" / "beach_0000.jpg"
    assert Image.open(path).format == "JPEG"
    assert np.abs(decode_image(path.read_bytes()).astype(int) - render_tile("beach", 0, 32, seed=3)).mean() < 8


def test_default_size_generates_quickly(tmp_path):
    start = time.perf_counter()
    result = generate_synthetic(str(tmp_path / "quick"), SyntheticConfig())  # 10 classes x 24 x 64 px
    elapsed = time.perf_counter() - start
    assert result.files == 240
    assert elapsed < 5, f"took {elapsed:.1f}s"


def test_classes_are_linearly_separable_on_raw_pixels():
    classes = SyntheticConfig().classes
    features, labels = [], []
    for label, name in enumerate(classes):
        for index in range(24):
            tile = render_tile(name, index, 32, seed=0).astype(np.float32) / 255
            features.append(tile.reshape(8, 4, 8, 4, 3).mean(axis=(1, 3)).ravel())  # 8x8 pooled pixels
            labels.append(label)
    x = np.c_[np.asarray(features), np.ones(len(features))]
    y = np.asarray(labels)
    train = np.tile(np.arange(24) < 12, len(classes))
    targets = np.eye(len(classes))[y]
    weights = np.linalg.solve(x[train].T @ x[train] + 0.1 * np.eye(x.shape[1]), x[train].T @ targets[train])
    accuracy = ((x[~train] @ weights).argmax(axis=1) == y[~train]).mean()
    assert accuracy > 0.5, f"ridge probe accuracy {accuracy:.2f} (chance 0.10)"
