"""The two model deployments. Captioning (BLIP-2 + BERT) and classification (CLIP + the prompt
learner) scale apart: captioning is the heavy part and wants the GPUs. Both batch requests with
``@serve.batch``; batch sizes come from the config and are applied when a replica starts."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from ray import serve

from bimors.config import Config
from bimors.pinned_model import PinnedModel, load_pinned
from bimors.pipelines.stages import pick_device


@serve.deployment(name="Captioner")
class CaptionerDeployment:
    """uint8 RGB tile -> (caption, caption embedding)."""

    def __init__(self, cfg: Config):
        from bimors.pipelines.inference import CaptionModels

        self.models = CaptionModels(cfg, pick_device(cfg.serve.captioner.num_gpus))
        self.caption.set_max_batch_size(cfg.serve.captioner.max_batch_size)
        self.caption.set_batch_wait_timeout_s(cfg.serve.captioner.batch_wait_timeout_s)

    @serve.batch
    async def caption(self, images: list[np.ndarray]) -> list[tuple[str, np.ndarray]]:
        captioned = self.models(images)
        return list(zip(captioned.captions, captioned.embeddings.numpy()))


@serve.deployment(name="Classifier")
class ClassifierDeployment:
    """uint8 RGB tile (+ its caption embedding when the learner reads one) -> class probabilities."""

    def __init__(self, cfg: Config, model: PinnedModel):
        self.predictor = load_pinned(cfg, model, pick_device(cfg.serve.classifier.num_gpus), encoders=False)
        backbone = self.predictor.classifier.backbone.identity
        self._info = {
            "model": model.requested,
            "mlflow_version": model.mlflow_version,
            "pinned": model.record(),  # what every replica loaded: an alias moved later changes nothing here
            "method": self.predictor.classifier.learner.method,
            "classes": list(self.predictor.classnames),
            "backbone": {k: backbone.get(k) for k in ("name", "pretrained", "fingerprint") if k in backbone},
            "needs_captions": self.predictor.needs_captions,
        }
        self.classify.set_max_batch_size(cfg.serve.classifier.max_batch_size)
        self.classify.set_batch_wait_timeout_s(cfg.serve.classifier.batch_wait_timeout_s)

    def info(self) -> dict[str, Any]:
        return self._info

    @serve.batch
    async def classify(self, items: list[tuple[np.ndarray, np.ndarray | None]]) -> list[np.ndarray]:
        from bimors.pipelines.inference import Captioned

        images = [image for image, _ in items]
        captioned = None
        if self.predictor.needs_captions:
            captioned = Captioned([""] * len(items), torch.from_numpy(np.stack([emb for _, emb in items])))
        return list(self.predictor.classify_images(images, captioned))
