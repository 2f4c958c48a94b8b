"""Prompt learners: the only trainable part of the system.

Each learner maps a batch of frozen features to context vectors, either one shared context
``[n_ctx, D]`` (zero-shot CLIP, CoOp, MaPLe) or one per image ``[B, n_ctx, D]`` (CoCoOp, BiMoRS,
APPLeNet); MaPLe also returns deep prompts for both towers (:class:`Prompts`). Learners never see
class names, so a learner trained on base classes classifies new ones by swapping the class
prompts (base-to-new protocol). The registry of methods is :mod:`bimors.models.methods`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar, Sequence

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
    vision_layers: int = 0  # blocks of the image tower (APPLeNet reads one mean token per block)
    text_layers: int = 0  # blocks of the text tower (MaPLe's prompt depth may not exceed it)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def meta_net(in_dim: int, out_dim: int) -> nn.Sequential:
    hidden = max(in_dim // 16, 1)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


def initial_context(dims: LearnerDims, init: torch.Tensor | None) -> torch.Tensor:
    if init is None:
        return torch.randn(dims.n_ctx, dims.ctx_dim) * 0.02
    if tuple(init.shape) != (dims.n_ctx, dims.ctx_dim):
        raise ValueError(f"context init has shape {tuple(init.shape)}, expected {(dims.n_ctx, dims.ctx_dim)}")
    return init.detach().float().clone()


@dataclass
class Prompts:
    """What a learner gives the frozen towers: the context of the class prompts, and for deep
    prompting (MaPLe) the tokens that replace the context inside the text blocks and the vision
    prompts (``vision[0]`` appended to the visual tokens, ``vision[i]`` replacing them before block i)."""

    context: torch.Tensor  # [n_ctx, D] shared, or [B, n_ctx, D] per image
    text_deep: Sequence[torch.Tensor] = ()  # [n_ctx, D] for text blocks 1..J-1 (0-based)
    vision: Sequence[torch.Tensor] = ()  # [n_ctx, vision width] for vision blocks 0..J-1


class PromptLearner(nn.Module):
    method: ClassVar[str]
    per_image: ClassVar[bool]
    #: which frozen features ``forward`` reads; pipelines compute and cache only these
    #: (``pixels``: the learner changes the image tower's forward pass, so nothing can be cached)
    uses: ClassVar[frozenset[str]]
    #: ``ctx_init`` may be longer than ``n_ctx``: its first ``n_ctx`` tokens are learned, the rest stay
    #: fixed words of every class prompt (MaPLe's "a photo of a" with 2 learned tokens)
    init_tail_fixed: ClassVar[bool] = False

    def __init__(self, cfg: LearnerConfig, dims: LearnerDims):
        super().__init__()
        self.cfg = cfg
        self.dims = dims

    def forward(
        self,
        image_emb: torch.Tensor | None = None,
        visual_tokens: torch.Tensor | None = None,
        caption_emb: torch.Tensor | None = None,
        layer_means: torch.Tensor | None = None,
    ) -> torch.Tensor | Prompts:
        raise NotImplementedError

    def regularization(self, prompts: Prompts) -> torch.Tensor | None:
        """A term added to the cross-entropy while training (APPLeNet's); none by default."""
        return None


class ZeroShotCLIP(PromptLearner):
    """Hand-written prompt ("a photo of a <class>."): the context is a frozen buffer."""

    method = "zeroshot"
    per_image = False
    uses = frozenset({"image_emb"})

    def __init__(self, cfg: LearnerConfig, dims: LearnerDims, ctx_init: torch.Tensor | None = None):
        super().__init__(cfg, dims)
        self.register_buffer("ctx", initial_context(dims, ctx_init) if ctx_init is not None else torch.zeros(dims.n_ctx, dims.ctx_dim))

    def forward(self, image_emb=None, visual_tokens=None, caption_emb=None, layer_means=None) -> torch.Tensor:
        return self.ctx


class CoOp(PromptLearner):
    """Learned context shared by all images (Zhou et al., CoOp)."""

    method = "coop"
    per_image = False
    uses = frozenset({"image_emb"})

    def __init__(self, cfg: LearnerConfig, dims: LearnerDims, ctx_init: torch.Tensor | None = None):
        super().__init__(cfg, dims)
        self.ctx = nn.Parameter(initial_context(dims, ctx_init))

    def forward(self, image_emb=None, visual_tokens=None, caption_emb=None, layer_means=None) -> torch.Tensor:
        return self.ctx


class CoCoOp(PromptLearner):
    """Learned context shifted per image by a meta-net over the image embedding (Zhou et al., CoCoOp)."""

    method = "cocoop"
    per_image = True
    uses = frozenset({"image_emb"})

    def __init__(self, cfg: LearnerConfig, dims: LearnerDims, ctx_init: torch.Tensor | None = None):
        super().__init__(cfg, dims)
        self.ctx = nn.Parameter(initial_context(dims, ctx_init))
        self.meta_net = meta_net(dims.embed_dim, dims.ctx_dim)

    def forward(self, image_emb=None, visual_tokens=None, caption_emb=None, layer_means=None) -> torch.Tensor:
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
        self.ctx = nn.Parameter(initial_context(dims, ctx_init))
        self.meta_net = meta_net(dims.vision_width, dims.ctx_dim)
        self.caption_proj = nn.Linear(dims.caption_dim, dims.ctx_dim)
        self.caption_proj.requires_grad_(cfg.train_caption_proj)
        self.norm_query = nn.LayerNorm(dims.ctx_dim)
        self.norm_kv = nn.LayerNorm(dims.ctx_dim)
        self.attn = nn.MultiheadAttention(dims.ctx_dim, cfg.n_heads, batch_first=True)

    def forward(self, image_emb=None, visual_tokens=None, caption_emb=None, layer_means=None) -> torch.Tensor:
        if visual_tokens is None or caption_emb is None:
            raise ValueError("BiMoRS needs visual tokens and caption embeddings")
        visual = self.meta_net(visual_tokens.float()).mean(dim=1, keepdim=True)  # [B, 1, D]
        caption = self.caption_proj(caption_emb.float()).unsqueeze(1)  # [B, 1, D]
        kv = self.norm_kv(torch.cat([visual, caption], dim=1))  # [B, 2, D]
        ctx = self.ctx.unsqueeze(0).expand(visual.shape[0], -1, -1)  # [B, n_ctx, D]
        attended, _ = self.attn(self.norm_query(ctx), kv, kv, need_weights=False)
        return ctx + attended

