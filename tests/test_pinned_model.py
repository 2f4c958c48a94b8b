"""One model identity per run: ``--model`` is pinned once (alias -> version, checkpoint -> digest),
every actor loads exactly that, and the outputs record it; moving an alias mid-run changes nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from bimors import tracking
from bimors.config import Config
from bimors.data.synthetic_scene import write_synthetic_scene
from bimors.pinned_model import ModelChangedError, checkpoint_digest, load_pinned, pin_model
from model_fixtures import SCENE_CLASSES

REPO = Path(__file__).resolve().parents[1]
OTHER_CLASSES = ["airport", "farmland", "harbor", "parking", "stadium"]  # what a later version knows


def save_checkpoint(folder: Path, backbone, cfg: Config, classnames: list[str]) -> Path:
    from bimors.models.checkpoint import save_learner
    from bimors.models.classifier import build_learner

    learner = build_learner(cfg.model.learner, backbone, caption_dim=384)
    save_learner(str(folder), learner, classnames, backbone.identity, cfg.model_dump(mode="json"))
    return folder


def test_a_checkpoint_is_pinned_by_its_content(tmp_path, tiny_config, learner_checkpoint):
    folder = tmp_path / "ckpt"
    shutil.copytree(learner_checkpoint, folder)
    pinned = pin_model(str(folder), tiny_config)
    assert (pinned.requested, pinned.uri, pinned.mlflow_version, pinned.mlflow_run_id) == (str(folder), str(folder), None, None)
    assert pinned.digest == checkpoint_digest(str(folder)) == checkpoint_digest(str(learner_checkpoint))
    assert load_pinned(tiny_config, pinned, encoders=False).classnames == SCENE_CLASSES
    # the folder is overwritten by another training run: actors refuse it rather than mix models
    (folder / "learner.json").write_text((folder / "learner.json").read_text().replace("beach", "BEACH"))
    with pytest.raises(ModelChangedError, match="changed after the run started"):
        load_pinned(tiny_config, pinned, encoders=False)


@pytest.fixture
def registry(mlflow_server, tiny_config, backbone, tmp_path):
    """A registered model whose alias points at version 1 (trained on SCENE_CLASSES); ``move()``
    registers version 2 (OTHER_CLASSES) and moves the alias to it."""
    unique = uuid.uuid4().hex[:8]
    cfg = tiny_config.model_copy(update={"tracking": tiny_config.tracking.model_copy(update={
        "uri": mlflow_server.uri, "experiment": f"pin-{unique}", "registered_model": f"pinned-{unique}", "alias": "champion"})})
    first = save_checkpoint(tmp_path / "v1", backbone, cfg, SCENE_CLASSES)
    second = save_checkpoint(tmp_path / "v2", backbone, cfg, OTHER_CLASSES)
    run_id = tracking.start_run(cfg, "train-1")
    assert tracking.register_model(cfg, run_id, str(first)) == 1
    tracking.end_run(mlflow_server.uri, run_id)

    def move() -> None:
        later = tracking.start_run(cfg, "train-2")
        assert tracking.register_model(cfg, later, str(second)) == 2
        tracking.end_run(mlflow_server.uri, later)

    return cfg, run_id, move


@pytest.mark.slow
def test_an_alias_is_pinned_to_its_version_and_moving_it_changes_nothing(registry):
    cfg, run_id, move = registry
    name = cfg.tracking.registered_model
    pinned = pin_model(f"models:/{name}@champion", cfg)
    assert (pinned.uri, pinned.mlflow_version, pinned.mlflow_run_id) == (f"models:/{name}/1", "1", run_id)
    move()
    # an actor started after the move still loads what the run was pinned to
    assert load_pinned(cfg, pinned, encoders=False).classnames == SCENE_CLASSES
    assert pin_model(f"models:/{name}@champion", cfg).mlflow_version == "2"  # a new run gets the new one


@pytest.mark.slow
def test_a_nightly_run_keeps_its_model_when_the_alias_moves_mid_run(registry, tmp_path, model_dir, ray_cluster):
    """The workflow as a user runs it; the alias is moved as soon as the run has pinned its model
    (before any actor has loaded one), and every output still comes from, and names, version 1."""
    cfg, _, move = registry
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    for i in range(3):
        write_synthetic_scene(scenes / f"s{i}.tif", SCENE_CLASSES, (1, 2), block=64, seed=i)
    logs = tmp_path / "logs"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "BIMORS_LOG_DIR": str(logs)}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "workflows" / "nightly.py"), "--config", str(REPO / "configs" / "quickstart.yaml"),
         "--input", str(scenes), "--output", str(tmp_path / "out"), "--model", f"models:/{cfg.tracking.registered_model}@champion",
         f"model.backbone.name={model_dir / 'clip-tiny'}", f"model.captioner.name={model_dir / 'blip2-tiny'}",
         f"storage.cache_dir={tmp_path / 'cache'}", f"tracking.uri={cfg.tracking.uri}", "scene.tile_size=64",
         "scene.classify.num_cpus=0.25"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if any("pinned to" in f.read_text() for f in logs.glob("nightly-*.log")):
            break
        time.sleep(0.1)
    move()  # mid-run: the alias now names version 2, with other classes
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "3 classified + 0 failed" in out, out

    runs = list((tmp_path / "out" / "_runs").glob("*.json"))
    identity = json.loads(runs[0].read_text())["model_identity"]
    assert identity["mlflow_version"] == "1" and identity["uri"].endswith("/1") and identity["digest"].startswith("sha256:")
    manifest = next((tmp_path / "out" / "_manifest").glob("*.parquet"))
    assert json.loads(pq.read_schema(manifest).metadata[b"bimors.model"]) == identity
    for i in range(3):
        summary = json.loads((tmp_path / "out" / f"s{i}" / "summary.json").read_text())
        assert summary["model"] == identity
        metadata = pq.read_schema(tmp_path / "out" / f"s{i}" / "tiles.parquet").metadata
        assert json.loads(metadata[b"model"]) == identity
        assert json.loads(metadata[b"class_names"]) == SCENE_CLASSES  # version 1's classes, not version 2's
