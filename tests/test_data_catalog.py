"""Dataset catalog: class lists, label order, names and transfer pairings.

tests/data/applenet_classnames.json holds the class lists published with the APPLeNet split files
(github.com/mainaksingha01/APPLeNet, json/<name>.json, commit 6819a9b), one list per dataset ordered
by label index. Each split file maps "train"/"val"/"test" to [relpath, label, classname] triples; the
stored list is label -> classname taken over all three splits (every label names exactly one class,
labels run 0..n-1). json/mlrsnet.json is listed in that repository but its contents could not be
retrieved when the lists were taken, so mlrsnet is not part of the published-list check.
"""

import json
from pathlib import Path

import pytest

from bimors.data.catalog import (
    CATALOG,
    CROSS_DATASET,
    DOMAIN_GENERALIZATION,
    V2_CLASSNAMES,
    DatasetError,
    canonical_name,
    get_dataset,
    known_datasets,
)
from bimors.data.protocols import transfer_pairing


@pytest.mark.parametrize(
    "name, n",
    [
        ("patternnet", 38), ("rsicd", 30), ("resisc45", 45), ("mlrsnet", 46),
        ("patternnetv2", 16), ("rsicdv2", 16), ("resisc45v2", 16), ("mlrsnetv2", 16),
        ("eurosat", 10), ("ucmerced", 21), ("aid", 30), ("whurs19", 19),
    ],
)
def test_class_counts(name, n):
    spec = get_dataset(name)
    assert spec.num_classes == n
    assert len(set(spec.classnames)) == n


def test_v2_datasets_share_the_16_classes():
    expected = {
        "baseballfield", "sparse_residential", "harbor", "intersection", "forest", "bridge", "overpass",
        "railway", "parking", "meadow", "river", "desert", "stadium", "storage_tank", "dense_residential", "beach",
    }
    for name in ("patternnetv2", "rsicdv2", "resisc45v2", "mlrsnetv2"):
        assert set(get_dataset(name).classnames) == expected
        assert get_dataset(name).classnames == V2_CLASSNAMES


def test_applenet_layout_and_folder_datasets():
    spec = get_dataset("patternnet")
    assert (spec.split_file, spec.image_subdir) == ("patternnet.json", "images")
    assert spec.classnames[:3] == ("oil_well", "runway", "baseball_field")  # published label order
    assert get_dataset("eurosat").split_file is None
    # folder-only datasets are in sorted (code point) order, as a folder scan produces
    for name in ("eurosat", "ucmerced", "aid", "whurs19", "mlrsnet"):
        assert list(get_dataset(name).classnames) == sorted(get_dataset(name).classnames)
    assert "footballField" in get_dataset("whurs19").classnames
    assert "SeaLake" in get_dataset("eurosat").classnames


def test_names_are_forgiving_about_spelling():
    assert get_dataset("UC_Merced").name == "ucmerced"
    assert get_dataset("WHU-RS19").name == "whurs19"
    assert get_dataset("PatternNet v2").name == "patternnetv2"
    assert canonical_name("RESISC-45") == "resisc45"


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(DatasetError) as info:
        get_dataset("patternet")
    message = str(info.value)
    assert "patternet" in message
    for name in known_datasets():
        assert name in message
    assert isinstance(info.value, ValueError)


def test_label_of():
    spec = get_dataset("rsicd")
    assert spec.classnames[spec.label_of("beach")] == "beach"
    with pytest.raises(DatasetError, match="no class"):
        spec.label_of("glacier")


def test_transfer_pairings():
    assert CROSS_DATASET.train == "patternnet"
    assert list(CROSS_DATASET.test) == ["rsicd", "resisc45", "mlrsnet"]
    train, tests = DOMAIN_GENERALIZATION
    assert (train, list(tests)) == ("patternnetv2", ["rsicdv2", "resisc45v2", "mlrsnetv2"])
    assert transfer_pairing("cross-dataset") == CROSS_DATASET
    assert transfer_pairing("domain_generalization") == DOMAIN_GENERALIZATION
    for name in (*CROSS_DATASET.test, *DOMAIN_GENERALIZATION.test):
        assert name in CATALOG
    with pytest.raises(DatasetError, match="cross-dataset"):
        transfer_pairing("base2new")


PUBLISHED_CLASSNAMES = json.loads((Path(__file__).parent / "data" / "applenet_classnames.json").read_text())
PUBLISHED_DATASETS = ["patternnet", "rsicd", "resisc45", "patternnetv2", "rsicdv2", "resisc45v2", "mlrsnetv2"]


def test_the_published_class_lists_are_all_stored():
    assert sorted(PUBLISHED_CLASSNAMES) == sorted(PUBLISHED_DATASETS)


@pytest.mark.parametrize("name", PUBLISHED_DATASETS)
def test_class_names_match_the_published_split_files(name):
    assert get_dataset(name).classnames == tuple(PUBLISHED_CLASSNAMES[name])
