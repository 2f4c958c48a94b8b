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
