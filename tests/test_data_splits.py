"""Dataset roots -> records (both layouts), manifests, and the few-shot / base-new protocols."""

import json
import logging
import random
from pathlib import Path

import pyarrow as pa
import pytest

from bimors.config import DataConfig
from bimors.data.catalog import V2_CLASSNAMES, DatasetError
from bimors.data.manifest import (
    MANIFEST_SCHEMA,
    build_manifest,
    classnames_of,
    read_manifest,
    records_to_table,
    tile_id,
    write_manifest,
)
from bimors.data.protocols import (
    base_new_labels,
    classes_short_of,
    sample_few_shot,
    select_split,
    subsample_classes,
    subsample_classnames,
)
from bimors.data.splits import (
    TileRecord,
    assign_splits,
    list_class_folders,
    parse_split_json,
    read_dataset,
    split_sizes,
)


def touch(path: Path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def make_tree(root: Path, classes: dict[str, int], ext: str = "jpg") -> Path:
    for name, n in classes.items():
        for i in range(n):
            touch(root / name / f"{name}_{i:03d}.{ext}")
    return root


# --------------------------------------------------------------------------------------------
# class folders


def test_class_folders_nested_hidden_and_non_images(tmp_path):
    root = tmp_path / "MyScenes"
    touch(root / "river" / "a.jpg")
    touch(root / "river" / "2019" / "summer" / "b.TIF")  # nesting, upper-case extension
    touch(root / "river" / "notes.txt")  # not an image
    touch(root / "river" / ".c.jpg")  # hidden file
    touch(root / "river" / ".thumbs" / "d.jpg")  # hidden folder
    touch(root / "forest" / "e.webp")
    touch(root / "forest" / "f.jpeg")
    touch(root / ".cache" / "g.jpg")  # hidden class folder
    touch(root / "__MACOSX" / "river" / "._a.jpg")
    touch(root / "README.md")

    files = list_class_folders(str(root))
    assert files == {"forest": ["e.webp", "f.jpeg"], "river": ["2019/summer/b.TIF", "a.jpg"]}

    listing = read_dataset(DataConfig(root=str(root), train_fraction=0.5, val_fraction=0.0))
    assert listing.name == "MyScenes"
    assert listing.layout == "class_folders"
    assert listing.classnames == ("forest", "river")  # sorted -> labels
    assert {(r.classname, r.label) for r in listing.records} == {("forest", 0), ("river", 1)}
    uris = {r.uri for r in listing.records}
    assert str(root / "river" / "2019" / "summer" / "b.TIF") in uris
    assert all(Path(u).is_file() for u in uris)


def test_relative_and_file_uri_roots(tmp_path, monkeypatch):
    make_tree(tmp_path / "data", {"a": 2, "b": 2})
    monkeypatch.chdir(tmp_path)
    relative = read_dataset(DataConfig(root="data"))
    assert relative.root == str(tmp_path / "data")  # absolute, usable from any working directory
    via_file = read_dataset(DataConfig(root=f"file://{tmp_path}/data"))
    assert all(r.uri.startswith("file://") for r in via_file.records)
    assert [tile_id(r.uri) for r in via_file.records] == [tile_id(r.uri) for r in relative.records]


@pytest.mark.parametrize(
    "setup, words",
    [
        (lambda root: None, ["does not exist"]),
        (lambda root: root.mkdir(), ["empty"]),
        (lambda root: (make_tree(root, {"a": 2}), (root / "b").mkdir()), ["hold no images", "b"]),
        (lambda root: (make_tree(root, {"a": 2}), touch(root / "b" / "x.txt")), ["hold no images", "1 non-image"]),
        (lambda root: (touch(root / "x.jpg"), touch(root / "y.jpg")), ["no class folders", "2 images"]),
        (lambda root: touch(root), ["is a file"]),
    ],
    ids=["missing", "empty", "empty-class", "class-without-images", "images-at-root", "file"],
)
def test_class_folder_errors_name_the_root(tmp_path, setup, words):
    root = tmp_path / "ds"
    setup(root)
    with pytest.raises(DatasetError) as info:
        read_dataset(DataConfig(root=str(root)))
    for word in [str(root), *words]:
        assert word in str(info.value)


def test_catalog_dataset_in_class_folders_uses_catalog_label_order(tmp_path):
    root = make_tree(tmp_path / "PatternNetv2" / "images", {c: 3 for c in V2_CLASSNAMES}).parent
    listing = read_dataset(DataConfig(root=str(root), dataset="patternnetv2"))
    assert listing.layout == "class_folders"
    assert listing.image_root == str(root / "images")
    assert listing.classnames == V2_CLASSNAMES
    assert {r.classname: r.label for r in listing.records}["baseballfield"] == 0  # not alphabetical
    # a partial download is an error, not a silently smaller label space
    (root / "images" / "beach" / "beach_000.jpg").unlink()
    for p in (root / "images" / "beach").iterdir():
        p.unlink()
    (root / "images" / "beach").rmdir()
    with pytest.raises(DatasetError, match="missing beach"):
        read_dataset(DataConfig(root=str(root), dataset="patternnetv2"))


def test_split_sizes():
    assert split_sizes(10, 0.5, 0.2) == (5, 2, 3)
    assert split_sizes(1, 0.5, 0.2) == (1, 0, 0)
    assert split_sizes(2, 0.5, 0.2) == (1, 0, 1)
    assert split_sizes(3, 0.5, 0.2) == (1, 1, 1)  # small classes still reach every split
    assert split_sizes(100, 0.5, 0.0) == (50, 0, 50)
    for n in range(1, 40):
        assert sum(split_sizes(n, 0.6, 0.3)) == n


def test_seeded_split_is_deterministic_and_listing_order_free():
    files = {"a": [f"{i}.png" for i in range(20)], "b": [f"{i}.png" for i in range(7)]}
    first = assign_splits(files, ["a", "b"], "/r", 0.5, 0.2, seed=1)
    shuffled = {k: random.Random(9).sample(v, len(v)) for k, v in reversed(list(files.items()))}
    assert assign_splits(shuffled, ["a", "b"], "/r", 0.5, 0.2, seed=1) == first
    other = assign_splits(files, ["a", "b"], "/r", 0.5, 0.2, seed=2)
    assert [r.split for r in other] != [r.split for r in first]
    counts = {(c, s): 0 for c in "ab" for s in ("train", "val", "test")}
    for r in first:
        counts[(r.classname, r.split)] += 1
    assert (counts[("a", "train")], counts[("a", "val")], counts[("a", "test")]) == (10, 4, 6)
    # adding a class does not move the tiles of another
    more = assign_splits({**files, "c": ["x.png", "y.png"]}, ["a", "b", "c"], "/r", 0.5, 0.2, seed=1)
    assert [r for r in more if r.classname != "c"] == first
    # the exact assignment is pinned, so a change of shuffling shows up here
    assert [r.relpath for r in first if r.split == "val"] == ["a/17.png", "a/2.png", "a/5.png", "a/8.png", "b/4.png"]


# --------------------------------------------------------------------------------------------
# split JSON


def write_split_json(root: Path, name: str, split: dict) -> None:
    touch(root / name, json.dumps(split).encode())


def test_published_split_json_beside_images(tmp_path):
    root = tmp_path / "rsicdv2"
    (root / "images").mkdir(parents=True)
    split = {
        "train": [["beach/beach_1.jpg", 15, "beach"], ["baseballfield/b_1.jpg", 0, "baseballfield"]],
        "val": [["beach/beach_2.jpg", 15, "beach"]],
        "test": [[f"{c}/{c}_9.jpg", i, c] for i, c in enumerate(V2_CLASSNAMES)],
    }
    write_split_json(root, "rsicdv2.json", split)
    listing = read_dataset(DataConfig(root=str(root), dataset="rsicdv2"))
    assert listing.layout == "split_json"
    assert listing.classnames == V2_CLASSNAMES
    assert listing.counts() == {"train": 2, "val": 1, "test": 16}
    first = listing.records[0]
    assert (first.relpath, first.label, first.classname, first.split) == ("beach/beach_1.jpg", 15, "beach", "train")
    assert first.uri == str(root / "images" / "beach" / "beach_1.jpg")


def test_split_json_for_an_uncatalogued_dataset(tmp_path):
    root = make_tree(tmp_path / "mine", {"x": 1, "y": 1})
    write_split_json(root, "split.json", {"train": [["x/x_000.jpg", 1, "x"]], "test": [["y/y_000.jpg", 0, "y"]]})
    listing = read_dataset(DataConfig(root=str(root), split_file="split.json"))
    assert listing.classnames == ("y", "x")  # the file's labels win
    assert listing.records[0].uri == str(root / "x" / "x_000.jpg")
    with pytest.raises(DatasetError, match="does not exist"):
        read_dataset(DataConfig(root=str(root), split_file="other.json"))


@pytest.mark.parametrize(
    "content, words",
    [
        (b"{not json", ["not valid JSON"]),
        (b"[1, 2]", ["expected an object"]),
        (json.dumps({"train": [], "test": [], "tset": []}).encode(), ["unknown split", "tset"]),
        (json.dumps({"train": [["a/1.jpg", 0, "a"]]}).encode(), ["missing split", "test"]),
        (json.dumps({"train": {"a": 1}, "test": []}).encode(), ["'train' must be a list"]),
        (json.dumps({"train": [["a/1.jpg", 0]], "test": []}).encode(), ["train[0]", "[relpath, label, classname]"]),
        (json.dumps({"train": [["a/1.jpg", "0", "a"]], "test": []}).encode(), ["train[0]", "non-negative integer"]),
        (json.dumps({"train": [["a/1.jpg", 0, ""]], "test": []}).encode(), ["class name"]),
        (json.dumps({"train": [["../x.jpg", 0, "a"]], "test": []}).encode(), ["leaves the image folder"]),
        (json.dumps({"train": [["a/1.jpg", 0, "a"]], "test": [["b/1.jpg", 0, "b"]]}).encode(),
         ["label 0 is 'a' at train[0] but 'b' at test[0]"]),
        (json.dumps({"train": [["a/1.jpg", 0, "a"], ["b/1.jpg", 1, "b"]], "test": [["a/2.jpg", 1, "a"]]}).encode(),
         ["label 1 is 'b'"]),
        (json.dumps({"train": [["a/1.jpg", 0, "a"], ["b/1.jpg", 1, "a"]], "test": []}).encode(),
         ["class 'a' has label 0 at train[0] but 1 at train[1]"]),
        (json.dumps({"train": [["a/1.jpg", 0, "a"]], "test": [["a/1.jpg", 0, "a"]]}).encode(), ["appears twice"]),
        (json.dumps({"train": [["a/1.jpg", 0, "a"], ["c/1.jpg", 2, "c"]], "test": []}).encode(),
         ["no image has label 1"]),
        (json.dumps({"train": [], "test": []}).encode(), ["lists no images"]),
    ],
)
def test_malformed_split_json_is_explained(content, words):
    with pytest.raises(DatasetError) as info:
        parse_split_json(content, "/img", source="s3://b/ds/split.json")
    assert "s3://b/ds/split.json" in str(info.value)
    for word in words:
        assert word in str(info.value)


# --------------------------------------------------------------------------------------------
# manifest


def test_tile_id_is_pinned():
    # a change here invalidates every feature cache: change the hashing only on purpose
    assert tile_id("s3://rs-tiles/patternnet/images/forest/forest001.jpg") == "6f33eeb4912b31bc"
    assert tile_id("s3://rs-scenes/2024/scene.tif", (256, 512, 224, 224)) == "f3d51270e0a546fc"
    assert tile_id("file:///data/a.png") == tile_id("/data/a.png")
    assert tile_id("s3://x/a.tif", (0, 0, 224, 224)) != tile_id("s3://x/a.tif", (224, 0, 224, 224))
    assert len({tile_id(f"s3://b/{i}.jpg") for i in range(1000)}) == 1000


def test_manifest_parquet_round_trip(tmp_path):
    make_tree(tmp_path / "toy", {"b": 4, "a": 5})
    table = build_manifest(DataConfig(root=str(tmp_path / "toy")))
    assert table.schema.names == MANIFEST_SCHEMA.names
    assert table.num_rows == 9
    assert set(table.column("dataset").to_pylist()) == {"toy"}
    assert table.column("tile_id").to_pylist() == [tile_id(u) for u in table.column("uri").to_pylist()]
    assert classnames_of(table) == ["a", "b"]
    uri = str(tmp_path / "out" / "manifest.parquet")
    write_manifest(table, uri)
    back = read_manifest(uri)
    assert back.equals(table)
    assert classnames_of(back) == ["a", "b"]
    touch(tmp_path / "junk.parquet", b"not parquet")
    with pytest.raises(ValueError, match="not a readable Parquet"):
        read_manifest(str(tmp_path / "junk.parquet"))


# --------------------------------------------------------------------------------------------
# protocols


def records(classes: dict[str, int], split: str = "train") -> list[TileRecord]:
    return [
        TileRecord(f"/d/{c}/{i}.jpg", f"{c}/{i}.jpg", label, c, split)
        for label, (c, n) in enumerate(classes.items())
        for i in range(n)
    ]


def test_few_shot_is_seeded_and_per_class(caplog):
    rows = records({"a": 30, "b": 30, "c": 5})
    with caplog.at_level(logging.WARNING):
        shots = sample_few_shot(rows, 16, seed=1)
    assert sum(r.classname == "a" for r in shots) == 16
    assert sum(r.classname == "c" for r in shots) == 5  # short class keeps everything
    assert "1 of 3 classes have fewer than 16" in caplog.text
    assert classes_short_of(rows, 16) == {"c": 5}
    assert sample_few_shot(rows, 16, seed=1) == shots
    assert sample_few_shot(list(reversed(rows)), 16, seed=1) == [r for r in reversed(rows) if r in shots]
    assert {r.uri for r in sample_few_shot(rows, 16, seed=2)} != {r.uri for r in shots}
    without_b = sample_few_shot([r for r in rows if r.classname != "b"], 16, seed=1)
    assert [r for r in shots if r.classname == "a"] == [r for r in without_b if r.classname == "a"]
    assert sample_few_shot(rows, 0, seed=1) is rows
    # the exact draw is pinned, so it is the same on every machine
    four = sample_few_shot(rows, 4, seed=1)
    assert sorted(int(r.relpath.split("/")[1][:-4]) for r in four if r.classname == "a") == [9, 10, 19, 25]


def test_few_shot_on_a_manifest_table():
    rows = records({"a": 10, "b": 10}) + records({"a": 3}, split="test")
    table = records_to_table(rows, "toy", ["a", "b"])
    train = select_split(table, "train")
    assert train.num_rows == 20 and select_split(rows, "test") == rows[20:]
    picked = sample_few_shot(train, 3, seed=5)
    assert isinstance(picked, pa.Table)
    assert picked.column("uri").to_pylist() == [r.uri for r in sample_few_shot(rows[:20], 3, seed=5)]
    assert classnames_of(picked) == ["a", "b"]  # the class list survives row selection


@pytest.mark.parametrize("n, n_base", [(1, 1), (2, 1), (5, 3), (16, 8), (30, 15), (38, 19), (45, 23), (46, 23)])
def test_base_new_split_is_ceil_half(n, n_base):
    base, new = base_new_labels(n)
    assert base == list(range(n_base))
    assert new == list(range(n_base, n))


def test_subsample_relabels_within_the_subset():
    names = ["e", "d", "c", "b", "a"]  # label order, not alphabetical: the protocol follows labels
    rows = records({c: 2 for c in names})
    base, base_names = subsample_classes(rows, "base", names)
    new, new_names = subsample_classes(rows, "new", names)
    assert base_names == ["e", "d", "c"] and new_names == ["b", "a"]
    assert sorted({(r.label, r.classname) for r in new}) == [(0, "b"), (1, "a")]
    assert sorted({(r.label, r.classname) for r in base}) == [(0, "e"), (1, "d"), (2, "c")]
    assert subsample_classnames(names, "new") == ["b", "a"]
    table, table_names = subsample_classes(records_to_table(rows, "toy", names), "new", names)
    assert table.column("label").to_pylist() == [0, 0, 1, 1]
    assert classnames_of(table) == ["b", "a"] == table_names
    all_rows, all_names = subsample_classes(rows, "all", names)
    assert all_rows is rows and all_names == names
    with pytest.raises(ValueError, match="does not match"):
        subsample_classes(rows, "base", ["x"] * 5)
