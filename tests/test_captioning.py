import pytest
import torch

from bimors.config import CaptionEncoderConfig, CaptionerConfig
from bimors.models.caption_encoder import CaptionEncoder
from bimors.models.captioner import Captioner, clean_caption
from bimors.models.sources import ModelUnavailableError
from model_fixtures import random_images


def test_tiny_blip2_is_saved_and_reloaded_by_path(captioner, tiny_config, model_dir):
    folder = model_dir / "blip2-tiny"
    assert (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))
    assert (folder / "processor_config.json").is_file() or (folder / "preprocessor_config.json").is_file()
    again = Captioner.load(tiny_config.model.captioner)
    for (name, a), (_, b) in zip(captioner.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_captions_are_batched_deterministic_and_fp32_on_cpu(captioner):
    assert captioner.dtype == torch.float32
    images = random_images(5, size=96, seed=3)
    batched = captioner.caption(images)
    assert len(batched) == 5 and all(isinstance(c, str) and c for c in batched)
    # one generate call for the batch gives what one call per image gives
    assert batched == [captioner.caption([im])[0] for im in images]
    assert captioner.caption(images) == batched


def test_paper_generation_settings_are_used(captioner, monkeypatch):
    seen = {}
    original = captioner.model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(captioner.model, "generate", spy)
    captioner.caption(random_images(2))
    assert seen["num_beams"] == 4 and seen["max_length"] == 16
    assert seen["pixel_values"].shape[-2:] == (224, 224)


def test_empty_batch(captioner):
    assert captioner.caption([]) == []


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("", "a satellite image"),
        ("   ", "a satellite image"),
        ("... ,", "a satellite image"),
        ("an aerial view of a river", "an aerial view of a river"),
        ("a a a forest forest", "a forest"),
        ("  many   spaces  ", "many spaces"),
    ],
)
def test_degenerate_captions_are_cleaned(raw, expected):
    assert clean_caption(raw, "a satellite image") == expected


def test_captioner_stays_frozen(captioner):
    captioner.train()
    assert not captioner.model.training
    assert not any(p.requires_grad for p in captioner.parameters())


def test_caption_encoder_is_the_packaged_minilm_bert(caption_encoder):
    assert caption_encoder.dim == 384
    assert caption_encoder.model.config.model_type == "bert"
    assert "[CLS]" in caption_encoder.tokenizer.get_vocab()


def test_caption_embedding_is_a_masked_mean(caption_encoder):
    short, long = "a river", "a dense residential area with many small houses and roads"
    alone = caption_encoder.encode([short])
    padded = caption_encoder.encode([short, long])
    # padding added by batching with a longer caption must not change the embedding
    torch.testing.assert_close(padded[0:1], alone, atol=1e-5, rtol=1e-5)
    batch = caption_encoder.tokenizer([short], return_tensors="pt")
    hidden = caption_encoder.model(**batch).last_hidden_state
    torch.testing.assert_close(alone, hidden.mean(dim=1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(padded[0], padded[1])


def test_caption_encoder_handles_empty_input(caption_encoder):
    assert caption_encoder.encode([]).shape == (0, 384)
    assert torch.isfinite(caption_encoder.encode([""])).all()


def test_hub_caption_encoder_offline_error_is_actionable():
    with pytest.raises(ModelUnavailableError) as err:
        CaptionEncoder.load(CaptionEncoderConfig(name="bert-base-uncased"))
    assert "bert-base-uncased" in str(err.value) and "model.caption_encoder.name" in str(err.value)


def test_hub_captioner_offline_error_is_actionable():
    with pytest.raises(ModelUnavailableError) as err:
        Captioner.load(CaptionerConfig(name="Salesforce/blip2-flan-t5-xl"))
    assert "Salesforce/blip2-flan-t5-xl" in str(err.value) and "model.captioner.name" in str(err.value)
