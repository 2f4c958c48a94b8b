"""Fast tests of the pieces of the training loop (no Ray)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bimors.config import LearnerConfig, OptimConfig, load_config
from bimors.data.augment import crop_box, random_resized_crop_flip
from bimors.models.classifier import PromptClassifier, build_learner
from bimors.pipelines.metrics import classification_report, harmonic_mean
from bimors.pipelines.schedule import build_optimizer, learning_rate
from bimors.pipelines.train import TrainState, epoch_batches, restore_training_checkpoint, save_training_checkpoint


def test_paper_schedule_is_constant_warmup_then_cosine():
    cfg = OptimConfig()  # the paper's: lr 0.009, 10 epochs, 1 warm-up epoch at 1e-5
    rates = [learning_rate(cfg, e) for e in range(10)]
    assert rates[0] == 1e-5
    assert rates[1] == pytest.approx(0.5 * 0.009 * (1 + math.cos(math.pi / 10)))
    assert all(a > b for a, b in zip(rates[1:], rates[2:]))  # decays every epoch after warm-up
    assert rates[9] > 0
    assert learning_rate(cfg.model_copy(update={"scheduler": "constant"}), 5) == 0.009


def test_epoch_batches_are_a_function_of_seed_and_epoch():
    a = epoch_batches(37, 4, seed=1, epoch=3)
    assert [b.tolist() for b in a] == [b.tolist() for b in epoch_batches(37, 4, seed=1, epoch=3)]
    assert [b.tolist() for b in a] != [b.tolist() for b in epoch_batches(37, 4, seed=1, epoch=4)]
    assert len(a) == 9 and all(len(b) == 4 for b in a)  # 37 // 4 full batches, the rest dropped
    assert len(set(np.concatenate(a).tolist())) == 36
    assert [len(b) for b in epoch_batches(3, 4, seed=1, epoch=0)] == [3]  # fewer rows than a batch: keep them


def test_global_batch_must_split_over_workers():
    with pytest.raises(Exception, match="divisible"):
        load_config(None, ["optim.batch_size=4", "train.workers=3"])


def test_report_counts_and_confusion():
    report = classification_report(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 2, 0]), ["a", "b", "c"])
    assert (report.count, report.correct) == (6, 4)
    assert report.accuracy == pytest.approx(4 / 6)
    assert report.confusion.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    per_class = report.per_class()
    assert per_class["a"] == (0.5, 2) and per_class["c"] == (pytest.approx(2 / 3), 3)
    with pytest.raises(ValueError):
        classification_report(np.array([0, 3]), np.array([0, 0]), ["a", "b", "c"])
    assert harmonic_mean(80, 60) == pytest.approx(2 * 80 * 60 / 140)
    assert harmonic_mean(0, 0) == 0


def test_augmentation_is_reproducible_from_its_generator():
    image = np.random.default_rng(0).integers(0, 256, (96, 80, 3), dtype=np.uint8)
    a = random_resized_crop_flip(image, 32, torch.Generator().manual_seed(5))
    b = random_resized_crop_flip(image, 32, torch.Generator().manual_seed(5))
    c = random_resized_crop_flip(image, 32, torch.Generator().manual_seed(6))
    assert a.shape == (3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    for seed in range(50):
        top, left, h, w = crop_box(96, 80, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(seed))
        assert 0 <= top and 0 <= left and top + h <= 96 and left + w <= 80 and h > 0 and w > 0


@pytest.mark.parametrize("method", ["bimors", "maple", "applenet"])
def test_training_checkpoint_restores_learner_optimizer_and_progress(tmp_path, backbone, tiny_config, method):
    learner_cfg = LearnerConfig(method=method, **({"n_ctx": 2, "prompt_depth": 2} if method == "maple" else {}))
    learner = build_learner(learner_cfg, backbone, 384)
    classifier = PromptClassifier(backbone, learner, ["forest", "river"])
    optimizer = build_optimizer(tiny_config.optim, classifier.trainable_parameters())
    features = backbone.encode_image(torch.randn(2, 3, backbone.image_size, backbone.image_size), layer_means=True)
    features = {"image_emb": features.embedding, "visual_tokens": features.tokens, "caption_emb": torch.randn(2, 384),
                "layer_means": features.layer_means, "pixels": torch.randn(2, 3, backbone.image_size, backbone.image_size)}
    for _ in range(2):
        _, loss = classifier.training_loss(torch.tensor([0, 1]), **features)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    state = TrainState(epoch=2, history=[{"epoch": 0, "loss": 1.0}, {"epoch": 1, "loss": 0.5}])
    save_training_checkpoint(tmp_path, learner, optimizer, state, ["forest", "river"], backbone, tiny_config)

    fresh = build_learner(learner_cfg, backbone, 384)
    fresh_optimizer = build_optimizer(tiny_config.optim, [p for p in fresh.parameters() if p.requires_grad])
    restored = restore_training_checkpoint(tmp_path, fresh, fresh_optimizer, backbone)
    assert restored == state
    for a, b in zip(learner.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    momentum = [optimizer.state[p]["momentum_buffer"] for p in classifier.trainable_parameters()]
    restored_momentum = [fresh_optimizer.state[p]["momentum_buffer"] for p in fresh.parameters() if p.requires_grad]
    assert all(torch.equal(a, b) for a, b in zip(momentum, restored_momentum))
    assert not any(p.suffix in (".pt", ".pth", ".pkl") for p in tmp_path.iterdir())
