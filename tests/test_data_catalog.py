import json
import subprocess
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

APPLENET_REPO = Path("/work/.mirror/mainaksingha01+APPLeNet/repo")


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


def _published_classnames(name):
    blob = subprocess.run(
        ["git", "-C", str(APPLENET_REPO), "show", f"HEAD:json/{name}.json"], capture_output=True, check=False
    )
    if blob.returncode != 0 or not blob.stdout.strip():
        return None
    by_label = {}
    for split in json.loads(blob.stdout).values():
        for _, label, classname in split:
            by_label[label] = classname
    return tuple(by_label[i] for i in range(len(by_label)))


@pytest.mark.skipif(not APPLENET_REPO.exists(), reason="APPLeNet reference mirror not present")
@pytest.mark.parametrize(
    "name", ["patternnet", "rsicd", "resisc45", "patternnetv2", "rsicdv2", "resisc45v2", "mlrsnetv2"]
)
def test_class_names_match_the_published_split_files(name):
    published = _published_classnames(name)
    if published is None:
        pytest.skip(f"{name}.json not stored in the mirror")
    assert get_dataset(name).classnames == published
