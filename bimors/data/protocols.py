"""The APPLeNet/BiMoRS evaluation protocols as pure functions over manifest tables or record lists.

* few-shot: K tiles per class, drawn with a seeded shuffle of the class's *sorted* URIs so the same
  seed gives the same shots on any machine;
* base-to-new: the first ``ceil(n/2)`` labels are base, the rest new, and labels are re-indexed
  within the subset (0..m-1), exactly as APPLeNet's ``subsample_classes`` does. "Sorted" there
  means sorted *labels*: for a class-folder dataset that is alphabetical order, for a published
  split JSON it is the file's label order;
* cross-dataset / domain generalization: which dataset trains and which ones test.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from typing import Literal, TypeVar

import pyarrow as pa

from bimors.data.catalog import (
    CROSS_DATASET,
    DOMAIN_GENERALIZATION,
    DatasetError,
    Pairing,
)
from bimors.data.manifest import with_classnames
from bimors.data.splits import TileRecord

log = logging.getLogger(__name__)

Rows = TypeVar("Rows", pa.Table, list[TileRecord])
Subsample = Literal["all", "base", "new"]

#: The seeds every table in the papers averages over.
PROTOCOL_SEEDS: tuple[int, ...] = (1, 2, 3)

_PAIRINGS: dict[str, Pairing] = {
    "cross-dataset": CROSS_DATASET,
    "domain-generalization": DOMAIN_GENERALIZATION,
}


def _columns(rows: pa.Table | list[TileRecord]) -> tuple[list[int], list[str], list[str]]:
    if isinstance(rows, pa.Table):
        return (
            [int(v) for v in rows.column("label").to_pylist()],
            rows.column("classname").to_pylist(),
            rows.column("uri").to_pylist(),
        )
    return [r.label for r in rows], [r.classname for r in rows], [r.uri for r in rows]


def _take(rows: Rows, indices: list[int]) -> Rows:
    if isinstance(rows, pa.Table):
        return rows.take(pa.array(indices, pa.int64()))
    return [rows[i] for i in indices]


def select_split(rows: Rows, split: str) -> Rows:
    """The rows of one split (``train``, ``val`` or ``test``), in their order."""
    if isinstance(rows, pa.Table):
        return _take(rows, [i for i, s in enumerate(rows.column("split").to_pylist()) if s == split])
    return [r for r in rows if r.split == split]


# --------------------------------------------------------------------------------------------
# few-shot


def classes_short_of(rows: pa.Table | list[TileRecord], shots: int) -> dict[str, int]:
    """``{classname: available}`` for the classes with fewer than ``shots`` rows (to report)."""
    _, names, _ = _columns(rows)
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return {name: n for name, n in sorted(counts.items()) if n < shots}


def sample_few_shot(rows: Rows, shots: int, seed: int) -> Rows:
    """K = ``shots`` rows per class (all rows when ``shots`` is 0); a class with fewer than K
    keeps all of them and is counted in one warning. Output keeps the input's row order.

    Each class gets its own ``random.Random`` seeded with the seed and the class name, so the
    shots of one class do not change when another class is added or removed.
    """
    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    if shots == 0:
        return rows
    _, names, uris = _columns(rows)
    by_class: dict[str, list[int]] = {}
    for index, name in enumerate(names):
        by_class.setdefault(name, []).append(index)
    chosen: list[int] = []
    for name, indices in by_class.items():
        ordered = sorted(indices, key=lambda i: uris[i])
        random.Random(f"bimors-shots:{seed}:{name}").shuffle(ordered)
        chosen.extend(ordered[:shots])
    short = classes_short_of(rows, shots)
    if short:
        log.warning(
            "%d of %d classes have fewer than %d tiles and use all they have: %s",
            len(short), len(by_class), shots, ", ".join(f"{k} ({v})" for k, v in list(short.items())[:10]),
        )
    return _take(rows, sorted(chosen))


# --------------------------------------------------------------------------------------------
# base-to-new


def base_new_labels(num_classes: int) -> tuple[list[int], list[int]]:
    """(base labels, new labels): the first ``ceil(n/2)`` labels and the rest."""
    if num_classes < 1:
        raise ValueError(f"need at least one class, got {num_classes}")
    m = math.ceil(num_classes / 2)
    return list(range(m)), list(range(m, num_classes))


def subsample_classnames(classnames: Sequence[str], subsample: Subsample) -> list[str]:
    """Class names of the ``subsample`` subset, in its re-indexed label order."""
    if subsample == "all":
        return list(classnames)
    base, new = base_new_labels(len(classnames))
    return [classnames[i] for i in (base if subsample == "base" else new)]


def subsample_classes(rows: Rows, subsample: Subsample, classnames: Sequence[str]) -> tuple[Rows, list[str]]:
    """Rows of the ``subsample`` classes with labels re-indexed to 0..m-1, and those classes' names.

    ``classnames`` is the whole dataset's label-ordered class list: the halves are defined on the
    dataset, not on whichever classes happen to occur in ``rows``.
    """
    if subsample not in ("all", "base", "new"):
        raise ValueError(f"subsample must be all, base or new, got {subsample!r}")
    if subsample == "all":
        return rows, list(classnames)
    base, new = base_new_labels(len(classnames))
    selected = base if subsample == "base" else new
    relabel = {old: position for position, old in enumerate(selected)}
    labels, names, _ = _columns(rows)
    for label, name in zip(labels, names, strict=True):
        if not 0 <= label < len(classnames) or classnames[label] != name:
            raise ValueError(f"row label {label} ({name!r}) does not match the dataset's class list")
    keep = [i for i, label in enumerate(labels) if label in relabel]
    subset = _take(rows, keep)
    if isinstance(subset, pa.Table):
        new_labels = pa.array([relabel[labels[i]] for i in keep], subset.schema.field("label").type)
        subset = subset.set_column(subset.schema.get_field_index("label"), "label", new_labels)
        subset = with_classnames(subset, [classnames[i] for i in selected])
    else:
        subset = [
            TileRecord(r.uri, r.relpath, relabel[r.label], r.classname, r.split) for r in subset
        ]
    return subset, [classnames[i] for i in selected]


# --------------------------------------------------------------------------------------------
# transfer protocols


def transfer_pairing(protocol: str) -> Pairing:
    """``"cross-dataset"`` or ``"domain-generalization"`` -> (train dataset, test datasets)."""
    key = protocol.replace("_", "-").lower()
    if key not in _PAIRINGS:
        raise DatasetError(f"unknown transfer protocol {protocol!r}; known: {', '.join(sorted(_PAIRINGS))}")
    return _PAIRINGS[key]


def val_shots(shots: int) -> int:
    """Validation shots per class in the APPLeNet/CoOp protocol: min(K, 4) (all when K is 0)."""
    return min(shots, 4) if shots else 0


def protocol_rows(rows: Rows, shots: int, seed: int) -> dict[str, Rows]:
    """The tiles one seed of a protocol uses: K-shot train, min(K, 4)-shot val, the whole test split."""
    return {
        "train": sample_few_shot(select_split(rows, "train"), shots, seed),
        "val": sample_few_shot(select_split(rows, "val"), val_shots(shots), seed),
        "test": select_split(rows, "test"),
    }
