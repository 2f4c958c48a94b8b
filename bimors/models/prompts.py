"""Per-class prompt templates: ``[SOS] ctx_1..ctx_n <class name> . [EOT]`` as token embeddings.

The context slots are filled by a prompt learner at run time; the rest is fixed per class and kept
as buffers. Templates are cut after the longest EOT when the text tower is causal: tokens after
the EOT cannot change the EOT feature, so the logits stay the same and the text encoder does
a fraction of the work.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from bimors.models.clip_backbone import FrozenCLIP


def prompt_classname(name: str) -> str:
    return name.replace("_", " ").strip()


def context_token_count(backbone: FrozenCLIP, text: str) -> int:
    ids = backbone.tokenize([text])[0]
    return int(backbone.eot_positions(ids[None])[0]) - 1


def context_init_vectors(backbone: FrozenCLIP, text: str) -> torch.Tensor:
    """Token embeddings of ``text`` without SOS/EOT: the context a learner starts from."""
    ids = backbone.tokenize([text])
    n = int(backbone.eot_positions(ids)[0]) - 1
    return backbone.embed_tokens(ids)[0, 1 : 1 + n].cpu().clone()


class ClassPrompts(nn.Module):
    """Fixed parts of every class prompt, ready to receive shared or per-image context vectors."""

    def __init__(
        self, backbone: FrozenCLIP, classnames: Sequence[str], n_ctx: int, truncate: bool = True, lead: str | None = None
    ):
        """``lead``: the words before the class name, whose first ``n_ctx`` tokens are the context
        slots (MaPLe keeps the rest of its ``ctx_init`` as words); default: just the slots."""
        super().__init__()
        if not classnames:
            raise ValueError("at least one class name is needed")
        names = [prompt_classname(c) for c in classnames]
        lead = lead or " ".join(["X"] * n_ctx)
        ids = backbone.tokenize([lead + " " + name + "." for name in names])
        eot = backbone.eot_positions(ids)
        too_long = [n for n, pos in zip(names, eot.tolist()) if pos >= ids.shape[1] - 1]
        if too_long:
            raise ValueError(f"class names too long for the {ids.shape[1]}-token context: {too_long[:3]}")
        length = int(eot.max()) + 1 if truncate and backbone.is_causal else ids.shape[1]
        embeds = backbone.embed_tokens(ids)[:, :length]
        self.n_ctx = n_ctx
        self.n_cls = len(names)
        self.register_buffer("prefix", embeds[:, :1].clone(), persistent=False)
        self.register_buffer("suffix", embeds[:, 1 + n_ctx :].clone(), persistent=False)
        self.register_buffer("eot", eot.clone(), persistent=False)

    @property
    def length(self) -> int:
        return self.prefix.shape[1] + self.n_ctx + self.suffix.shape[1]

    def build(self, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Context [n_ctx, D] (shared) -> prompts [C, L, D]; context [B, n_ctx, D] (per image) ->
        prompts [B*C, L, D], image-major. Returns (prompts, EOT positions)."""
        n_cls = self.n_cls
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(n_cls, -1, -1)
            return torch.cat([self.prefix, ctx.to(self.prefix.dtype), self.suffix], dim=1), self.eot
        batch = ctx.shape[0]
        ctx = ctx.unsqueeze(1).expand(batch, n_cls, -1, -1).to(self.prefix.dtype)
        prefix = self.prefix.unsqueeze(0).expand(batch, -1, -1, -1)
        suffix = self.suffix.unsqueeze(0).expand(batch, -1, -1, -1)
        prompts = torch.cat([prefix, ctx, suffix], dim=2).reshape(batch * n_cls, self.length, -1)
        return prompts, self.eot.repeat(batch)
