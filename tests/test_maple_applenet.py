"""MaPLe and APPLeNet: the mechanics their papers define, and logits equal to a computation written
the way the reference implementations write it (full 77-token prompts, their layouts and loops),
on the same weights."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F

from bimors.config import LearnerConfig
from bimors.models.applenet import APPLeNet
from bimors.models.classifier import PromptClassifier, build_learner
from bimors.models.clip_backbone import FrozenCLIP, build_random_clip
from bimors.models.learners import BiMoRS, LearnerDims
from bimors.models.maple import MaPLe, reference_state_dict
from model_fixtures import random_images

CLASSES = ["baseballfield", "dense_residential", "forest", "river", "storage_tank"]
VIT_B16 = dict(ctx_dim=512, embed_dim=512, vision_width=768, caption_dim=768, vision_layers=12, text_layers=12)


def n_params(learner) -> int:
    return sum(p.numel() for p in learner.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def pixels(backbone):
    return backbone.preprocess(random_images(4, size=64, seed=5))


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A tiny CLIP whose text, vision and embedding widths all differ (64 / 96 / 48) and whose towers
    have different depths (2 text, 3 vision blocks): a swapped width or depth cannot go unnoticed."""
    folder = tmp_path_factory.mktemp("wide")
    cfg = {"embed_dim": 48, "vision_cfg": {"image_size": 64, "layers": 3, "width": 96, "head_width": 32, "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    (folder / "configs").mkdir()
    (folder / "configs" / "bimors-test-wide.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder / "configs")
    build_random_clip("bimors-test-wide", folder / "clip", seed=3)
    from bimors.config import BackboneConfig

    return FrozenCLIP.load(BackboneConfig(name=str(folder / "clip"), pretrained=None))


def make(backbone, method, classes=CLASSES, **overrides):
    learner = build_learner(LearnerConfig(method=method, **overrides), backbone, caption_dim=384)
    return PromptClassifier(backbone, learner, classes)


# ------------------------------------------------------------------ parameter counts (README)


def test_learnable_parameters_at_vit_b16_match_the_papers():
    maple = MaPLe(LearnerConfig(method="maple", n_ctx=2, prompt_depth=9), LearnerDims(n_ctx=2, **VIT_B16))
    applenet = APPLeNet(LearnerConfig(method="applenet", n_ctx=4), LearnerDims(n_ctx=4, **VIT_B16))
    bimors = BiMoRS(LearnerConfig(method="bimors", n_ctx=4, train_caption_proj=False), LearnerDims(n_ctx=4, **VIT_B16))
    bimors_all = BiMoRS(LearnerConfig(method="bimors", n_ctx=4, train_caption_proj=True), LearnerDims(n_ctx=4, **VIT_B16))
    assert n_params(maple) == 2 * 512 + 9 * (512 * 768 + 768) + 8 * 2 * 512 == 3_555_072  # ~3.55 M
    assert n_params(applenet) == 5_842_464  # ~5.8 M: 12 x Linear(768, 512) are 4.72 M of it
    assert n_params(bimors) == 1_116_720  # ~1.1 M with the caption projection frozen, as the reference has it
    assert n_params(bimors_all) == n_params(bimors) + 768 * 512 + 512  # configs/paper.yaml trains it too


# ------------------------------------------------------------------ MaPLe


def test_maple_trains_its_prompts_and_couplings_only(backbone):
    clf = make(backbone, "maple", n_ctx=2, prompt_depth=2)
    names = {n.removeprefix("learner.") for n, p in clf.named_parameters() if p.requires_grad}
    assert names == {"ctx", "proj.weight", "proj.bias", "compound_prompts_text.0",
                     "compound_prompt_projections.0.weight", "compound_prompt_projections.0.bias"}
    assert set(reference_state_dict(clf.learner)) == {f"prompt_learner.{n}" for n in names}


def test_maple_context_is_the_first_two_tokens_of_a_photo_of_a_and_the_rest_stays_words(backbone):
    clf = make(backbone, "maple", n_ctx=2, prompt_depth=2)
    init = backbone.embed_tokens(backbone.tokenize(["a photo of a"]))[0]
    torch.testing.assert_close(clf.learner.ctx.detach(), init[1:3])
    of_a = backbone.embed_tokens(backbone.tokenize(["of a forest."]))[0, 1:3]
    torch.testing.assert_close(clf.prompts.suffix[CLASSES.index("forest"), :2], of_a)
    with pytest.raises(ValueError, match="at least"):
        make(backbone, "maple", n_ctx=5, ctx_init="a photo")


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_maple_shapes_follow_any_backbone_width_and_depth(wide, depth):
    pixels = wide.preprocess(random_images(3, size=40, seed=1))
    if depth > 2:  # deeper than the 2-block text tower
        with pytest.raises(ValueError, match="prompt_depth"):
            make(wide, "maple", n_ctx=2, prompt_depth=depth)
        return
    clf = make(wide, "maple", n_ctx=2, prompt_depth=depth)
    prompts = clf.learner()
    assert [tuple(v.shape) for v in prompts.vision] == [(2, 96)] * depth
    assert [tuple(t.shape) for t in prompts.text_deep] == [(2, 64)] * (depth - 1)
    logits = clf(pixels=pixels)
    assert logits.shape == (3, len(CLASSES)) and torch.isfinite(logits).all()


def test_maple_needs_pixels(backbone, pixels):
    clf = make(backbone, "maple", n_ctx=2, prompt_depth=2)
    with pytest.raises(ValueError, match="needs pixels"):
        clf(image_emb=backbone.encode_image(pixels).embedding)


def _reference_maple_logits(backbone: FrozenCLIP, learner: MaPLe, pixels: torch.Tensor) -> torch.Tensor:
    """MaPLe as the reference computes it: whole 77-token prompts in LND layout through the text
    blocks, the first-layer visual prompts ``proj(ctx)`` appended before ``ln_pre``, deep prompts
    swapped in while a counter is below their number, the class token pooled."""
    model, n = backbone.model, learner.dims.n_ctx
    deep_text = list(learner.compound_prompts_text)
    deep_vision = [f(p) for f, p in zip(learner.compound_prompt_projections, deep_text)]
    ids = backbone.tokenize([f"a photo of a {c.replace('_', ' ')}." for c in CLASSES])
    emb = model.token_embedding(ids)
    x = torch.cat([emb[:, :1], learner.ctx.expand(len(CLASSES), -1, -1), emb[:, 1 + n:]], dim=1) + model.positional_embedding
    x, counter = x.permute(1, 0, 2), 0
    for i, block in enumerate(model.transformer.resblocks):
        if i > 0 and counter < len(deep_text):
            x = torch.cat([x[:1], deep_text[counter].unsqueeze(1).expand(-1, x.shape[1], -1), x[1 + n:]], dim=0)
            counter += 1
        x = block(x.permute(1, 0, 2), attn_mask=model.attn_mask).permute(1, 0, 2)
    x = model.ln_final(x.permute(1, 0, 2))
    text = x[torch.arange(len(CLASSES)), ids.argmax(-1)] @ model.text_projection

    v = model.visual
    y = v.conv1(pixels).flatten(2).permute(0, 2, 1)
    y = torch.cat([v.class_embedding + torch.zeros(y.shape[0], 1, y.shape[-1]), y], dim=1) + v.positional_embedding
    y = v.ln_pre(torch.cat([y, learner.proj(learner.ctx).expand(y.shape[0], -1, -1)], dim=1)).permute(1, 0, 2)
    counter = 0
    for i, block in enumerate(v.transformer.resblocks):
        if i > 0 and counter < len(deep_vision):
            y = torch.cat([y[:-n], deep_vision[counter].unsqueeze(1).expand(-1, y.shape[1], -1)], dim=0)
            counter += 1
        y = block(y.permute(1, 0, 2)).permute(1, 0, 2)
    image = v.ln_post(y.permute(1, 0, 2)[:, 0]) @ v.proj
    image, text = image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)
    return model.logit_scale.exp() * image @ text.t()


def test_maple_logits_equal_the_reference_computation(backbone, pixels):
    torch.manual_seed(0)
    clf = make(backbone, "maple", n_ctx=2, prompt_depth=2).eval()
    with torch.no_grad():
        for p in clf.learner.parameters():  # away from the init, so every tensor counts
            p.add_(torch.randn_like(p) * 0.05)
        torch.testing.assert_close(clf(pixels=pixels), _reference_maple_logits(backbone, clf.learner, pixels), atol=1e-5, rtol=1e-5)
        # the deep prompts are where the reference puts them: each one moves the logits
        before = clf(pixels=pixels)
        clf.learner.compound_prompts_text[0].add_(1.0)
        assert not torch.allclose(clf(pixels=pixels), before, atol=1e-4)


def test_maple_gradients_reach_every_prompt_and_no_frozen_weight(backbone, pixels):
    clf = make(backbone, "maple", n_ctx=2, prompt_depth=2).train()
    _, loss = clf.training_loss(torch.tensor([0, 1, 2, 3]), pixels=pixels)
    loss.backward()
    for name, p in clf.learner.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in backbone.parameters())


# ------------------------------------------------------------------ APPLeNet


def applenet_features(backbone, pixels):
    feats = backbone.encode_image(pixels, layer_means=True)
    return feats.embedding, feats.layer_means


def test_layer_means_are_the_token_mean_of_every_block_output(backbone, pixels):
    outputs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outputs.append(o)) for b in backbone.model.visual.transformer.resblocks]
    try:
        feats = backbone.encode_image(pixels, layer_means=True)
    finally:
        for h in hooks:
            h.remove()
    assert feats.layer_means.shape == (4, backbone.vision_layers, backbone.vision_width)
    expected = torch.stack([o.float().mean(dim=1) for o in outputs], dim=1)  # open_clip blocks are batch-first
    torch.testing.assert_close(feats.layer_means, expected)
    assert backbone.encode_image(pixels).layer_means is None  # only computed when asked for


def test_applenet_trains_its_learner_only_and_maps_onto_the_reference(backbone):
    clf = make(backbone, "applenet")
    names = {n.removeprefix("learner.") for n, p in clf.named_parameters() if p.requires_grad}
    layers = backbone.vision_layers
    assert names == {"ctx", "injection.attention.0.weight", "injection.attention.2.weight",
                     "injection.linearlayer1.0.weight", "injection.linearlayer1.0.bias",
                     "injection.linearlayer2.0.weight", "injection.linearlayer2.0.bias",
                     "meta_net.linear1.weight", "meta_net.linear1.bias", "meta_net.linear2.weight", "meta_net.linear2.bias",
                     *(f"multi.linear.{i}.{w}" for i in range(layers) for w in ("weight", "bias"))}
    assert clf.learner.uses == {"image_emb", "layer_means"}


def test_applenet_shapes_follow_any_backbone_width(wide):
    pixels = wide.preprocess(random_images(3, size=40, seed=2))
    clf = make(wide, "applenet")
    assert len(clf.learner.multi.linear) == 3 and tuple(clf.learner.multi.linear[0].weight.shape) == (48, 96)
    emb, means = applenet_features(wide, pixels)
    ctx = clf.learner(emb, None, None, means)
    assert ctx.shape == (3, 4, 64)
    assert clf(emb, layer_means=means).shape == (3, len(CLASSES))


def _reference_applenet(backbone: FrozenCLIP, learner: APPLeNet, emb: torch.Tensor, means: torch.Tensor):
    """APPLeNet as the reference computes it: per-block linears over the token means stacked with the
    final embedding, ``gap`` over those 13 tokens, the gate applied twice, four identical meta-net
    shifts concatenated for the four context tokens, one text-encoder call per image over 77 tokens."""
    model, n = backbone.model, learner.dims.n_ctx
    multi = torch.stack([f(means[:, i]) for i, f in enumerate(learner.multi.linear)], 1)
    fcs = torch.cat((multi, emb.unsqueeze(1)), 1)
    vis_f = F.adaptive_avg_pool2d(fcs, (1, fcs.shape[-1]))
    inj = learner.injection
    linear1 = inj.linearlayer1(torch.cat((inj.attention(vis_f) * vis_f, vis_f), 2))
    bias = inj.linearlayer2(torch.cat((inj.attention(linear1) * vis_f, vis_f), 2))
    alpha = torch.cat([learner.meta_net(bias) for _ in range(n)], 1)
    ctx_shifted = learner.ctx.unsqueeze(0) + alpha
    ids = backbone.tokenize([f"{' '.join(['X'] * n)} {c.replace('_', ' ')}." for c in CLASSES])
    token = model.token_embedding(ids)
    logits = []
    for ctx_i, emb_i in zip(ctx_shifted, emb):
        x = torch.cat([token[:, :1], ctx_i.expand(len(CLASSES), -1, -1), token[:, 1 + n:]], 1) + model.positional_embedding
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
        text = x[torch.arange(len(CLASSES)), ids.argmax(-1)] @ model.text_projection
        logits.append(model.logit_scale.exp() * emb_i @ (text / text.norm(dim=-1, keepdim=True)).t())
    return torch.stack(logits), ctx_shifted


def _reference_apple_loss(logits, ctx_shifted, labels, t=1.0):
    transprompts = ctx_shifted.permute(0, 2, 1)
    pmul = torch.matmul(ctx_shifted / t, transprompts / t)
    mask = torch.eye(4).repeat(4, 1, 1)  # the reference's hard-coded n_ctx 4, batch 4
    crp = torch.linalg.det(pmul / t - mask / t).mean()
    return F.cross_entropy(logits, labels) + 0.05 * torch.log10(-crp)


def test_applenet_logits_and_loss_equal_the_reference_computation(backbone, pixels):
    torch.manual_seed(0)
    clf = make(backbone, "applenet").eval()
    emb, means = applenet_features(backbone, pixels)
    labels = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        for p in clf.learner.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        # a context whose redundancy determinant is negative, where the reference's log is defined
        clf.learner.ctx.zero_()
        clf.learner.ctx[:, :4] = torch.diag(torch.tensor([2.0, 2.0, 2.0, 0.1]))  # eigenvalues 4, 4, 4, 0.01: det(CC^T - I) < 0
        clf.learner.meta_net.linear2.weight.mul_(1e-3)
        clf.learner.meta_net.linear2.bias.mul_(1e-3)
        ref_logits, ctx_shifted = _reference_applenet(backbone, clf.learner, emb, means)
        logits, loss = clf.training_loss(labels, image_emb=emb, layer_means=means)
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
        reference = _reference_apple_loss(ref_logits, ctx_shifted, labels)
        assert torch.isfinite(reference)
        torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)


def test_applenet_penalty_is_defined_for_any_context_size_and_batch(backbone, pixels):
    for n_ctx, batch in ((3, 1), (5, 4), (16, 3)):
        clf = make(backbone, "applenet", n_ctx=n_ctx, ctx_init=None)
        emb, means = applenet_features(backbone, pixels[:batch])
        _, loss = clf.training_loss(torch.zeros(batch, dtype=torch.long), image_emb=emb, layer_means=means)
        assert torch.isfinite(loss), (n_ctx, batch)
        ctx = clf.learner(emb, None, None, means)
        gram = ctx @ ctx.transpose(1, 2) - torch.eye(n_ctx)
        expected = 0.05 * torch.log10(torch.linalg.det(gram).mean().abs())
        torch.testing.assert_close(clf.learner.regularization(type("P", (), {"context": ctx})()), expected)


def test_applenet_gradients_reach_every_tensor_and_no_frozen_weight(backbone, pixels):
    clf = make(backbone, "applenet").train()
    emb, means = applenet_features(backbone, pixels)
    _, loss = clf.training_loss(torch.tensor([0, 1, 2, 3]), image_emb=emb, layer_means=means)
    loss.backward()
    for name, p in clf.learner.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in backbone.parameters())


@pytest.mark.parametrize("method, factor", [("maple", 0.7), ("applenet", 0.85)])
def test_a_short_training_loop_drives_the_loss_down(backbone, pixels, method, factor):
    torch.manual_seed(0)
    clf = make(backbone, method, **({"n_ctx": 2, "prompt_depth": 2} if method == "maple" else {})).train()
    feats = {"pixels": pixels} if method == "maple" else dict(zip(("image_emb", "layer_means"), applenet_features(backbone, pixels)))
    labels = torch.tensor([0, 1, 2, 3])
    opt = torch.optim.AdamW(clf.trainable_parameters(), lr=0.01)
    losses = []
    for _ in range(25):
        _, loss = clf.training_loss(labels, **feats)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < factor * losses[0], losses
