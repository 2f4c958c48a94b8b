import json

import pytest
import torch
import torch.nn.functional as F

from bimors.config import LearnerConfig
from bimors.models.checkpoint import CheckpointMismatchError, load_learner, save_learner
from bimors.models.classifier import PromptClassifier, build_learner
from bimors.models.clip_backbone import FrozenCLIP
from bimors.models.learners import BiMoRS, LearnerDims
from bimors.models.prompts import context_init_vectors
from model_fixtures import random_images

CLASSES = ["baseballfield", "dense_residential", "forest", "river", "storage_tank"]
METHODS = ["zeroshot", "coop", "cocoop", "bimors"]


@pytest.fixture(scope="module")
def features(backbone, captioner, caption_encoder):
    images = random_images(6, size=64, seed=11)
    feats = backbone.encode_image(backbone.preprocess(images))
    captions = captioner.caption(images)
    return feats.embedding, feats.tokens, caption_encoder.encode(captions)


def make(backbone, method, classes=CLASSES, truncate=True, **overrides):
    learner = build_learner(LearnerConfig(method=method, **overrides), backbone, caption_dim=384)
    return PromptClassifier(backbone, learner, classes, truncate=truncate)


@pytest.mark.parametrize("method", METHODS)
def test_logits_shape_and_only_learner_params_train(backbone, features, method):
    clf = make(backbone, method)
    logits = clf(*features)
    assert logits.shape == (6, len(CLASSES)) and torch.isfinite(logits).all()
    trainable = {n for n, p in clf.named_parameters() if p.requires_grad}
    assert all(n.startswith("learner.") for n in trainable)
    assert (len(trainable) == 0) == (method == "zeroshot")
    clf.train()
    assert clf.learner.training and not clf.backbone.training and not clf.backbone.model.training


def test_zero_shot_equals_open_clip_zero_shot_classifier(backbone, features):
    clf = make(backbone, "zeroshot")
    texts = [f"a photo of a {c.replace('_', ' ')}." for c in CLASSES]
    text = backbone.model.encode_text(backbone.tokenize(texts), normalize=True)
    expected = backbone.logit_scale * features[0] @ text.t()
    torch.testing.assert_close(clf(*features), expected, atol=1e-5, rtol=1e-5)


def test_context_starts_from_a_photo_of_a(backbone):
    learner = build_learner(LearnerConfig(method="bimors"), backbone, 384)
    ids = backbone.tokenize(["a photo of a"])
    torch.testing.assert_close(learner.ctx.detach(), backbone.embed_tokens(ids)[0, 1:5])
    assert learner.ctx.shape == (4, backbone.ctx_dim)
    random_init = build_learner(LearnerConfig(method="coop", ctx_init=None, n_ctx=6), backbone, 384)
    assert random_init.ctx.shape == (6, backbone.ctx_dim)
    assert 0.01 < random_init.ctx.std().item() < 0.03


def test_ctx_init_and_n_ctx_must_agree(backbone):
    with pytest.raises(ValueError, match="n_ctx"):
        build_learner(LearnerConfig(method="coop", ctx_init="a satellite photo of a", n_ctx=4), backbone, 384)


def test_bimors_architecture_follows_the_design(backbone):
    learner = build_learner(LearnerConfig(method="bimors"), backbone, 384)
    w = backbone.vision_width
    assert [tuple(m.weight.shape) for m in learner.meta_net if hasattr(m, "weight")] == [
        (w // 16, w), (backbone.ctx_dim, w // 16)]
    assert tuple(learner.caption_proj.weight.shape) == (backbone.ctx_dim, 384)
    assert learner.attn.num_heads == 4 and learner.attn.batch_first
    frozen_caption = build_learner(LearnerConfig(method="bimors", train_caption_proj=False), backbone, 384)
    assert not frozen_caption.caption_proj.weight.requires_grad and frozen_caption.ctx.requires_grad


def test_bimors_forward_matches_a_hand_written_computation(backbone, features):
    learner = build_learner(LearnerConfig(method="bimors"), backbone, 384).eval()
    _, tokens, captions = features
    ctx = learner(None, tokens, captions)
    visual = learner.meta_net(tokens).mean(1)  # meta-net on every token, then the mean
    caption = learner.caption_proj(captions)
    kv = learner.norm_kv(torch.stack([visual, caption], 1))
    q = learner.norm_query(learner.ctx).unsqueeze(0).expand(len(tokens), -1, -1)
    attn, _ = learner.attn(q, kv, kv)
    torch.testing.assert_close(ctx, learner.ctx + attn)
    assert ctx.shape == (len(tokens), 4, backbone.ctx_dim)
    # the context depends on the caption: another caption gives another prompt
    assert not torch.allclose(learner(None, tokens, captions.flip(0)), ctx)


@pytest.mark.parametrize("method", METHODS)
def test_truncated_prompts_give_the_full_77_token_logits(backbone, features, method):
    torch.manual_seed(0)
    cut = make(backbone, method)
    full = PromptClassifier(backbone, cut.learner, CLASSES, truncate=False)
    assert full.prompts.length == 77 and cut.prompts.length < 20
    assert (cut(*features) - full(*features)).abs().max().item() <= 1e-5


def test_batched_prompts_equal_a_per_image_loop(backbone, features):
    clf = make(backbone, "bimors")
    image_emb, tokens, captions = features
    ctx = clf.learner(image_emb, tokens, captions)
    looped = []
    for i in range(len(image_emb)):
        prompts, eot = clf.prompts.build(ctx[i])
        text = backbone.encode_prompts(prompts, eot)
        looped.append(backbone.logit_scale * image_emb[i] @ text.t())
    torch.testing.assert_close(clf(*features), torch.stack(looped), atol=1e-5, rtol=1e-5)


def test_text_encoder_is_called_once_per_batch(backbone, features, monkeypatch):
    clf = make(backbone, "bimors")
    calls = []
    original = backbone.encode_prompts
    monkeypatch.setattr(backbone, "encode_prompts", lambda p, e, deep=(): calls.append(p.shape) or original(p, e, deep))
    clf(*features)
    assert calls == [(6 * len(CLASSES), clf.prompts.length, backbone.ctx_dim)]


def test_new_classes_by_swapping_prompts(backbone, features):
    clf = make(backbone, "cocoop")
    clf.set_classes(["beach", "desert"])
    assert clf(*features).shape == (6, 2)


def test_missing_features_are_reported(backbone, features):
    clf = make(backbone, "bimors")
    with pytest.raises(ValueError, match="visual tokens and caption"):
        clf(features[0])


def test_eval_cache_never_goes_stale(backbone, features):
    clf = make(backbone, "coop").eval()
    with torch.no_grad():
        before = clf(*features)
    with torch.no_grad():
        clf.learner.ctx.add_(torch.randn_like(clf.learner.ctx))
    loss = clf(*features).sum()  # a step with gradients drops the cache
    with torch.no_grad():
        after = clf(*features)
    assert not torch.allclose(before, after)
    assert loss.requires_grad


@pytest.mark.parametrize("method, factor", [("coop", 0.95), ("cocoop", 0.95), ("bimors", 0.5)])
def test_short_training_loop_drives_the_loss_down(backbone, features, method, factor):
    """A fixed batch of random images on a random tiny CLIP: BiMoRS, whose context reads every
    visual token and the caption, can fit it; shared-context CoOp and CoCoOp can only lower it."""
    torch.manual_seed(0)
    clf = make(backbone, method).train()
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    opt = torch.optim.AdamW(clf.trainable_parameters(), lr=0.02)
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(clf(*features), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < factor * losses[0], losses
    assert not any(p.grad is not None for p in backbone.parameters())


def test_checkpoint_round_trip(tmp_path, backbone, features):
    clf = make(backbone, "bimors")
    with torch.no_grad():
        clf.learner.ctx.add_(torch.randn_like(clf.learner.ctx))
    save_learner(str(tmp_path / "ckpt"), clf.learner, CLASSES, backbone.identity, {"seed": 3}, {"epoch": 2})
    meta = json.loads((tmp_path / "ckpt" / "learner.json").read_text())
    assert meta["classnames"] == CLASSES and meta["backbone"] == backbone.identity and meta["config"] == {"seed": 3}
    assert (tmp_path / "ckpt" / "learner.safetensors").read_bytes()[:1] != b"\x80"  # not a pickle
    loaded = load_learner(str(tmp_path / "ckpt"), backbone, CLASSES)
    assert loaded.extra == {"epoch": 2}
    restored = PromptClassifier(backbone, loaded.learner, loaded.classnames)
    torch.testing.assert_close(restored.eval()(*features), clf.eval()(*features))


def test_checkpoint_refuses_other_classes(tmp_path, backbone):
    clf = make(backbone, "coop")
    save_learner(str(tmp_path / "c"), clf.learner, CLASSES, backbone.identity, {})
    with pytest.raises(CheckpointMismatchError, match="missing.*beach"):
        load_learner(str(tmp_path / "c"), backbone, CLASSES[:-1] + ["beach"])
    with pytest.raises(CheckpointMismatchError, match="another order"):
        load_learner(str(tmp_path / "c"), backbone, list(reversed(CLASSES)))
    assert load_learner(str(tmp_path / "c"), backbone).classnames == CLASSES


def test_checkpoint_refuses_another_backbone(tmp_path, backbone, model_dir):
    clf = make(backbone, "coop")
    save_learner(str(tmp_path / "c"), clf.learner, CLASSES, backbone.identity, {})
    other = FrozenCLIP.load(backbone_config_with_seed(model_dir))
    with pytest.raises(CheckpointMismatchError, match="fingerprint"):
        load_learner(str(tmp_path / "c"), other)


def test_checkpoint_rejects_garbage(tmp_path, backbone):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "learner.json").write_text("{not json")
    with pytest.raises(CheckpointMismatchError, match="not valid JSON"):
        load_learner(str(tmp_path / "bad"), backbone)
    (tmp_path / "bad" / "learner.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointMismatchError, match="not a bimors"):
        load_learner(str(tmp_path / "bad"), backbone)


def test_learner_dims_survive_json():
    dims = LearnerDims(n_ctx=4, ctx_dim=8, embed_dim=8, vision_width=32, caption_dim=16)
    assert LearnerDims(**json.loads(json.dumps(dims.to_dict()))) == dims
    assert isinstance(BiMoRS(LearnerConfig(n_heads=4), dims), BiMoRS)


def backbone_config_with_seed(model_dir):
    """A second tiny CLIP with different random weights (same architecture)."""
    from bimors.config import BackboneConfig
    from bimors.models.clip_backbone import build_random_clip

    folder = model_dir / "clip-tiny-seed7"
    if not folder.exists():
        build_random_clip("bimors-tiny", folder, seed=7)
    return BackboneConfig(name=str(folder), pretrained=None)


def test_context_init_vectors_are_plain_tensors(backbone):
    vectors = context_init_vectors(backbone, "a photo of a")
    assert not vectors.requires_grad and vectors.shape == (4, backbone.ctx_dim)
