"""The one inference path: frozen features -> learner -> class probabilities.

Evaluation feeds it features from the store; the nightly job and the endpoint feed it raw tiles,
which :class:`FrozenEncoders` turns into the same features first. Either way the logits come from
:meth:`Predictor.logits`, so a model scores the same tile the same way everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch

from bimors.config import Config
from bimors.models.checkpoint import load_learner
from bimors.models.classifier import PromptClassifier
from bimors.models.clip_backbone import FrozenCLIP
from bimors.pipelines.feature_store import column_to_numpy


@dataclass
class Features:
    """What a learner reads, for a batch of tiles (any device)."""

    image_emb: torch.Tensor
    visual_tokens: torch.Tensor | None = None
    caption_emb: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.image_emb)

    def slice(self, start: int, stop: int) -> "Features":
        cut = lambda t: None if t is None else t[start:stop]  # noqa: E731
        return Features(self.image_emb[start:stop], cut(self.visual_tokens), cut(self.caption_emb))

    def take(self, index: torch.Tensor) -> "Features":
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return Features(self.image_emb[index], pick(self.visual_tokens), pick(self.caption_emb))

    def to(self, device: torch.device | str) -> "Features":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Features(self.image_emb.to(device), move(self.visual_tokens), move(self.caption_emb))


def features_from_table(table: pa.Table, uses: frozenset[str]) -> Features:
    """Store rows -> Features (CPU); only the columns the learner ``uses`` are read."""
    tensor = lambda name: torch.from_numpy(np.array(column_to_numpy(table, name)))  # noqa: E731 (a writable copy)
    return Features(
        image_emb=tensor("image_emb").float(),
        visual_tokens=tensor("visual_tokens") if "visual_tokens" in uses else None,
        caption_emb=tensor("caption_emb").float() if "caption_emb" in uses else None,
    )


class FrozenEncoders:
    """Captioner, caption encoder and CLIP image tower: raw tiles -> Features (+ captions)."""

    def __init__(self, cfg: Config, backbone: FrozenCLIP, device: torch.device | str, captions: bool = True):
        from bimors.models.caption_encoder import CaptionEncoder
        from bimors.models.captioner import Captioner

        self.backbone = backbone
        self.captioner = Captioner.load(cfg.model.captioner, cfg.storage, device) if captions else None
        self.caption_encoder = CaptionEncoder.load(cfg.model.caption_encoder, cfg.storage, device) if captions else None

    def encode(self, images: Sequence[np.ndarray]) -> tuple[Features, list[str]]:
        feats = self.backbone.encode_image(self.backbone.preprocess(images))
        captions: list[str] = []
        caption_emb = None
        if self.captioner is not None and self.caption_encoder is not None:
            captions = self.captioner.caption(images)
            caption_emb = self.caption_encoder.encode(captions)
        return Features(feats.embedding, feats.tokens, caption_emb), captions


class Predictor:
    """A trained (or zero-shot) classifier plus, when raw tiles are to be classified, its encoders."""

    def __init__(self, classifier: PromptClassifier, encoders: FrozenEncoders | None = None):
        self.classifier = classifier.eval()
        self.encoders = encoders

    @property
    def classnames(self) -> list[str]:
        return self.classifier.classnames

    @classmethod
    def from_checkpoint(
        cls,
        cfg: Config,
        checkpoint: str,
        device: torch.device | str = "cpu",
        classnames: Sequence[str] | None = None,
        encoders: bool = False,
        backbone: FrozenCLIP | None = None,
    ) -> "Predictor":
        """Load a learner checkpoint (local path or URI) onto the configured frozen backbone.
        ``classnames`` classifies over other classes than the checkpoint's (base-to-new)."""
        backbone = backbone or FrozenCLIP.load(cfg.model.backbone, cfg.storage, device)
        loaded = load_learner(checkpoint, backbone, storage_cfg=cfg.storage)
        classifier = PromptClassifier(backbone, loaded.learner, classnames or loaded.classnames)
        needs_captions = "caption_emb" in loaded.learner.uses
        return cls(classifier, FrozenEncoders(cfg, backbone, device, needs_captions) if encoders else None)

    @torch.no_grad()
    def logits(self, features: Features) -> torch.Tensor:
        return self.classifier(*_args(features.to(self.classifier.backbone.device)))

    def probabilities(self, features: Features, batch_size: int = 256) -> np.ndarray:
        """[N, C] class probabilities, computed in batches."""
        out = [
            torch.softmax(self.logits(features.slice(i, i + batch_size)).float(), dim=-1).cpu().numpy()
            for i in range(0, len(features), batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, len(self.classnames)), np.float32)

    def predict_table(self, table: pa.Table, batch_size: int = 256) -> np.ndarray:
        return self.probabilities(features_from_table(table, self.classifier.learner.uses), batch_size)

    def predict_images(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[str]]:
        """Raw uint8 RGB tiles -> ([N, C] probabilities, captions)."""
        if self.encoders is None:
            raise RuntimeError("this predictor was loaded without encoders (encoders=True classifies raw tiles)")
        if len(images) == 0:
            return np.zeros((0, len(self.classnames)), np.float32), []
        features, captions = self.encoders.encode(images)
        return self.probabilities(features), captions


def _args(features: Features) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    return features.image_emb, features.visual_tokens, features.caption_emb
