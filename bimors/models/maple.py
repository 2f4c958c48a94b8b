"""MaPLe: multi-modal prompt learning (Khattak et al., CVPR 2023).

Learned text context after [SOS], deep text prompts that replace it inside the first J text blocks
(J = ``model.learner.prompt_depth``), and vision prompts made from each text prompt by its own
coupling Linear(text width -> vision width), appended to the visual tokens and replaced inside
the first J vision blocks. Because the prompts change the frozen image tower's forward pass, MaPLe
reads pixels (``uses = {"pixels"}``): it trains with ``train.features=online`` and predicts from
raw tiles; cached image features cannot serve it.

Parameters map one to one onto the reference implementation (muzairkhattak/multimodal-prompt-learning,
``trainers/maple.py``, ``MultiModalPromptLearner``): each of ours is ``prompt_learner.<same name>``
there (:func:`reference_state_dict`), so logits can be compared on the same weights::

    ctx                              [n_ctx, text width]     prompt_learner.ctx
    proj                             Linear(text -> vision)  prompt_learner.proj
    compound_prompts_text.{i}        [n_ctx, text width]     prompt_learner.compound_prompts_text.{i}
    compound_prompt_projections.{i}  Linear(text -> vision)  prompt_learner.compound_prompt_projections.{i}

with i = 0 .. J-2. Where they enter (the reference's ``clip/model.py``, ``ResidualAttentionBlock_MaPLe``
and ``VisionTransformer_MaPLe``): ``ctx`` fills the n_ctx slots after [SOS] of
"<ctx_init> <class>." (the words of ``ctx_init`` past n_ctx stay fixed), ``compound_prompts_text[i]``
replaces those slots before text block i+1; ``proj(ctx)`` is appended after the positional embedding
(before ``ln_pre``) and ``compound_prompt_projections[i](compound_prompts_text[i])`` replaces it
before vision block i+1. Blocks J.. run unchanged. The reference hard-codes the ViT-B/16 widths
(512 text, 768 vision); here they come from the backbone. Like the reference, the J-1 coupling
layers start as copies of one initialised Linear.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from bimors.config import LearnerConfig
from bimors.models.learners import LearnerDims, PromptLearner, Prompts, initial_context

REFERENCE_PREFIX = "prompt_learner."


class MaPLe(PromptLearner):
    method = "maple"
    per_image = False
    uses = frozenset({"pixels"})
    init_tail_fixed = True

    def __init__(self, cfg: LearnerConfig, dims: LearnerDims, ctx_init: torch.Tensor | None = None):
        super().__init__(cfg, dims)
        depth = cfg.prompt_depth
        deepest = min(dims.text_layers, dims.vision_layers)
        if deepest and depth > deepest:
            raise ValueError(f"model.learner.prompt_depth ({depth}) exceeds the backbone's {deepest} transformer blocks")
        self.ctx = nn.Parameter(initial_context(dims, ctx_init))
        self.proj = nn.Linear(dims.ctx_dim, dims.vision_width)
        self.compound_prompts_text = nn.ParameterList(
            [nn.Parameter(torch.randn(dims.n_ctx, dims.ctx_dim) * 0.02) for _ in range(depth - 1)]
        )
        coupling = nn.Linear(dims.ctx_dim, dims.vision_width)
        self.compound_prompt_projections = nn.ModuleList([copy.deepcopy(coupling) for _ in range(depth - 1)])

    def forward(self, image_emb=None, visual_tokens=None, caption_emb=None, layer_means=None) -> Prompts:
        deep_text = list(self.compound_prompts_text)
        vision = [self.proj(self.ctx), *(f(p) for f, p in zip(self.compound_prompt_projections, deep_text))]
        return Prompts(self.ctx, deep_text, vision)


def reference_state_dict(learner: PromptLearner) -> dict[str, torch.Tensor]:
    """The learner's weights under the reference implementation's keys (MaPLe and APPLeNet alike)."""
    return {REFERENCE_PREFIX + key: value for key, value in learner.state_dict().items()}
