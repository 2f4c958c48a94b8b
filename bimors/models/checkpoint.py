"""Learner checkpoints: weights as safetensors + a JSON describing how to rebuild and check them.

Nothing a user loads is ever unpickled. The JSON records the full config, the class names and the
backbone's identity, so that loading onto the wrong backbone or the wrong classes fails with a
message instead of silently producing wrong predictions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from bimors import storage
from bimors.config import LearnerConfig, StorageConfig
from bimors.errors import BimorsError
from bimors.models.clip_backbone import FrozenCLIP
from bimors.models.learners import LearnerDims, PromptLearner
from bimors.models.methods import LEARNERS

FORMAT = "bimors-learner"
VERSION = 1
WEIGHTS = "learner.safetensors"
META = "learner.json"


class CheckpointMismatchError(BimorsError, ValueError):
    """The checkpoint was trained for another backbone or other classes."""


@dataclass
class LearnerCheckpoint:
    learner: PromptLearner
    classnames: list[str]
    backbone: dict[str, Any]
    config: dict[str, Any]
    extra: dict[str, Any]


def save_learner(
    uri: str,
    learner: PromptLearner,
    classnames: Sequence[str],
    backbone_identity: dict[str, Any],
    config: dict[str, Any],
    extra: dict[str, Any] | None = None,
    storage_cfg: StorageConfig | None = None,
) -> None:
    """Write ``<uri>/learner.safetensors`` and ``<uri>/learner.json`` (local folder or object storage).
    The JSON is written last: a folder with a JSON always has its weights."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in learner.state_dict().items()}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "method": learner.method,
        "learner": learner.cfg.model_dump(mode="json"),
        "dims": learner.dims.to_dict(),
        "classnames": list(classnames),
        "backbone": backbone_identity,
        "config": config,
        "extra": extra or {},
    }
    storage.write_bytes(storage.join(uri, WEIGHTS), save_safetensors(tensors), storage_cfg)
    storage.write_bytes(storage.join(uri, META), json.dumps(meta, indent=2).encode(), storage_cfg)


def read_meta(uri: str, storage_cfg: StorageConfig | None = None) -> dict[str, Any]:
    raw = storage.read_bytes(storage.join(uri, META), storage_cfg)
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise CheckpointMismatchError(f"{storage.join(uri, META)} is not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointMismatchError(f"{uri} is not a bimors learner checkpoint")
    if meta.get("version", 0) > VERSION:
        raise CheckpointMismatchError(f"{uri} has checkpoint version {meta['version']}; this bimors reads up to {VERSION}")
    return meta


def check_backbone(uri: str, saved: dict[str, Any], backbone: FrozenCLIP) -> None:
    current = backbone.identity
    keys = ("embed_dim", "text_width", "vision_width", "fingerprint", "quick_gelu")
    diffs = [k for k in keys if saved.get(k) != current.get(k)]
    if diffs == ["quick_gelu"]:
        raise CheckpointMismatchError(
            f"checkpoint {uri} was trained on {saved.get('name')!r} (pretrained {saved.get('pretrained')!r}) built "
            f"{'with' if saved.get('quick_gelu') else 'without'} QuickGELU, and the loaded backbone is built "
            f"{'with' if current.get('quick_gelu') else 'without'} it: same weights, other activations, other "
            "features. Checkpoints trained before bimors built OpenAI's weights with QuickGELU need retraining."
        )
    if diffs:
        detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs loaded {current.get(k)!r}" for k in diffs)
        raise CheckpointMismatchError(
            f"checkpoint {uri} was trained on backbone {saved.get('name')!r} (pretrained {saved.get('pretrained')!r}) "
            f"but the loaded backbone is {current.get('name')!r} (pretrained {current.get('pretrained')!r}) "
            f"and differs in {detail}. Load it with the model.backbone settings it was trained with."
        )


def load_learner(
    uri: str,
    backbone: FrozenCLIP,
    expected_classnames: Sequence[str] | None = None,
    storage_cfg: StorageConfig | None = None,
) -> LearnerCheckpoint:
    """Rebuild a learner from a checkpoint, refusing a different backbone or class list."""
    meta = read_meta(uri, storage_cfg)
    check_backbone(uri, meta["backbone"], backbone)
    classnames = list(meta["classnames"])
    if expected_classnames is not None and list(expected_classnames) != classnames:
        missing = sorted(set(expected_classnames) - set(classnames))
        extra = sorted(set(classnames) - set(expected_classnames))
        why = f"missing {missing[:5]}, unexpected {extra[:5]}" if (missing or extra) else "same names in another order"
        raise CheckpointMismatchError(
            f"checkpoint {uri} was trained on {len(classnames)} classes that do not match the "
            f"{len(expected_classnames)} expected ({why})"
        )
    method = meta["method"]
    if method not in LEARNERS:
        raise CheckpointMismatchError(f"checkpoint {uri} uses unknown method {method!r}")
    learner = LEARNERS[method](LearnerConfig.model_validate(meta["learner"]), LearnerDims(**meta["dims"]))
    state = load_safetensors(storage.read_bytes(storage.join(uri, WEIGHTS), storage_cfg))
    try:
        learner.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointMismatchError(f"checkpoint {uri} weights do not fit a {method} learner: {err}") from None
    learner.to(backbone.device)
    return LearnerCheckpoint(learner, classnames, meta["backbone"], meta.get("config", {}), meta.get("extra", {}))

