"""Caption embeddings: a BERT tokenizer + encoder, masked mean of the last hidden states.

The mean runs over real tokens only; padding would otherwise pull short captions towards the
padding embedding and make a caption's embedding depend on what it was batched with.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer

from bimors.config import CaptionEncoderConfig, StorageConfig
from bimors.models.frozen import FrozenModule, resolve_dtype
from bimors.models.sources import load_pretrained


class CaptionEncoder(FrozenModule):
    def __init__(self, tokenizer, model: nn.Module, max_length: int, name: str):
        super().__init__()
        self.tokenizer = tokenizer
        self.model = model
        self.max_length = max_length
        self.name = name
        self.freeze()

    @classmethod
    def load(
        cls,
        cfg: CaptionEncoderConfig,
        storage_cfg: StorageConfig | None = None,
        device: torch.device | str = "cpu",
    ) -> "CaptionEncoder":
        key = "model.caption_encoder.name"
        tokenizer = load_pretrained(AutoTokenizer, cfg.name, "caption tokenizer", key, storage_cfg)
        model = load_pretrained(AutoModel, cfg.name, "caption encoder", key, storage_cfg)
        model = model.to(device=device, dtype=resolve_dtype(cfg.precision, device))
        return cls(tokenizer, model, cfg.max_length, cfg.name)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        """Captions -> [B, hidden] fp32 on the encoder's device. Runs in inference mode (faster than
        no_grad); the result is cloned out of it so that a learner can take it as an input."""
        if not captions:
            return torch.empty(0, self.dim, device=self.device)
        with torch.inference_mode():
            embeddings = self._encode(captions)
        return embeddings.clone()

    def _encode(self, captions: Sequence[str]) -> torch.Tensor:
        batch = self.tokenizer(
            [c if isinstance(c, str) else "" for c in captions],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.device)
        hidden = self.model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)

