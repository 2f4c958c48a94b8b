"""The one inference path: frozen features -> learner -> class probabilities.

Evaluation feeds it features from the store; the nightly job and the endpoint feed it raw tiles,
which :meth:`Predictor.image_features` (and :class:`CaptionModels`) turn into the same features first. Either way the logits come from
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


@dataclass
class Captioned:
    """Captions and their embeddings for a batch of tiles (what the captioner deployment returns)."""

    captions: list[str]
    embeddings: torch.Tensor


class CaptionModels:
    """BLIP-2 captioner + BERT caption encoder: raw tiles -> captions and caption embeddings.

    Separate from :class:`Predictor` so that an endpoint can scale captioning (the heavy part)
    apart from classification; featurize runs the same two models in its caption stage."""

    def __init__(self, cfg: Config, device: torch.device | str):
        from bimors.models.caption_encoder import CaptionEncoder
        from bimors.models.captioner import Captioner

        self.captioner = Captioner.load(cfg.model.captioner, cfg.storage, device)
        self.encoder = CaptionEncoder.load(cfg.model.caption_encoder, cfg.storage, device)

    def __call__(self, images: Sequence[np.ndarray]) -> Captioned:
        captions = self.captioner.caption(images)
        return Captioned(captions, self.encoder.encode(captions).float().cpu())


class Predictor:
    """A trained (or zero-shot) classifier plus, when raw tiles are to be classified, its caption models."""

    def __init__(self, classifier: PromptClassifier, caption_models: CaptionModels | None = None):
        self.classifier = classifier.eval()
        self.caption_models = caption_models

    @property
    def classnames(self) -> list[str]:
        return self.classifier.classnames

    @property
    def needs_captions(self) -> bool:
        return "caption_emb" in self.classifier.learner.uses

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
        ``classnames`` classifies over other classes than the checkpoint's (base-to-new);
        ``encoders`` also loads the caption models, for classifying raw tiles on their own."""
        backbone = backbone or FrozenCLIP.load(cfg.model.backbone, cfg.storage, device)
        loaded = load_learner(checkpoint, backbone, storage_cfg=cfg.storage)
        classifier = PromptClassifier(backbone, loaded.learner, classnames or loaded.classnames)
        predictor = cls(classifier)
        if encoders and predictor.needs_captions:
            predictor.caption_models = CaptionModels(cfg, device)
        return predictor

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

    def image_features(self, images: Sequence[np.ndarray], caption_emb: torch.Tensor | None = None) -> Features:
        """Raw uint8 RGB tiles -> the Features the store would hold for them (visual tokens kept in
        float16 exactly as featurize stores them, so both paths give the same logits)."""
        backbone = self.classifier.backbone
        feats = backbone.encode_image(backbone.preprocess(images))
        tokens = feats.tokens.to(torch.float16) if "visual_tokens" in self.classifier.learner.uses else None
        return Features(feats.embedding.float(), tokens, caption_emb)

    def classify_images(self, images: Sequence[np.ndarray], captioned: Captioned | None = None) -> np.ndarray:
        """[N, C] probabilities for raw tiles; ``captioned`` comes from a :class:`CaptionModels`
        (this predictor's own, or a separate deployment's) when the learner reads captions."""
        if len(images) == 0:
            return np.zeros((0, len(self.classnames)), np.float32)
        caption_emb = None
        if self.needs_captions:
            if captioned is None:
                raise ValueError("this learner reads caption embeddings; caption the tiles first")
            if len(captioned.captions) != len(images):
                raise ValueError(f"{len(captioned.captions)} captions for {len(images)} tiles")
            caption_emb = captioned.embeddings
        with torch.no_grad():
            return self.probabilities(self.image_features(images, caption_emb), batch_size=len(images))

    def predict_images(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[str]]:
        """Raw uint8 RGB tiles -> ([N, C] probabilities, captions); captions are empty strings for
        learners that do not read them."""
        if len(images) == 0:
            return np.zeros((0, len(self.classnames)), np.float32), []
        captioned = None
        if self.needs_captions:
            if self.caption_models is None:
                raise RuntimeError("this predictor was loaded without caption models (encoders=True classifies raw tiles)")
            captioned = self.caption_models(images)
        captions = captioned.captions if captioned is not None else [""] * len(images)
        return self.classify_images(images, captioned), captions


def _args(features: Features) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    return features.image_emb, features.visual_tokens, features.caption_emb
