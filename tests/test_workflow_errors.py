"""Every workflow, given a user's mistake, ends with one ``error:`` line and exit status 2 (no
traceback), before any Ray work where the mistake can be seen up front; and an explicit --data is
the user's dataset, never a place to write synthetic tiles into."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bimors.config import load_config
from bimors.errors import BimorsError, user_error_in

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"


def workflow(script: str, *args: str, tmp_path: Path, timeout: int = 180) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"BIMORS_LOG_DIR": str(tmp_path / "logs"), "RAY_ADDRESS": "127.0.0.1:1"}  # any Ray use would fail loudly
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(REPO / "workflows" / script), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=tmp_path)
    return done, time.monotonic() - started


def assert_one_error_line(done: subprocess.CompletedProcess, *words: str) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    assert "Traceback" not in done.stderr + done.stdout
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def models(model_dir, backbone) -> list[str]:
    """Overrides pointing the quickstart at the session's tiny models (built once by ``backbone``)."""
    return [f"model.backbone.name={model_dir / 'clip-tiny'}", f"model.captioner.name={model_dir / 'blip2-tiny'}",
            f"storage.cache_dir={model_dir / 'cache'}"]


def test_featurize_refuses_a_manifest_that_is_not_parquet(tmp_path, models):
    (tmp_path / "list.parquet").write_text("uri,label\ns3://b/x.tif,0\n")
    done, _ = workflow("featurize.py", "--config", str(QUICKSTART), "--manifest", str(tmp_path / "list.parquet"),
                       "--output", str(tmp_path / "store"), *models, tmp_path=tmp_path)
    assert_one_error_line(done, "list.parquet", "not a readable Parquet manifest")


def test_featurize_refuses_a_manifest_without_the_manifest_columns(tmp_path, models):
    pq.write_table(pa.table({"uri": ["s3://b/x.tif"], "label": [0]}), tmp_path / "list.parquet")
    done, _ = workflow("featurize.py", "--config", str(QUICKSTART), "--manifest", str(tmp_path / "list.parquet"),
                       "--output", str(tmp_path / "store"), *models, tmp_path=tmp_path)
    assert_one_error_line(done, "is not a manifest: missing column(s)", "tile_id")


def test_featurize_does_not_write_synthetic_tiles_into_an_explicit_data_folder(tmp_path, models):
    mine = tmp_path / "my-tiles"
    (mine / "notes").mkdir(parents=True)
    (mine / "README.txt").write_text("my own data\n")
    done, _ = workflow("featurize.py", "--config", str(QUICKSTART), "--data", str(mine), "--output", str(tmp_path / "store"),
                       *models, tmp_path=tmp_path)
    assert_one_error_line(done, str(mine))  # the quickstart config generates synthetic data; not into --data
    assert sorted(p.relative_to(mine).as_posix() for p in mine.rglob("*")) == ["README.txt", "notes"]


def test_an_explicit_data_folder_is_read_as_the_users_dataset(tmp_path):
    from bimors.pipelines.featurize import prepare_dataset

    mine = tmp_path / "my-tiles"
    for cls in ("airport", "farmland"):
        (mine / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(mine / cls / f"{i}.png")
    cfg = load_config(QUICKSTART, [f"data.root={tmp_path / 'synthetic'}"])
    assert cfg.data.generate_synthetic
    manifest = prepare_dataset(cfg, str(mine))
    assert sorted(set(manifest.column("classname").to_pylist())) == ["airport", "farmland"]
    assert manifest.num_rows == 6 and len(list(mine.rglob("*"))) == 8  # nothing added
    assert not (tmp_path / "synthetic").exists()  # and the config's own root is not written either
    prepare_dataset(cfg)  # without --data the quickstart writes and reads its synthetic root as before
    assert (tmp_path / "synthetic").is_dir()


@pytest.mark.parametrize("script, extra", [
    ("train.py", ["model.learner.n_ctx=3"]),
    ("evaluate.py", ["--protocol", "base2new", "model.learner.n_ctx=2", "evaluate.methods=[zeroshot, bimors]"]),
])
def test_n_ctx_disagreeing_with_ctx_init_is_found_before_any_ray_work(tmp_path, models, script, extra):
    done, seconds = workflow(script, "--config", str(QUICKSTART), "--output", str(tmp_path / "out"),
                             f"data.root={tmp_path / 'data'}", *models, *extra, tmp_path=tmp_path)
    assert_one_error_line(done, "model.learner.ctx_init 'a photo of a' is 4 tokens", "model.learner.n_ctx is")
    assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()  # nothing featurized or written
    assert seconds < 60, seconds


@pytest.mark.parametrize("script, args, words", [
    ("train.py", ["model.learner.methd=coop"], ["model.learner.methd: unknown key", "did you mean 'model.learner.method'"]),
    ("train.py", ["optim.epochs=two"], ["optim.epochs"]),
    ("evaluate.py", ["--protocol", "cross-dataset"], ["needs dataset roots", "evaluate.datasets.patternnet=URI"]),
    ("nightly.py", ["--input", "{tmp}/no-scenes", "--output", "{tmp}/out", "--model", "{tmp}/no-model"], ["no-scenes"]),
    ("nightly.py", ["--input", "{tmp}", "--output", "{tmp}/out", "--model", "{tmp}/no-model", "scene.tile_size=8"],
     ["scene.tile_size"]),
    ("serve.py", ["--model", "{tmp}/no-model"], ["no-model"]),
    ("serve.py", ["--model", "x", "serve.scene_sources=[relative/folder]"], ["serve.scene_sources", "absolute"]),
    ("featurize.py", ["--output", "{tmp}/store", "--data", "s3:/bucket/tiles"], ["s3:/bucket/tiles", "malformed URI"]),
])
def test_every_workflow_turns_a_mistake_into_one_line(tmp_path, models, script, args, words):
    args = [a.format(tmp=tmp_path) for a in args]
    done, _ = workflow(script, "--config", str(QUICKSTART), *args, *models, tmp_path=tmp_path)
    assert_one_error_line(done, *[w.format(tmp=tmp_path) for w in words])


def test_user_errors_are_found_inside_ray_wrappers():
    """A BimorsError raised in a Ray task, actor or Train worker reaches the driver wrapped; the CLI
    still reports its one line."""
    import ray.exceptions

    from bimors.config import ConfigError

    cause = ConfigError("model.learner.n_ctx is wrong")
    wrapped = ray.exceptions.RayTaskError("train_loop", "traceback text", cause)
    assert user_error_in(wrapped) is cause
    assert user_error_in(wrapped.as_instanceof_cause()) is not None
    chained = RuntimeError("training failed")
    chained.__cause__ = wrapped
    assert user_error_in(chained) is cause
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    assert user_error_in(WorkerGroupError("worker 1 failed", {1: wrapped})) is cause
    assert user_error_in(ControllerError(cause)) is cause
    assert user_error_in(RuntimeError("a bug")) is None
    assert issubclass(ConfigError, BimorsError) and issubclass(ConfigError, ValueError)
