"""Tiny frozen models for tests: built from packaged configs on first use, saved to a temporary
folder, and loaded back through the same code real weights use. Session-scoped: built once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bimors.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_config(model_dir: Path) -> Config:
    """The quickstart config with its model folders redirected into the test's temporary folder."""
    return load_config(
        REPO / "configs" / "quickstart.yaml",
        [
            f"model.backbone.name={model_dir / 'clip-tiny'}",
            f"model.captioner.name={model_dir / 'blip2-tiny'}",
            f"storage.cache_dir={model_dir / 'cache'}",
        ],
    )


@pytest.fixture(scope="session")
def backbone(tiny_config: Config):
    from bimors.models.clip_backbone import FrozenCLIP

    return FrozenCLIP.load(tiny_config.model.backbone, tiny_config.storage)


@pytest.fixture(scope="session")
def captioner(tiny_config: Config):
    from bimors.models.captioner import Captioner

    return Captioner.load(tiny_config.model.captioner, tiny_config.storage)


@pytest.fixture(scope="session")
def caption_encoder(tiny_config: Config):
    from bimors.models.caption_encoder import CaptionEncoder

    return CaptionEncoder.load(tiny_config.model.caption_encoder, tiny_config.storage)


def random_images(n: int, size: int = 64, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


SCENE_CLASSES = ["beach", "desert", "forest", "river"]


@pytest.fixture(scope="session")
def learner_checkpoint(tiny_config: Config, backbone, caption_encoder, tmp_path_factory) -> Path:
    """An (untrained) BiMoRS learner on the tiny backbone, saved as a real checkpoint folder."""
    from bimors.models.checkpoint import save_learner
    from bimors.models.classifier import build_learner

    folder = tmp_path_factory.mktemp("checkpoint") / "bimors"
    learner = build_learner(tiny_config.model.learner, backbone, caption_encoder.dim)
    save_learner(str(folder), learner, SCENE_CLASSES, backbone.identity, tiny_config.model_dump(mode="json"))
    return folder


def raw_tile_report(cfg: Config, store, checkpoint: str, split, backbone):
    """A split's classification report from its tiles' pixels through Predictor.classify_images, the
    path of the nightly job and the endpoint, to set against the evaluation pipeline's report."""
    from bimors.data.tiles import read_tile
    from bimors.pipelines.inference import Predictor
    from bimors.pipelines.metrics import classification_report

    uri_of = dict(zip(*store.read_manifest().select(["tile_id", "uri"]).to_pydict().values()))
    images = [read_tile(uri_of[t], cfg.data.decode, cfg.storage, cfg.featurize.max_side) for t in split.rows.column("tile_id").to_pylist()]
    predictor = Predictor.from_checkpoint(cfg, checkpoint, classnames=split.classnames, backbone=backbone)
    return classification_report(split.rows.column("label").to_numpy(), predictor.classify_images(images).argmax(-1), split.classnames)
