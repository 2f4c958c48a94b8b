import json
import shutil

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from bimors.config import BackboneConfig
from bimors.models.clip_backbone import FrozenCLIP
from bimors.models.sources import ModelUnavailableError
from model_fixtures import random_images


def test_tiny_clip_is_saved_in_open_clip_layout_and_reloads_identically(backbone, tiny_config, model_dir):
    folder = model_dir / "clip-tiny"
    assert json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]["vision_cfg"]["width"] == 64
    assert (folder / "open_clip_model.safetensors").is_file()
    again = FrozenCLIP.load(tiny_config.model.backbone)
    assert again.identity == backbone.identity
    for (name, a), (_, b) in zip(backbone.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_loads_by_architecture_name_and_checkpoint_path(backbone, model_dir):
    by_path = FrozenCLIP.load(
        BackboneConfig(name="bimors-tiny", pretrained=str(model_dir / "clip-tiny" / "open_clip_model.safetensors"))
    )
    assert by_path.identity["fingerprint"] == backbone.identity["fingerprint"]


def test_random_init_is_seeded_so_every_worker_builds_the_same_weights(tmp_path, backbone):
    other = FrozenCLIP.load(BackboneConfig(name=str(tmp_path / "elsewhere"), pretrained=None, create_if_missing="bimors-tiny"))
    assert other.identity["fingerprint"] == backbone.identity["fingerprint"]


def test_missing_folder_without_create_is_a_clear_error(tmp_path):
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        FrozenCLIP.load(BackboneConfig(name=str(tmp_path / "nope"), pretrained=None))


def test_folder_without_weights_is_refused(tmp_path, model_dir):
    folder = tmp_path / "noweights"
    folder.mkdir()
    shutil.copy(model_dir / "clip-tiny" / "open_clip_config.json", folder)
    with pytest.raises(ModelUnavailableError, match="no weights"):
        FrozenCLIP.load(BackboneConfig(name=str(folder), pretrained=None))


def test_hub_weights_offline_error_names_model_and_remedy(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError) as err:
        FrozenCLIP.load(BackboneConfig(name="ViT-B-16", pretrained="openai"))
    message = str(err.value)
    assert "ViT-B-16" in message and "openai" in message
    assert "model.backbone" in message and "local" in message


def test_image_embedding_and_visual_tokens(backbone):
    pixels = backbone.preprocess(random_images(3, size=80))
    assert pixels.shape == (3, 3, backbone.image_size, backbone.image_size)
    feats = backbone.encode_image(pixels)
    n_patches = (backbone.image_size // 32) ** 2
    assert feats.tokens.shape == (3, 1 + n_patches, backbone.vision_width)
    assert feats.embedding.shape == (3, backbone.embed_dim)
    torch.testing.assert_close(feats.embedding.norm(dim=-1), torch.ones(3))
    # same as open_clip's own pooled embedding
    torch.testing.assert_close(feats.embedding, backbone.model.encode_image(pixels, normalize=True))
    # tokens are *before* the final LayerNorm: ln_post(CLS) @ proj reproduces the embedding
    visual = backbone.model.visual
    pooled = visual.ln_post(feats.tokens[:, 0]) @ visual.proj
    torch.testing.assert_close(F.normalize(pooled, dim=-1), feats.embedding)
    assert not torch.allclose(visual.ln_post(feats.tokens), feats.tokens)


def test_preprocess_accepts_any_size_and_aspect(backbone):
    images = [np.zeros((30, 90, 3), np.uint8), np.full((300, 120, 3), 255, np.uint8)]
    assert backbone.preprocess(images).shape == (2, 3, backbone.image_size, backbone.image_size)


def test_prompt_text_encoder_matches_open_clip_encode_text(backbone):
    texts = ["a photo of a forest.", "a photo of a dense residential area."]
    ids = backbone.tokenize(texts)
    feats = backbone.encode_prompts(backbone.embed_tokens(ids), backbone.eot_positions(ids))
    torch.testing.assert_close(feats, backbone.model.encode_text(ids, normalize=True))


def test_cutting_after_the_last_eot_is_exact(backbone):
    ids = backbone.tokenize(["a photo of a river.", "X X X X storage tank."])
    eot = backbone.eot_positions(ids)
    full = backbone.encode_prompts(backbone.embed_tokens(ids), eot)
    cut = backbone.encode_prompts(backbone.embed_tokens(ids)[:, : int(eot.max()) + 1], eot)
    assert (full - cut).abs().max() <= 1e-5


def test_backbone_stays_frozen(backbone):
    backbone.train()
    assert not backbone.training and not backbone.model.training
    assert not any(p.requires_grad for p in backbone.parameters())


def test_tokenizer_is_clip_bpe_from_open_clip(backbone):
    ids = backbone.tokenize(["a photo of a"])[0]
    reference = open_clip.get_tokenizer("ViT-B-16")(["a photo of a"])[0]
    assert torch.equal(ids.cpu(), reference)


def test_hf_hub_ids_fail_offline_with_the_model_named():
    with pytest.raises(ModelUnavailableError, match="hf-hub:chendelong/RemoteCLIP-ViT-B-32"):
        FrozenCLIP.load(BackboneConfig(name="hf-hub:chendelong/RemoteCLIP-ViT-B-32"))


@pytest.mark.slow
def test_loads_from_object_storage_folder_and_checkpoint(backbone, model_dir, s3_server, s3_storage):
    bucket = s3_server.create_bucket("models")
    folder = model_dir / "clip-tiny"
    for path in folder.iterdir():
        s3_server.put(bucket, f"clip-tiny/{path.name}", path.read_bytes())
    from_folder = FrozenCLIP.load(BackboneConfig(name=f"s3://{bucket}/clip-tiny", pretrained=None), s3_storage)
    assert from_folder.identity["fingerprint"] == backbone.identity["fingerprint"]
    from_file = FrozenCLIP.load(
        BackboneConfig(name="bimors-tiny", pretrained=f"s3://{bucket}/clip-tiny/open_clip_model.safetensors"), s3_storage
    )
    assert from_file.identity["fingerprint"] == backbone.identity["fingerprint"]
    with pytest.raises(Exception, match=f"s3://{bucket}/nothing-here"):
        FrozenCLIP.load(BackboneConfig(name=f"s3://{bucket}/nothing-here", pretrained=None), s3_storage)


# ------------------------------------------------------------------ QuickGELU (OpenAI's weights)

_QUICK_GELU_PROBE = r"""
import json, sys
import numpy as np, open_clip, torch
from bimors.config import BackboneConfig
from bimors.models.clip_backbone import FrozenCLIP

weights = sys.argv[1]
loaded = FrozenCLIP.load(BackboneConfig(name="ViT-B-16", pretrained="openai", precision="fp32"))
pixels = torch.from_numpy(np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype("float32"))
ids = open_clip.get_tokenizer("ViT-B-16")(["a photo of a forest.", "a photo of a river."])
out = {"identity_quick_gelu": loaded.identity.get("quick_gelu", False)}
with torch.no_grad():
    ours_img = loaded.model.encode_image(pixels)
    ours_txt = loaded.model.encode_text(ids)
    for label, arch in (("quickgelu", "ViT-B-16-quickgelu"), ("gelu", "ViT-B-16")):
        ref = open_clip.create_model(arch, pretrained=weights, weights_only=True).eval()
        out[label] = max((ours_img - ref.encode_image(pixels)).abs().max().item(),
                         (ours_txt - ref.encode_text(ids)).abs().max().item())
print(json.dumps(out))
"""


def test_an_openai_tag_builds_the_backbone_with_quick_gelu_offline(tmp_path):
    """``pretrained: openai`` through open_clip's real hub path, from a pre-filled Hugging Face cache
    (``HF_HUB_OFFLINE=1``; random ViT-B/16 weights stand in for OpenAI's): the loaded backbone equals
    open_clip's QuickGELU build of those weights and differs from its GELU build."""
    import os
    import subprocess
    import sys

    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16-quickgelu")
    snapshot = tmp_path / "hf" / "hub" / "models--timm--vit_base_patch16_clip_224.openai"
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs" / "main").write_text("0" * 40)
    files = snapshot / "snapshots" / ("0" * 40)
    files.mkdir(parents=True)
    weights = files / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    del model
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", _QUICK_GELU_PROBE, str(weights)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["identity_quick_gelu"] is True
    assert result["quickgelu"] < 1e-5, result
    assert result["gelu"] > 1e-3, result  # the activation matters on these weights: the check can fail


def _openai_format_file(model_dir, tmp_path):
    tiny = open_clip.create_model("bimors-tiny")
    tiny.load_state_dict(open_clip.factory.load_state_dict(str(model_dir / "clip-tiny" / "open_clip_model.safetensors")))
    state = dict(tiny.state_dict())
    state.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    path = tmp_path / "ViT-tiny-openai.pt"
    torch.save(state, path)
    return path


def test_an_openai_format_checkpoint_file_loads_with_quick_gelu(backbone, model_dir, tmp_path):
    path = _openai_format_file(model_dir, tmp_path)
    loaded = FrozenCLIP.load(BackboneConfig(name="bimors-tiny", pretrained=str(path)))
    assert loaded.identity["quick_gelu"] is True
    assert loaded.identity["fingerprint"] == backbone.identity["fingerprint"]  # same weights ...
    activations = {type(m).__name__ for m in loaded.model.modules() if "GELU" in type(m).__name__}
    assert activations == {"QuickGELU"}  # ... built with OpenAI's activation
    assert "quick_gelu" not in backbone.identity  # GELU builds keep the identity they always had
    image = backbone.preprocess(random_images(1, seed=3))
    assert not torch.allclose(loaded.encode_image(image).embedding, backbone.encode_image(image).embedding, atol=1e-4)


def test_a_torchscript_archive_is_refused_without_running_it(tmp_path):
    path = tmp_path / "ViT-B-16.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(ModelUnavailableError, match="TorchScript archive .* never runs code"):
        FrozenCLIP.load(BackboneConfig(name="bimors-tiny", pretrained=str(path)))


def test_a_learner_trained_on_the_gelu_build_is_refused_on_the_quick_gelu_build(backbone, model_dir, tmp_path):
    from bimors.config import LearnerConfig
    from bimors.models.checkpoint import CheckpointMismatchError, load_learner, save_learner
    from bimors.models.classifier import build_learner

    learner = build_learner(LearnerConfig(method="coop"), backbone, caption_dim=384)
    save_learner(str(tmp_path / "ckpt"), learner, ["a", "b"], backbone.identity, {})
    quick = FrozenCLIP.load(BackboneConfig(name="bimors-tiny", pretrained=str(_openai_format_file(model_dir, tmp_path))))
    with pytest.raises(CheckpointMismatchError, match="QuickGELU"):
        load_learner(str(tmp_path / "ckpt"), quick)


def test_a_model_whose_own_config_says_quick_gelu_keeps_its_identity(tmp_path):
    """Folders and hub models carry the activation in their config and always got it: nothing is
    forced, so the identity (and every learner checkpoint trained on it) stays as it was."""
    from bimors.models.clip_backbone import build_random_clip

    (tmp_path / "configs").mkdir()
    tiny = open_clip.get_model_config("bimors-tiny")
    (tmp_path / "configs" / "bimors-test-tiny-quickgelu.json").write_text(json.dumps(tiny | {"quick_gelu": True}))
    open_clip.add_model_config(tmp_path / "configs")
    build_random_clip("bimors-test-tiny-quickgelu", tmp_path / "clip")
    loaded = FrozenCLIP.load(BackboneConfig(name=str(tmp_path / "clip"), pretrained=None))
    assert {type(m).__name__ for m in loaded.model.modules() if "GELU" in type(m).__name__} == {"QuickGELU"}
    assert "quick_gelu" not in loaded.identity
