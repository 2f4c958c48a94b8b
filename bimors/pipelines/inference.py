"""The one inference path: frozen features -> learner -> class probabilities.

Evaluation feeds it features from the store; the nightly job and the endpoint feed it raw tiles,
which :meth:`Predictor.image_features` (and :class:`CaptionModels`) turn into the same features first. Either way the logits come from
:meth:`Predictor.logits`, so a model scores the same tile the same way everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch

from bimors.config import Config
from bimors.models.checkpoint import load_learner
from bimors.models.classifier import PromptClassifier
from bimors.models.clip_backbone import FrozenCLIP
from bimors.pipelines.feature_store import column_to_numpy


#: frozen features a store can hold, in the order learners take them
STORED_FEATURES = ("image_emb", "visual_tokens", "caption_emb", "layer_means")


@dataclass
class Features:
    """What a learner reads, for a batch of tiles (any device): stored features, or preprocessed
    ``pixels`` for a learner that prompts the image tower (MaPLe)."""

    image_emb: torch.Tensor | None = None
    visual_tokens: torch.Tensor | None = None
    caption_emb: torch.Tensor | None = None
    layer_means: torch.Tensor | None = None
    pixels: torch.Tensor | None = None

    def as_dict(self) -> dict[str, torch.Tensor | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def _map(self, fn) -> "Features":
        return Features(**{k: None if v is None else fn(v) for k, v in self.as_dict().items()})

    def __len__(self) -> int:
        return next(len(v) for v in self.as_dict().values() if v is not None)

    def slice(self, start: int, stop: int) -> "Features":
        return self._map(lambda t: t[start:stop])

    def take(self, index: torch.Tensor) -> "Features":
        return self._map(lambda t: t[index])

    def to(self, device: torch.device | str) -> "Features":
        return self._map(lambda t: t.to(device))

    def replace(self, other: "Features") -> "Features":
        """These features with every field ``other`` has replaced by it."""
        given = other.as_dict()
        return Features(**{k: v if given[k] is None else given[k] for k, v in self.as_dict().items()})


def features_from_table(table: pa.Table, uses: frozenset[str]) -> Features:
    """Store rows -> Features (CPU); only the stored columns the learner ``uses`` are read."""
    def tensor(name: str) -> torch.Tensor | None:
        if name not in uses:
            return None
        if name not in table.column_names:
            raise ValueError(
                f"the feature store has no {name} column; featurize into a new store with a config whose "
                f"methods read it (model.learner.method or evaluate.methods)"
            )
        value = torch.from_numpy(np.array(column_to_numpy(table, name)))  # a writable copy
        return value if name == "visual_tokens" else value.float()

    return Features(**{name: tensor(name) for name in STORED_FEATURES})


def image_tower_features(backbone: FrozenCLIP, pixels: torch.Tensor, uses: frozenset[str], as_stored: bool) -> Features:
    """Preprocessed pixels -> what the learner reads of the image tower: the pixels themselves (a
    learner that prompts the tower) or the frozen features (``as_stored``: in the store's dtypes,
    so a tile scores the same from raw pixels as from the store)."""
    if "pixels" in uses:
        return Features(pixels=pixels)
    feats = backbone.encode_image(pixels, layer_means="layer_means" in uses)
    tokens, means = feats.tokens, feats.layer_means
    if as_stored:
        tokens, means = tokens.to(torch.float16), None if means is None else means.to(torch.float16).float()
    return Features(
        image_emb=feats.embedding.float(),
        visual_tokens=tokens if "visual_tokens" in uses else None,
        layer_means=means,
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
        return self.classifier(**features.to(self.classifier.backbone.device).as_dict())

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
        """Raw uint8 RGB tiles -> the Features the store would hold for them (in the store's dtypes,
        so both paths give the same logits), or the pixels for a learner that prompts the image tower."""
        backbone = self.classifier.backbone
        feats = image_tower_features(backbone, backbone.preprocess(images), self.classifier.learner.uses, as_stored=True)
        feats.caption_emb = caption_emb
        return feats

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

