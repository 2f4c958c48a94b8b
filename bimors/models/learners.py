"""Prompt learners: the only trainable part of the system.

Each learner maps a batch of frozen features to context vectors, either one shared context
``[n_ctx, D]`` (zero-shot CLIP, CoOp) or one per image ``[B, n_ctx, D]`` (CoCoOp, BiMoRS).
Learners never see class names, so a learner trained on base classes classifies new ones by
swapping the class prompts (base-to-new protocol).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from torch import nn

from bimors.config import LearnerConfig


@dataclass(frozen=True)
class LearnerDims:
    """Widths a learner is built for; stored in checkpoints so they can be rebuilt without guessing."""

    n_ctx: int
    ctx_dim: int  # text transformer width
    embed_dim: int  # joint image/text embedding width
    vision_width: int  # visual token width
    caption_dim: int  # caption embedding width

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _meta_net(in_dim: int, out_dim: int) -> nn.Sequential:
    hidden = max(in_dim // 16, 1)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


def _context(dims: LearnerDims, init: torch.Tensor | None) -> torch.Tensor:
    if init is None:
        return torch.randn(dims.n_ctx, dims.ctx_dim) * 0.02
    if tuple(init.shape) != (dims.n_ctx, dims.ctx_dim):
        raise ValueError(f"context init has shape {tuple(init.shape)}, expected {(dims.n_ctx, dims.ctx_dim)}")
    return init.detach().float().clone()


class PromptLearner(nn.Module):
    method: ClassVar[str]
    per_image: ClassVar[bool]
    #: which frozen features ``forward`` reads; pipelines compute and cache only these
    uses: ClassVar[frozenset[str]]

    def __init__(self, cfg: LearnerConfig, dims: LearnerDims):
        super().__init__()
        self.cfg = cfg
        self.dims = dims

    def forward(
        self,
        image_emb: torch.Tensor | None = None,
        visual_tokens: torch.Tensor | None = None,
        caption_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError


class ZeroShotCLIP(PromptLearner):
    """Hand-written prompt ("a photo of a <class>."): the context is a frozen buffer."""

    method = "zeroshot"
    per_image = False
    uses = frozenset({"image_emb"})

    def __init__(self, cfg: LearnerConfig, dims: LearnerDims, ctx_init: torch.Tensor | None = None):
        super().__init__(cfg, dims)
        self.register_buffer("ctx", _context(dims, ctx_init) if ctx_init is not None else torch.zeros(dims.n_ctx, dims.ctx_dim))

    def forward(self, image_emb=None, visual_tokens=None, caption_emb=None) -> torch.Tensor:
        return self.ctx


class CoOp(PromptLearner):
    """Learned context shared by all images (Zhou et al., CoOp)."""

    method = "coop"
    per_image = False
    uses = frozenset({"image_emb"})

    def __init__(self, cfg: LearnerConfig, dims: LearnerDims, ctx_init: torch.Tensor | None = None):
        super().__init__(cfg, dims)
        self.ctx = nn.Parameter(_context(dims, ctx_init))

    def forward(self, image_emb=None, visual_tokens=None, caption_emb=None) -> torch.Tensor:
        return self.ctx


class CoCoOp(PromptLearner):
    """Learned context shifted per image by a meta-net over the image embedding (Zhou et al., CoCoOp)."""

    method = "cocoop"
    per_image = True
    uses = frozenset({"image_emb"})

    def __init__(self, cfg: LearnerConfig, dims: LearnerDims, ctx_init: torch.Tensor | None = None):
        super().__init__(cfg, dims)
        self.ctx = nn.Parameter(_context(dims, ctx_init))
        self.meta_net = _meta_net(dims.embed_dim, dims.ctx_dim)

    def forward(self, image_emb=None, visual_tokens=None, caption_emb=None) -> torch.Tensor:
        if image_emb is None:
            raise ValueError("CoCoOp needs image embeddings")
        bias = self.meta_net(image_emb.float())  # [B, D]
        return self.ctx.unsqueeze(0) + bias.unsqueeze(1)


class BiMoRS(PromptLearner):
    """Bi-modal prompts: context vectors attend to a visual token and a caption token.

    The visual token is the meta-net applied to every visual token then averaged; the caption
    token is a projection of the caption embedding. Pre-norm multi-head cross-attention with a
    residual turns the shared context into an instance-specific one.
    """

    method = "bimors"
    per_image = True
    uses = frozenset({"image_emb", "visual_tokens", "caption_emb"})

    def __init__(self, cfg: LearnerConfig, dims: LearnerDims, ctx_init: torch.Tensor | None = None):
        super().__init__(cfg, dims)
        if dims.ctx_dim % cfg.n_heads:
            raise ValueError(f"n_heads ({cfg.n_heads}) must divide the text width ({dims.ctx_dim})")
        self.ctx = nn.Parameter(_context(dims, ctx_init))
        self.meta_net = _meta_net(dims.vision_width, dims.ctx_dim)
        self.caption_proj = nn.Linear(dims.caption_dim, dims.ctx_dim)
        self.caption_proj.requires_grad_(cfg.train_caption_proj)
        self.norm_query = nn.LayerNorm(dims.ctx_dim)
        self.norm_kv = nn.LayerNorm(dims.ctx_dim)
        self.attn = nn.MultiheadAttention(dims.ctx_dim, cfg.n_heads, batch_first=True)

    def forward(self, image_emb=None, visual_tokens=None, caption_emb=None) -> torch.Tensor:
        if visual_tokens is None or caption_emb is None:
            raise ValueError("BiMoRS needs visual tokens and caption embeddings")
        visual = self.meta_net(visual_tokens.float()).mean(dim=1, keepdim=True)  # [B, 1, D]
        caption = self.caption_proj(caption_emb.float()).unsqueeze(1)  # [B, 1, D]
        kv = self.norm_kv(torch.cat([visual, caption], dim=1))  # [B, 2, D]
        ctx = self.ctx.unsqueeze(0).expand(visual.shape[0], -1, -1)  # [B, n_ctx, D]
        attended, _ = self.attn(self.norm_query(ctx), kv, kv, need_weights=False)
        return ctx + attended


LEARNERS: dict[str, type[PromptLearner]] = {cls.method: cls for cls in (ZeroShotCLIP, CoOp, CoCoOp, BiMoRS)}
