"""Read a dataset root (local path, ``file://`` or ``s3://``) into labelled, split tile records.

Two layouts are understood:

* a published split JSON beside the images, ``{"train"|"val"|"test": [[relpath, label, classname], ...]}``
  with ``relpath`` relative to the image folder (``<root>/images`` for the APPLeNet layout,
  otherwise the root itself);
* class folders, ``<root>/<class>/**/<image>``: labels are the sorted class names (or the catalog's
  label order for a catalog dataset) and each class is split into train/val/test with a seeded
  shuffle of its *sorted* file list, so the split is the same on every machine and every storage
  backend regardless of listing order.
"""

from __future__ import annotations

import json
import logging
import math
import posixpath
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from bimors import storage
from bimors.config import DataConfig, StorageConfig
from bimors.data.catalog import DatasetError, DatasetSpec, folder_dataset, get_dataset

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"})

Layout = Literal["split_json", "class_folders"]


@dataclass(frozen=True)
class TileRecord:
    """One labelled image. ``relpath`` is relative to the dataset's image folder, ``uri`` is absolute."""

    uri: str
    relpath: str
    label: int
    classname: str
    split: str


@dataclass(frozen=True)
class DatasetListing:
    """Everything read from one dataset root; ``classnames[i]`` is the class of label ``i``."""

    name: str
    root: str
    image_root: str
    layout: Layout
    classnames: tuple[str, ...]
    records: list[TileRecord] = field(repr=False)

    def counts(self) -> dict[str, int]:
        out = {split: 0 for split in SPLITS}
        for record in self.records:
            out[record.split] += 1
        return out


# --------------------------------------------------------------------------------------------
# entry point


def read_dataset(cfg: DataConfig, storage_cfg: StorageConfig | None = None) -> DatasetListing:
    """List, label and split the dataset ``cfg.root`` describes."""
    if not cfg.root:
        raise DatasetError("data.root is not set: give a dataset root (class folders or a split JSON)")
    root = normalize_root(cfg.root)
    spec = get_dataset(cfg.dataset) if cfg.dataset else None
    _require_folder(root, storage_cfg)

    split_name = cfg.split_file or (spec.split_file if spec else None)
    if split_name:
        split_uri = storage.join(root, split_name)
        if storage.exists(split_uri, storage_cfg):
            image_root = _image_root(root, (spec.image_subdir if spec else None) or "images", storage_cfg)
            records, classnames = parse_split_json(
                storage.read_bytes(split_uri, storage_cfg), image_root, source=split_uri
            )
            if spec is not None and set(classnames) != set(spec.classnames):
                log.warning(
                    "%s: its classes differ from the catalog's %s classes (%s); using the file's",
                    split_uri, spec.name, _set_difference(classnames, spec.classnames),
                )
            name = spec.name if spec else folder_name(root)
            return DatasetListing(name, root, image_root, "split_json", tuple(classnames), records)
        if cfg.split_file:
            raise DatasetError(f"split file {split_uri} (data.split_file) does not exist")

    image_root = _image_root(root, spec.image_subdir, storage_cfg) if spec else root
    files = list_class_folders(image_root, storage_cfg)
    if spec is not None:
        _check_catalog_classes(spec, files, image_root)
    else:
        spec = folder_dataset(folder_name(root), sorted(files))
    records = assign_splits(
        files, spec.classnames, image_root, cfg.train_fraction, cfg.val_fraction, cfg.split_seed
    )
    return DatasetListing(spec.name, root, image_root, "class_folders", spec.classnames, records)


def normalize_root(root: str) -> str:
    """Absolute local paths (so a manifest works from any working directory), URIs unchanged."""
    root = root.rstrip("/") or "/"
    if storage.is_remote(root) or root.startswith("file://"):
        return root
    return str(storage.local_path(root).resolve())


def folder_name(root: str) -> str:
    """The last path component of a root URI, the name of a dataset not in the catalog."""
    return posixpath.basename(root.rstrip("/").split("://", 1)[-1]) or "dataset"


def _require_folder(root: str, storage_cfg: StorageConfig | None) -> None:
    fs, path = storage.filesystem(root, storage_cfg)
    with storage.translated_errors(root, storage_cfg):
        fs.invalidate_cache(path)
        if fs.isdir(path):
            return
    exists = storage.exists(root, storage_cfg)  # says so when the bucket itself is missing
    if exists:
        raise DatasetError(f"dataset root {root} is a file; expected a folder of class folders or a split JSON")
    raise DatasetError(f"dataset root {root} does not exist")


def _image_root(root: str, subdir: str | None, storage_cfg: StorageConfig | None) -> str:
    if subdir:
        candidate = storage.join(root, subdir)
        fs, path = storage.filesystem(candidate, storage_cfg)
        with storage.translated_errors(candidate, storage_cfg):
            if fs.isdir(path):
                return candidate
    return root


def _set_difference(found: Sequence[str], expected: Sequence[str]) -> str:
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    parts = []
    if missing:
        parts.append(f"missing {', '.join(missing)}")
    if extra:
        parts.append(f"unexpected {', '.join(extra)}")
    return "; ".join(parts)


def _check_catalog_classes(spec: DatasetSpec, files: Mapping[str, Sequence[str]], image_root: str) -> None:
    if set(files) != set(spec.classnames):
        raise DatasetError(
            f"{image_root}: class folders do not match dataset {spec.name!r} "
            f"({_set_difference(list(files), spec.classnames)}); "
            "set data.dataset to null to read it as an uncatalogued class-folder tree"
        )


# --------------------------------------------------------------------------------------------
# layout (a): published split JSON


def parse_split_json(data: bytes, image_root: str, source: str) -> tuple[list[TileRecord], list[str]]:
    """Records and label-ordered class names from split-JSON bytes; ``source`` names the file in errors.

    The file is checked rather than trusted: every entry must be ``[relpath, label, classname]``,
    a label must always carry the same class name (and vice versa), labels must be ``0..n-1``,
    and no image may appear twice, because any of these would silently corrupt training.
    """
    def bad(problem: str) -> DatasetError:
        return DatasetError(f"split file {source}: {problem}")

    try:
        tree = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"split file {source} is not valid JSON: {err}") from None
    if not isinstance(tree, dict):
        raise bad(f"expected an object with train/val/test lists, got {type(tree).__name__}")
    unknown = sorted(set(tree) - set(SPLITS))
    if unknown:
        raise bad(f"unknown split(s) {', '.join(map(repr, unknown))}; allowed: train, val, test")
    missing = [split for split in ("train", "test") if split not in tree]
    if missing:
        raise bad(f"missing split(s) {', '.join(missing)}")

    records: list[TileRecord] = []
    class_of_label: dict[int, tuple[str, str]] = {}
    label_of_class: dict[str, tuple[int, str]] = {}
    seen: dict[str, str] = {}
    for split in SPLITS:
        entries = tree.get(split, [])
        if not isinstance(entries, list):
            raise bad(f"{split!r} must be a list, got {type(entries).__name__}")
        for index, entry in enumerate(entries):
            where = f"{split}[{index}]"
            relpath, label, classname = _parse_entry(entry, where, source)
            if relpath in seen:
                raise bad(f"{relpath!r} appears twice ({seen[relpath]} and {where})")
            seen[relpath] = where
            if label in class_of_label and class_of_label[label][0] != classname:
                first_name, first_where = class_of_label[label]
                raise bad(f"label {label} is {first_name!r} at {first_where} but {classname!r} at {where}")
            if classname in label_of_class and label_of_class[classname][0] != label:
                first_label, first_where = label_of_class[classname]
                raise bad(f"class {classname!r} has label {first_label} at {first_where} but {label} at {where}")
            class_of_label.setdefault(label, (classname, where))
            label_of_class.setdefault(classname, (label, where))
            records.append(TileRecord(storage.join(image_root, relpath), relpath, label, classname, split))

    if not records:
        raise DatasetError(f"split file {source} lists no images")
    absent = sorted(set(range(len(class_of_label))) - set(class_of_label))
    if absent:
        raise bad(
            f"labels must be 0..{len(class_of_label) - 1} with no gaps; "
            f"no image has label {', '.join(map(str, absent[:10]))}"
        )
    classnames = [class_of_label[label][0] for label in range(len(class_of_label))]
    return records, classnames


def _parse_entry(entry: Any, where: str, source: str) -> tuple[str, int, str]:
    if not isinstance(entry, (list, tuple)) or len(entry) != 3:
        raise DatasetError(f"split file {source}: {where} must be [relpath, label, classname], got {entry!r:.120}")
    relpath, label, classname = entry
    if not isinstance(relpath, str) or not relpath.strip():
        raise DatasetError(f"split file {source}: {where} has no image path ({relpath!r})")
    relpath = relpath.replace("\\", "/").lstrip("/")
    if ".." in relpath.split("/"):
        raise DatasetError(f"split file {source}: {where} path {relpath!r} leaves the image folder")
    if isinstance(label, bool) or not isinstance(label, int) or label < 0:
        raise DatasetError(f"split file {source}: {where} label must be a non-negative integer, got {label!r}")
    if not isinstance(classname, str) or not classname:
        raise DatasetError(f"split file {source}: {where} class name must be a non-empty string, got {classname!r}")
    return relpath, label, classname


# --------------------------------------------------------------------------------------------
# layout (b): class folders


def is_image_name(name: str) -> bool:
    return posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _hidden(parts: Sequence[str]) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in parts)


def list_class_folders(image_root: str, storage_cfg: StorageConfig | None = None) -> dict[str, list[str]]:
    """``{classname: sorted relpaths}`` for ``<image_root>/<class>/**/<image>``.

    One recursive listing (a single paginated LIST on S3). Hidden files and folders are skipped;
    files that are not images are skipped with a debug message; a class folder without a single
    image is an error, since it would silently become a class that can never be predicted.
    """
    fs, base = storage.filesystem(image_root, storage_cfg)
    with storage.translated_errors(image_root, storage_cfg):
        fs.invalidate_cache(base)  # a long-lived process must see tiles that arrived since its last look
        entries = fs.find(base, withdirs=True, detail=True)
    prefix = base.rstrip("/") + "/"
    images: dict[str, list[str]] = {}
    classes: set[str] = set()
    other_files: dict[str, int] = {}
    stray_images = 0
    for path, info in entries.items():
        if not path.startswith(prefix):
            continue
        relpath = path[len(prefix):]
        parts = relpath.split("/")
        if not relpath or _hidden(parts):
            continue
        is_dir = info.get("type") == "directory"
        if len(parts) == 1:
            if is_dir:
                classes.add(parts[0])
            elif is_image_name(relpath):
                stray_images += 1
            continue
        classes.add(parts[0])
        if is_dir:
            continue
        if is_image_name(parts[-1]):
            images.setdefault(parts[0], []).append("/".join(parts[1:]))
        else:
            other_files[parts[0]] = other_files.get(parts[0], 0) + 1

    if not classes:
        if stray_images:
            raise DatasetError(
                f"{image_root} holds {stray_images} images but no class folders; "
                "put each class's images in <root>/<class>/ (or provide a split JSON)"
            )
        raise DatasetError(f"dataset root {image_root} is empty (no class folders)")
    if stray_images:
        log.warning("%s: ignoring %d images directly under the root (not in a class folder)", image_root, stray_images)
    empty = sorted(c for c in classes if c not in images)
    if empty:
        detail = ", ".join(
            f"{storage.join(image_root, c)}" + (f" ({other_files[c]} non-image files)" if c in other_files else "")
            for c in empty[:5]
        )
        raise DatasetError(
            f"{len(empty)} class folder(s) hold no images ({', '.join(sorted(IMAGE_EXTENSIONS))}): {detail}"
        )
    for c, n in sorted(other_files.items()):
        log.debug("%s: skipped %d non-image files", storage.join(image_root, c), n)
    return {c: sorted(images[c]) for c in sorted(images)}


def split_sizes(n: int, train_fraction: float, val_fraction: float) -> tuple[int, int, int]:
    """(train, val, test) counts for a class of ``n`` images.

    Rounded half up; every split that was asked for gets at least one image when the class is big
    enough, and train is never empty, so small classes still appear in every split.
    """
    if n <= 1:
        return n, 0, 0
    n_train = max(1, math.floor(n * train_fraction + 0.5))
    n_val = math.floor(n * val_fraction + 0.5)
    if val_fraction > 0 and n >= 3:
        n_val = max(1, n_val)
    while n_train + n_val > n - 1:  # leave at least one test image, taking from the larger split
        if n_train > 1 and n_train >= n_val:
            n_train -= 1
        else:
            n_val -= 1
    return n_train, n_val, n - n_train - n_val


def assign_splits(
    files: Mapping[str, Sequence[str]],
    classnames: Sequence[str],
    image_root: str,
    train_fraction: float,
    val_fraction: float,
    seed: int,
) -> list[TileRecord]:
    """Per-class seeded train/val/test split of ``{classname: relpaths}``.

    Each class is shuffled by its own ``random.Random`` seeded with the split seed and the class
    name (string seeds are hashed with SHA-512 by ``random``, not with ``hash()``), after sorting
    its paths, so adding a class or listing in another order leaves every other class unchanged.
    """
    records: list[TileRecord] = []
    for label, classname in enumerate(classnames):
        paths = sorted(files.get(classname, ()))
        random.Random(f"bimors-split:{seed}:{classname}").shuffle(paths)
        n_train, n_val, _ = split_sizes(len(paths), train_fraction, val_fraction)
        for position, relpath in enumerate(paths):
            split = "train" if position < n_train else "val" if position < n_train + n_val else "test"
            records.append(TileRecord(storage.join(image_root, classname, relpath), f"{classname}/{relpath}",
                                      label, classname, split))
    records.sort(key=lambda r: (r.label, r.relpath))
    return records
