"""The classifier every method shares: learner context -> class prompts -> frozen text encoder ->
scaled cosine similarity with the image embedding.

All image x class prompts of a batch go through the text encoder in one call. Shared-context
methods (zero-shot, CoOp, MaPLe) encode C prompts, not B x C, and reuse them across evaluation
batches. Methods that prompt the image tower (MaPLe) get their image embedding from pixels here,
with the learner's vision prompts; the others get it from the frozen features.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bimors.config import Config, ConfigError, LearnerConfig
from bimors.errors import BimorsError
from bimors.models.clip_backbone import FrozenCLIP, context_token_count_for
from bimors.models.learners import LearnerDims, PromptLearner, Prompts
from bimors.models.methods import LEARNERS
from bimors.models.prompts import ClassPrompts, context_init_vectors, context_token_count


def check_context(cfg: LearnerConfig, init_tokens: int | None) -> None:
    """``ctx_init`` (``init_tokens`` tokens long) must fill exactly ``n_ctx`` context slots (at least
    n_ctx for a method that keeps the rest as words, MaPLe), and zero-shot CLIP needs it; a
    :class:`ConfigError` otherwise."""
    if cfg.ctx_init and LEARNERS[cfg.method].init_tail_fixed:
        if init_tokens is not None and init_tokens < cfg.n_ctx:
            raise ConfigError(
                f"model.learner.ctx_init {cfg.ctx_init!r} is {init_tokens} tokens but model.learner.n_ctx is {cfg.n_ctx}; "
                f"{cfg.method} learns the first n_ctx tokens of ctx_init, so it needs at least that many"
            )
        return
    if cfg.ctx_init and init_tokens != cfg.n_ctx:
        raise ConfigError(
            f"model.learner.ctx_init {cfg.ctx_init!r} is {init_tokens} tokens but model.learner.n_ctx is {cfg.n_ctx}; "
            "make them agree (or set ctx_init to null for random init)"
        )
    if not cfg.ctx_init and cfg.method == "zeroshot":
        raise ConfigError("zero-shot CLIP needs model.learner.ctx_init (e.g. 'a photo of a')")


def check_learner_config(cfg: Config, methods: Sequence[str] | None = None) -> None:
    """The learner settings checked against the backbone's tokenizer, without loading any weights:
    called by the workflows before Ray work starts, so a mismatch costs seconds, not a featurize run."""
    learner = cfg.model.learner
    tokens = None
    if learner.ctx_init:
        try:
            tokens = context_token_count_for(cfg.model.backbone, cfg.storage, learner.ctx_init)
        except BimorsError:
            raise
        except Exception:  # noqa: BLE001 - e.g. a hub tokenizer offline: loading the backbone will say why
            return
    for method in methods or [learner.method]:
        check_context(learner.model_copy(update={"method": method}), tokens)


def learner_dims(cfg: LearnerConfig, backbone: FrozenCLIP, caption_dim: int) -> LearnerDims:
    n_ctx = cfg.n_ctx
    check_context(cfg, context_token_count(backbone, cfg.ctx_init) if cfg.ctx_init else None)
    return LearnerDims(
        n_ctx=n_ctx,
        ctx_dim=backbone.ctx_dim,
        embed_dim=backbone.embed_dim,
        vision_width=backbone.vision_width,
        caption_dim=caption_dim,
        vision_layers=backbone.vision_layers,
        text_layers=backbone.text_layers,
    )


def build_learner(cfg: LearnerConfig, backbone: FrozenCLIP, caption_dim: int) -> PromptLearner:
    """A fresh learner whose context starts from the token embeddings of (the first ``n_ctx``
    tokens of) ``ctx_init``."""
    dims = learner_dims(cfg, backbone, caption_dim)
    init = context_init_vectors(backbone, cfg.ctx_init)[: cfg.n_ctx] if cfg.ctx_init else None
    return LEARNERS[cfg.method](cfg, dims, init)


def prompt_lead(learner: PromptLearner) -> str | None:
    """The words before the class name in every prompt, when they are not just the context slots."""
    return learner.cfg.ctx_init if learner.init_tail_fixed and learner.cfg.ctx_init else None


class PromptClassifier(nn.Module):
    """Frozen CLIP + a prompt learner over a set of class names."""

    def __init__(
        self,
        backbone: FrozenCLIP,
        learner: PromptLearner,
        classnames: Sequence[str],
        truncate: bool = True,
    ):
        super().__init__()
        self.backbone = backbone
        self.learner = learner.to(backbone.device)
        self.truncate = truncate
        self._text_cache: torch.Tensor | None = None
        self.set_classes(classnames)

    def set_classes(self, classnames: Sequence[str]) -> None:
        """Classify over another set of classes (e.g. the new classes of base-to-new)."""
        self.classnames = list(classnames)
        self.prompts = ClassPrompts(self.backbone, self.classnames, self.learner.dims.n_ctx, self.truncate, prompt_lead(self.learner))
        self._text_cache = None

    def train(self, mode: bool = True) -> "PromptClassifier":
        self._text_cache = None
        return super().train(mode)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.learner.parameters() if p.requires_grad]

    def text_features(self, prompts: Prompts | torch.Tensor) -> torch.Tensor:
        """[C, E] for a shared context, [B, C, E] for per-image contexts."""
        prompts = prompts if isinstance(prompts, Prompts) else Prompts(prompts)
        ctx = prompts.context
        tokens, eot = self.prompts.build(ctx)
        feats = self.backbone.encode_prompts(tokens, eot, prompts.text_deep)
        if ctx.dim() == 3:
            feats = feats.view(ctx.shape[0], self.prompts.n_cls, -1)
        return feats

    def forward(
        self,
        image_emb: torch.Tensor | None = None,
        visual_tokens: torch.Tensor | None = None,
        caption_emb: torch.Tensor | None = None,
        layer_means: torch.Tensor | None = None,
        pixels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, C] from frozen features (see :class:`~bimors.models.clip_backbone.ImageFeatures`),
        or from preprocessed ``pixels`` for a learner that prompts the image tower."""
        return self.logits_and_prompts(image_emb=image_emb, visual_tokens=visual_tokens, caption_emb=caption_emb,
                                       layer_means=layer_means, pixels=pixels)[0]

    def training_loss(self, labels: torch.Tensor, **features: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, loss): cross-entropy plus the learner's own term (APPLeNet's penalty)."""
        logits, prompts = self.logits_and_prompts(**features)
        loss = F.cross_entropy(logits.float(), labels)
        extra = self.learner.regularization(prompts)
        return logits, loss if extra is None else loss + extra

    def logits_and_prompts(self, **features: torch.Tensor | None) -> tuple[torch.Tensor, Prompts]:
        """Logits and the learner's prompts from the features :meth:`forward` takes, by name."""
        device = self.backbone.device
        f = {k: None if v is None else v.to(device) for k, v in features.items() if k != "pixels"}
        image_emb, pixels = f.get("image_emb"), features.get("pixels")
        out = self.learner(image_emb, f.get("visual_tokens"), f.get("caption_emb"), f.get("layer_means"))
        prompts = out if isinstance(out, Prompts) else Prompts(out)
        if "pixels" in self.learner.uses:
            if pixels is None:
                raise ValueError(f"{self.learner.method} prompts the image tower and needs pixels, not cached features")
            image_emb = self.backbone.encode_image_prompted(pixels, prompts.vision)
        elif image_emb is None:
            raise ValueError("image embeddings are needed")
        image_emb = image_emb.float()
        scale = self.backbone.logit_scale
        if self.learner.per_image:
            text = self.text_features(prompts)
            return scale * torch.einsum("be,bce->bc", image_emb, text), prompts
        # Any forward with gradients (a training step) drops the cache, so it can never go stale.
        cacheable = not self.training and not torch.is_grad_enabled()
        if cacheable and self._text_cache is not None:
            text = self._text_cache
        else:
            text = self.text_features(prompts)
            self._text_cache = text if cacheable else None
        return scale * image_emb @ text.t(), prompts
