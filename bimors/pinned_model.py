"""One model identity per run: ``--model`` resolved once, on the driver, to what cannot move.

``models:/bimors@champion`` names whatever version the alias points at *now*. Resolved again by
every actor or replica, an alias moved during a night would classify half the scenes with one
model and half with another, and nothing in the outputs would tell. :func:`pin_model` resolves
it once: the alias to its registry version (``models:/bimors/7``) and the run behind it, plus a
content digest of the checkpoint's files. Actors load :attr:`PinnedModel.uri` through
:func:`load_pinned`, which refuses a checkpoint whose digest differs (a checkpoint folder
overwritten mid-run), and every output records :meth:`PinnedModel.record`.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from bimors import storage
from bimors.config import Config, StorageConfig
from bimors.errors import BimorsError

if TYPE_CHECKING:
    import torch

    from bimors.pipelines.inference import Predictor


class ModelChangedError(BimorsError):
    """The checkpoint an actor found is not the one the run was pinned to."""


@dataclass(frozen=True)
class PinnedModel:
    """The model a run uses, as the user named it and as it was resolved."""

    requested: str  # what --model said, e.g. models:/bimors@champion
    uri: str  # immutable: models:/bimors/7, runs:/<id>/model or the checkpoint URI
    digest: str  # sha256 of the checkpoint's files (names and bytes)
    mlflow_version: str | None = None
    mlflow_run_id: str | None = None

    def record(self) -> dict[str, Any]:
        """What outputs store about the model (summary.json, manifests, Parquet metadata)."""
        return asdict(self)


def pin_model(model_uri: str, cfg: Config) -> PinnedModel:
    """Resolve ``--model`` once: registry aliases to versions, and the checkpoint to a digest.
    Raises the user errors of :func:`bimors.tracking.resolve_checkpoint` for a bad ``--model``."""
    from bimors import tracking

    uri, version, run_id = model_uri, None, None
    if model_uri.startswith("models:"):
        uri, version, run_id = tracking.pin_registry_uri(model_uri, cfg)
    elif model_uri.startswith("runs:"):
        run_id = model_uri.partition(":")[2].strip("/").split("/")[0] or None
    checkpoint = tracking.resolve_checkpoint(uri, cfg)
    return PinnedModel(model_uri, uri, checkpoint_digest(checkpoint, cfg.storage), version, run_id)


def checkpoint_digest(checkpoint: str, storage_cfg: StorageConfig | None = None) -> str:
    """``sha256:<hex>`` over the relative names and bytes of every file in the checkpoint folder."""
    fs, root = storage.filesystem(checkpoint, storage_cfg)
    with storage.translated_errors(checkpoint, storage_cfg):
        files = sorted(fs.find(root))
        digest = hashlib.sha256()
        for path in files:
            name = posixpath.relpath(path, root)
            if posixpath.basename(name).startswith("."):
                continue  # download markers and the like are not part of the model
            digest.update(name.encode() + b"\0")
            digest.update(hashlib.sha256(fs.cat_file(path)).digest())
    return "sha256:" + digest.hexdigest()


def load_pinned(cfg: Config, pinned: PinnedModel, device: "torch.device | str" = "cpu", encoders: bool = True) -> "Predictor":
    """A Predictor for exactly the pinned model (what every actor and replica of a run loads)."""
    from bimors import tracking
    from bimors.pipelines.inference import Predictor

    checkpoint = tracking.resolve_checkpoint(pinned.uri, cfg)
    found = checkpoint_digest(checkpoint, cfg.storage)
    if found != pinned.digest:
        raise ModelChangedError(
            f"{pinned.uri}: the checkpoint changed after the run started (digest {found[7:19]}…, pinned "
            f"{pinned.digest[7:19]}…); write new models to a new folder or register a new version"
        )
    return Predictor.from_checkpoint(cfg, checkpoint, device, encoders=encoders)
