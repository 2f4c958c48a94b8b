"""The remote-sensing scene datasets the protocols name, as facts: class names and file layout.

Class names are spelled exactly as each dataset's folders (or published split files) spell them,
because they are matched against folder names on disk and become the words in CLIP prompts.
``classnames`` is in *label order*: for the APPLeNet datasets that is the order of the labels in
the published split JSON (which is not alphabetical), so that label ``i`` read from a split file,
a class-folder tree or a checkpoint all mean the same class. For folder-only datasets label order
is the sorted folder names, which is what a class-folder scan produces anyway.

Datasets not listed here need no code: any class-folder tree is read as a dataset named after its
root folder (see :mod:`bimors.data.splits`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

from bimors.errors import BimorsError


class DatasetError(BimorsError, ValueError):
    """A dataset name, root or split file is unusable; the message names it and says why."""


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: its catalog key, class names in label order, and where its files sit.

    ``split_file`` is the published split JSON expected directly under the dataset root;
    ``image_subdir`` is the folder under the root that holds the class folders (the paths inside
    the split JSON are relative to it). Either may be ``None``.
    """

    name: str
    title: str
    classnames: tuple[str, ...]
    split_file: str | None = None
    image_subdir: str | None = None

    def __post_init__(self) -> None:
        if len(set(self.classnames)) != len(self.classnames):
            raise DatasetError(f"dataset {self.name!r} lists a class name twice")

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def label_of(self, classname: str) -> int:
        try:
            return self.classnames.index(classname)
        except ValueError:
            raise DatasetError(f"dataset {self.name!r} has no class {classname!r}") from None


class Pairing(NamedTuple):
    """A transfer protocol: fit on ``train`` (all its classes), evaluate on each of ``test``."""

    train: str
    test: tuple[str, ...]


# --------------------------------------------------------------------------------------------
# class names (label order; see the module docstring)

#: The 16 classes shared by the domain-shifted v2 datasets, in their published label order.
V2_CLASSNAMES: tuple[str, ...] = (
    "baseballfield", "sparse_residential", "harbor", "intersection", "forest", "bridge",
    "overpass", "railway", "parking", "meadow", "river", "desert", "stadium", "storage_tank",
    "dense_residential", "beach",
)

_PATTERNNET = (
    "oil_well", "runway", "baseball_field", "sparse_residential", "parking_lot", "oil_gas_field",
    "wastewater_treatment_plant", "crosswalk", "swimming_pool", "shipping_yard", "harbor",
    "intersection", "forest", "nursing_home", "mobile_home_park", "bridge", "closed_road",
    "coastal_mansion", "golf_course", "runway_marking", "overpass", "transformer_station",
    "tennis_court", "railway", "basketball_court", "christmas_tree_farm", "parking_space",
    "cemetery", "river", "solar_panel", "chaparral", "ferry_terminal", "storage_tank",
    "dense_residential", "beach", "football_field", "freeway", "airplane",
)

_RSICD = (
    "center", "farmland", "baseballfield", "playground", "industrial", "storagetanks", "resort",
    "forest", "bridge", "port", "railwaystation", "sparseresidential", "viaduct", "airport",
    "denseresidential", "school", "mountain", "park", "commercial", "parking",
    "mediumresidential", "meadow", "pond", "river", "bareland", "desert", "church", "stadium",
    "square", "beach",
)

_RESISC45 = (
    "runway", "lake", "sparse_residential", "wetland", "parking_lot", "roundabout", "terrace",
    "sea_ice", "baseball_diamond", "harbor", "palace", "ship", "intersection", "forest",
    "ground_track_field", "mobile_home_park", "commercial_area", "bridge", "island", "golf_course",
    "thermal_power_station", "airport", "mountain", "overpass", "industrial_area", "tennis_court",
    "railway", "cloud", "basketball_court", "circular_farmland", "meadow", "railway_station",
    "river", "chaparral", "desert", "church", "stadium", "medium_residential",
    "rectangular_farmland", "snowberg", "storage_tank", "dense_residential", "beach", "freeway",
    "airplane",
)

# MLRSNet's published split JSON was not available to check its label order, so this is the
# official folder spelling in sorted order ("harbor&port" and the "swimmimg_pool" typo included).
# When a split JSON is read, its own labels win (see splits.py).
_MLRSNET = (
    "airplane", "airport", "bareland", "baseball_diamond", "basketball_court", "beach", "bridge",
    "chaparral", "cloud", "commercial_area", "dense_residential_area", "desert",
    "eroded_farmland", "farmland", "forest", "freeway", "golf_course", "ground_track_field",
    "harbor&port", "industrial_area", "intersection", "island", "lake", "meadow",
    "mobile_home_park", "mountain", "overpass", "park", "parking_lot", "parkway", "railway",
    "railway_station", "river", "roundabout", "shipping_yard", "snowberg",
    "sparse_residential_area", "stadium", "storage_tank", "swimmimg_pool", "tennis_court",
    "terrace", "transmission_tower", "vegetable_greenhouse", "wetland", "wind_turbine",
)

_EUROSAT = (
    "AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
    "PermanentCrop", "Residential", "River", "SeaLake",
)

_UCMERCED = (
    "agricultural", "airplane", "baseballdiamond", "beach", "buildings", "chaparral",
    "denseresidential", "forest", "freeway", "golfcourse", "harbor", "intersection",
    "mediumresidential", "mobilehomepark", "overpass", "parkinglot", "river", "runway",
    "sparseresidential", "storagetanks", "tenniscourt",
)

_AID = (
    "Airport", "BareLand", "BaseballField", "Beach", "Bridge", "Center", "Church", "Commercial",
    "DenseResidential", "Desert", "Farmland", "Forest", "Industrial", "Meadow",
    "MediumResidential", "Mountain", "Park", "Parking", "Playground", "Pond", "Port",
    "RailwayStation", "Resort", "River", "School", "SparseResidential", "Square", "Stadium",
    "StorageTanks", "Viaduct",
)

# Sorted by code point, as a folder scan sorts them: the two lower-case names come last.
_WHURS19 = (
    "Airport", "Beach", "Bridge", "Commercial", "Desert", "Farmland", "Forest", "Industrial",
    "Meadow", "Mountain", "Park", "Parking", "Pond", "Port", "Residential", "River", "Viaduct",
    "footballField", "railwayStation",
)


def _applenet(name: str, title: str, classnames: tuple[str, ...]) -> DatasetSpec:
    return DatasetSpec(name, title, classnames, split_file=f"{name}.json", image_subdir="images")


_SPECS = (
    _applenet("patternnet", "PatternNet", _PATTERNNET),
    _applenet("rsicd", "RSICD", _RSICD),
    _applenet("resisc45", "NWPU-RESISC45", _RESISC45),
    _applenet("mlrsnet", "MLRSNet", _MLRSNET),
    _applenet("patternnetv2", "PatternNetv2", V2_CLASSNAMES),
    _applenet("rsicdv2", "RSICDv2", V2_CLASSNAMES),
    _applenet("resisc45v2", "RESISC45v2", V2_CLASSNAMES),
    _applenet("mlrsnetv2", "MLRSNetv2", V2_CLASSNAMES),
    DatasetSpec("eurosat", "EuroSAT (RGB)", _EUROSAT),
    DatasetSpec("ucmerced", "UC Merced Land Use", _UCMERCED, image_subdir="Images"),
    DatasetSpec("aid", "AID", _AID),
    DatasetSpec("whurs19", "WHU-RS19", _WHURS19),
)

#: Every known dataset by canonical (lower-case) name.
CATALOG: dict[str, DatasetSpec] = {spec.name: spec for spec in _SPECS}

#: Cross-dataset transfer: fit on PatternNet, evaluate on the other three.
CROSS_DATASET = Pairing("patternnet", ("rsicd", "resisc45", "mlrsnet"))
#: Domain generalization: fit on PatternNetv2, evaluate on the other v2 datasets (same 16 classes).
DOMAIN_GENERALIZATION = Pairing("patternnetv2", ("rsicdv2", "resisc45v2", "mlrsnetv2"))


def canonical_name(name: str) -> str:
    """``"UC_Merced"``, ``"WHU-RS19"``, ``"PatternNet v2"`` -> ``"ucmerced"``, ``"whurs19"``,
    ``"patternnetv2"``: people write these names many ways, the catalog should not care."""
    return re.sub(r"[\s_\-]+", "", name).lower()


def known_datasets() -> list[str]:
    return sorted(CATALOG)


def get_dataset(name: str) -> DatasetSpec:
    """The catalog entry for ``name`` (case, spaces, ``-`` and ``_`` ignored)."""
    spec = CATALOG.get(canonical_name(name))
    if spec is None:
        raise DatasetError(
            f"unknown dataset {name!r}; known datasets: {', '.join(known_datasets())}. "
            "For any other class-folder tree set data.dataset to null (it is named after its folder)"
        )
    return spec


def folder_dataset(name: str, classnames: list[str] | tuple[str, ...]) -> DatasetSpec:
    """A dataset that is not in the catalog, described by the class folders found on disk."""
    return DatasetSpec(name=name, title=name, classnames=tuple(classnames))
