"""APPLeNet: visual attention parameterized prompt learning (Singha et al., CVPRW 2023).

The mean token of every image-tower block (multi-scale content), each projected by its own Linear,
and the final image embedding go through an injection block (two sigmoid gates, shared, and two
Linears over [gated, pooled] concatenations); a meta-net turns its output into one shift added to
every context token, per image. Training adds the context-redundancy penalty to the
cross-entropy (:meth:`APPLeNet.regularization`). The per-block token means are frozen features:
featurize stores them (``layer_means``), so APPLeNet trains from the feature store like BiMoRS.

Parameters map one to one onto the reference implementation (mainaksingha01/APPLeNet,
``models/applenet.py``, ``PromptLearner``): each of ours is ``prompt_learner.<same name>`` there
(:func:`bimors.models.maple.reference_state_dict`)::

    ctx                       [n_ctx, text width]               prompt_learner.ctx
    multi.linear.{l}          Linear(vision width -> embed)      prompt_learner.multi.linear.{l}, one per block
    injection.attention.0|2   Linear(E -> E/16), (E/16 -> E),    prompt_learner.injection.attention.0|2
                              no bias, ReLU between, sigmoid
    injection.linearlayer1.0  Linear(2E -> E)                    prompt_learner.injection.linearlayer1.0
    injection.linearlayer2.0  Linear(2E -> text width)           prompt_learner.injection.linearlayer2.0
    meta_net.linear1|linear2  Linear(D -> E/16), (E/16 -> D)     prompt_learner.meta_net.linear1|linear2

E is the joint embedding width, D the text width (both 512 at ViT-B/16). The reference hard-codes 12
blocks and 768 -> 512 for ``multi`` and writes the meta-net's ends as the embedding width although it
reads the injection block's D-wide output and shifts D-wide context tokens; at ViT-B/16 all of these
equal the widths used here, which come from the backbone so any ViT works. Its ``AdaIN_trans.mu`` is the
token mean; its ``gap`` (AdaptiveAvgPool2d((1, 512))) is the mean over the L+1 injected tokens; its
four identical meta-net calls concatenated for n_ctx = 4 are one shift broadcast over n_ctx tokens.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from bimors.config import LearnerConfig
from bimors.models.learners import LearnerDims, PromptLearner, Prompts, initial_context


class MultiScale(nn.Module):
    """One Linear per image-tower block, over that block's mean token."""

    def __init__(self, layers: int, vision_width: int, embed_dim: int):
        super().__init__()
        self.linear = nn.ModuleList([nn.Linear(vision_width, embed_dim) for _ in range(layers)])

    def forward(self, layer_means: torch.Tensor) -> torch.Tensor:  # [B, L, Wv] -> [B, L, E]
        return torch.stack([f(layer_means[:, i]) for i, f in enumerate(self.linear)], dim=1)


class InjectionBlock(nn.Module):
    """Pool the injected tokens, gate twice with one shared sigmoid attention, project to the text width."""

    def __init__(self, embed_dim: int, ctx_dim: int):
        super().__init__()
        hidden = max(embed_dim // 16, 1)
        self.attention = nn.Sequential(
            nn.Linear(embed_dim, hidden, bias=False), nn.ReLU(inplace=True), nn.Linear(hidden, embed_dim, bias=False), nn.Sigmoid()
        )
        self.linearlayer1 = nn.Sequential(nn.Linear(2 * embed_dim, embed_dim))
        self.linearlayer2 = nn.Sequential(nn.Linear(2 * embed_dim, ctx_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, L+1, E] -> [B, 1, D]
        pooled = tokens.mean(dim=1, keepdim=True)
        hidden = self.linearlayer1(torch.cat([self.attention(pooled) * pooled, pooled], dim=-1))
        return self.linearlayer2(torch.cat([self.attention(hidden) * pooled, pooled], dim=-1))


class APPLeNet(PromptLearner):
    method = "applenet"
    per_image = True
    uses = frozenset({"image_emb", "layer_means"})

    def __init__(self, cfg: LearnerConfig, dims: LearnerDims, ctx_init: torch.Tensor | None = None):
        super().__init__(cfg, dims)
        if dims.vision_layers < 1:
            raise ValueError("APPLeNet needs the image tower's block count (LearnerDims.vision_layers)")
        embed, hidden = dims.embed_dim, max(dims.embed_dim // 16, 1)
        self.ctx = nn.Parameter(initial_context(dims, ctx_init))
        self.injection = InjectionBlock(embed, dims.ctx_dim)
        self.multi = MultiScale(dims.vision_layers, dims.vision_width, embed)
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(dims.ctx_dim, hidden)), ("relu", nn.ReLU(inplace=True)), ("linear2", nn.Linear(hidden, dims.ctx_dim)),
        ]))

    def forward(self, image_emb=None, visual_tokens=None, caption_emb=None, layer_means=None) -> torch.Tensor:
        if image_emb is None or layer_means is None:
            raise ValueError("APPLeNet needs image embeddings and per-block token means (layer_means)")
        tokens = torch.cat([self.multi(layer_means.float()), image_emb.float().unsqueeze(1)], dim=1)  # [B, L+1, E]
        shift = self.meta_net(self.injection(tokens))  # [B, 1, D]
        return self.ctx.unsqueeze(0) + shift  # [B, n_ctx, D]

    def regularization(self, prompts: Prompts) -> torch.Tensor:
        """The context-redundancy penalty: ``weight * log10(-mean_b det(C_b C_b^T / T^3 - I / T))``
        over each image's shifted context C_b [n_ctx, D] (the reference: lambda 0.05, T 1, written
        for n_ctx = 4 and batch 4). The reference's log is of ``-mean det``, defined only while that
        mean is negative (its shared per-image shift makes it so for even n_ctx); the magnitude is
        used here, identical where the reference is defined and finite where it would be NaN."""
        context = prompts.context.float()
        t = self.cfg.orthogonality_temperature
        n = context.shape[-2]
        gram = context @ context.transpose(-1, -2) / t**3
        eye = torch.eye(n, device=context.device, dtype=context.dtype) / t
        mean_det = torch.linalg.det(gram - eye).mean()
        return self.cfg.orthogonality_weight * torch.log10(mean_det.abs().clamp_min(torch.finfo(mean_det.dtype).tiny))
