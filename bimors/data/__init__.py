"""Tiles in, labelled and split manifests out: dataset catalog, split readers, few-shot and
base/new protocols, robust decoding of satellite imagery, and a synthetic dataset for offline runs."""

from __future__ import annotations

from bimors.data.catalog import (
    CATALOG,
    CROSS_DATASET,
    DOMAIN_GENERALIZATION,
    DatasetError,
    DatasetSpec,
    Pairing,
    get_dataset,
    known_datasets,
)
from bimors.data.decode import DecodeError, bands_to_rgb, decode_image
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
    PROTOCOL_SEEDS,
    base_new_labels,
    sample_few_shot,
    select_split,
    subsample_classes,
    transfer_pairing,
)
from bimors.data.splits import DatasetListing, TileRecord, read_dataset
from bimors.data.synthetic import SyntheticDataset, generate_synthetic, render_tile

__all__ = [
    "CATALOG",
    "CROSS_DATASET",
    "DOMAIN_GENERALIZATION",
    "MANIFEST_SCHEMA",
    "PROTOCOL_SEEDS",
    "DatasetError",
    "DatasetListing",
    "DatasetSpec",
    "DecodeError",
    "Pairing",
    "SyntheticDataset",
    "TileRecord",
    "bands_to_rgb",
    "base_new_labels",
    "build_manifest",
    "classnames_of",
    "decode_image",
    "generate_synthetic",
    "get_dataset",
    "known_datasets",
    "read_dataset",
    "read_manifest",
    "records_to_table",
    "render_tile",
    "sample_few_shot",
    "select_split",
    "subsample_classes",
    "tile_id",
    "transfer_pairing",
    "write_manifest",
]
