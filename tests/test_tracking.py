"""MLflow helpers against a real ``mlflow server`` on loopback (and, once, a local SQLite store)."""

from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no network in tests

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bimors import tracking
from bimors.config import Config, TrackingConfig, flatten, load_config
from bimors.models.checkpoint import META
from model_fixtures import REPO

SECRET = "s3cr3t-VALUE-never-logged"
KEY = "AKIAEXAMPLEKEY123456"
CLASSES = ["beach", "forest", "river"]

slow = pytest.mark.slow


# -- fixtures ------------------------------------------------------------------------------------


def make_config(model_dir: Path, cache: Path, tracking_overrides: list[str]) -> Config:
    """The tests' tiny quickstart config with credentials set (so leaks can be looked for) and a
    long list value (over MLflow's 6000-character param limit)."""
    long_classes = [f"class_{i:04d}_with_a_long_name" for i in range(300)]
    return load_config(
        REPO / "configs" / "quickstart.yaml",
        [
            f"model.backbone.name={model_dir / 'clip-tiny'}",
            f"model.captioner.name={model_dir / 'blip2-tiny'}",
            f"storage.cache_dir={cache}",
            f"storage.key={KEY}",
            f"storage.secret={SECRET}",
            f"data.synthetic.classes={json.dumps(long_classes)}",
            *tracking_overrides,
        ],
    )


@pytest.fixture
def cfg(mlflow_server, model_dir, tmp_path) -> Config:
    """Fresh experiment and registry name per test: the server lives for the whole session."""
    unique = uuid.uuid4().hex[:8]
    return make_config(
        model_dir,
        tmp_path / "cache",
        [f"tracking.uri={mlflow_server.uri}", f"tracking.experiment=exp-{unique}",
         f"tracking.registered_model=model-{unique}", "tracking.alias=candidate"],
    )  # fmt: skip


@pytest.fixture(autouse=True)
def _global_mlflow_uri_points_elsewhere(tmp_path, monkeypatch):
    """Anything that silently used MLflow's global tracking URI instead of the config's would
    create this database; tests assert it never appears."""
    decoy = tmp_path / "decoy" / "global.db"
    decoy.parent.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{decoy}")
    yield decoy
    assert not decoy.exists(), "something used MLflow's global tracking URI instead of tracking.uri"


def _save_checkpoint(folder: Path, backbone, tiny_config: Config, tag: str) -> Path:
    from bimors.models.checkpoint import save_learner
    from bimors.models.classifier import build_learner

    learner = build_learner(tiny_config.model.learner, backbone, caption_dim=384)
    save_learner(str(folder), learner, CLASSES, backbone.identity, tiny_config.model_dump(mode="json"), {"tag": tag})
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, backbone, tiny_config) -> tuple[Path, Path]:
    """Two learner checkpoints that differ (weights are freshly initialised, extra tags differ)."""
    root = tmp_path_factory.mktemp("checkpoints")
    return (_save_checkpoint(root / "v1", backbone, tiny_config, "v1"),
            _save_checkpoint(root / "v2", backbone, tiny_config, "v2"))  # fmt: skip


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# -- tracking_uri (fast) -------------------------------------------------------------------------


def test_tracking_uri_prefers_config_then_environment_then_default(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert tracking.tracking_uri(TrackingConfig(uri="http://from-config:5000")) == "http://from-config:5000"
    assert tracking.tracking_uri(TrackingConfig()) == "http://tracking.example:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri(TrackingConfig()) == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_tracking_uri_makes_relative_sqlite_paths_absolute(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri(TrackingConfig(uri="sqlite:///runs/m.db")) == f"sqlite:///{tmp_path}/runs/m.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db?timeout=5")
    assert tracking.tracking_uri(TrackingConfig()) == f"sqlite:///{tmp_path}/env.db?timeout=5"
    absolute = f"sqlite:///{tmp_path}/abs.db"
    assert tracking.tracking_uri(TrackingConfig(uri=absolute)) == absolute
    assert tracking.tracking_uri(TrackingConfig(uri="sqlite:///:memory:")) == "sqlite:///:memory:"


def test_run_url_for_a_local_store_says_how_to_open_it():
    text = tracking.run_url("sqlite:////data/mlflow.db", "abc123")
    assert "abc123" in text and "mlflow ui --backend-store-uri sqlite:////data/mlflow.db" in text


# -- runs ----------------------------------------------------------------------------------------


@slow
def test_start_run_logs_flattened_params_and_config_but_never_the_secret(cfg, tmp_path):
    import mlflow

    run_id = tracking.start_run(cfg, "params-run", tags={"purpose": "test"})
    assert mlflow.active_run() is None, "start_run must not leave an active run in the process"
    run = _client(cfg.tracking.uri).get_run(run_id)
    assert run.info.run_name == "params-run" and run.info.status == "RUNNING"
    assert run.data.tags["purpose"] == "test"

    params = run.data.params
    flat = flatten(cfg)
    assert set(params) == set(flat)
    assert params["optim.lr"] == "0.05" and params["data.shots"] == "8"
    assert params["data.dataset"] == "null" and params["storage.anonymous"] == "false"
    assert params["model.backbone.name"] == str(cfg.model.backbone.name)
    long_value = params["data.synthetic.classes"]
    assert len(json.dumps(cfg.data.synthetic.classes)) > 6000
    assert len(long_value) <= 6000 and long_value.endswith("...")
    assert all(SECRET not in v and KEY not in v for v in params.values())
    assert params["storage.secret"] == "**********"

    path = _client(cfg.tracking.uri).download_artifacts(run_id, "config.yaml", str(tmp_path))
    text = Path(path).read_text()
    assert SECRET not in text and KEY not in text and "**********" not in text
    reloaded = load_config(path)
    assert reloaded.storage.secret is None and reloaded.storage.key is None
    expected = cfg.model_copy(update={"storage": cfg.storage.model_copy(update={"key": None, "secret": None})})
    assert reloaded.model_dump() == expected.model_dump()


@slow
def test_metrics_figures_and_artifacts_are_logged_to_the_run(cfg, tmp_path):
    from bimors.plots import curves_figure

    uri = cfg.tracking.uri
    run_id = tracking.start_run(cfg, "metrics-run")
    for epoch, (loss, acc) in enumerate([(2.0, 0.3), (1.5, 0.5), (0.9, 0.75)]):
        tracking.log_metrics(uri, run_id, {"train/loss": loss, "val/acc": acc}, step=epoch)
    history = [{"epoch": e, "loss": 1.0 / (e + 1), "train_acc": 0.5, "val_acc": 0.4, "lr": 0.01} for e in range(3)]
    tracking.log_figure(uri, run_id, curves_figure(history), "plots/curves.png")
    tracking.log_text(uri, run_id, "hello", "notes/readme.txt")
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    (tmp_path / "dir" / "sub" / "a.txt").write_text("a")
    tracking.log_dir(uri, run_id, str(tmp_path / "dir"), "extra")
    tracking.end_run(uri, run_id)

    client = _client(uri)
    loss = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))
    acc = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "val/acc"))
    assert loss == [(0, 2.0), (1, 1.5), (2, 0.9)]
    assert acc == [(0, 0.3), (1, 0.5), (2, 0.75)]
    assert client.get_run(run_id).info.status == "FINISHED"
    png = Path(client.download_artifacts(run_id, "plots/curves.png", str(tmp_path / "dl"))).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert Path(client.download_artifacts(run_id, "notes/readme.txt", str(tmp_path / "dl"))).read_text() == "hello"
    assert [f.path for f in client.list_artifacts(run_id, "extra/sub")] == ["extra/sub/a.txt"]

    url = tracking.run_url(uri, run_id)
    experiment_id = client.get_run(run_id).info.experiment_id
    assert url == f"{uri}/#/experiments/{experiment_id}/runs/{run_id}"


# -- registry ------------------------------------------------------------------------------------


@pytest.fixture
def registered(cfg, checkpoints):
    """Two versions of one registered model, from two runs; the alias ends on version 2."""
    first_run = tracking.start_run(cfg, "train-1")
    assert tracking.register_model(cfg, first_run, str(checkpoints[0])) == 1
    alias_after_first = _client(cfg.tracking.uri).get_model_version_by_alias(
        cfg.tracking.registered_model, cfg.tracking.alias
    ).version
    second_run = tracking.start_run(cfg, "train-2")
    assert tracking.register_model(cfg, second_run, str(checkpoints[1])) == 2
    return {"runs": (first_run, second_run), "alias_after_first": alias_after_first}


@slow
def test_register_model_creates_versions_and_moves_the_alias(cfg, registered):
    client = _client(cfg.tracking.uri)
    name, alias = cfg.tracking.registered_model, cfg.tracking.alias
    assert registered["alias_after_first"] == "1"
    assert client.get_model_version_by_alias(name, alias).version == "2"
    first, second = registered["runs"]
    assert client.get_model_version(name, "1").run_id == first
    assert client.get_model_version(name, "2").run_id == second
    # the logged model belongs to the run's experiment (not MLflow's Default experiment)
    experiment_id = client.get_run(second).info.experiment_id
    models = client.search_logged_models(experiment_ids=[experiment_id], filter_string="name = 'model'")
    assert {m.source_run_id for m in models} == {first, second}


@slow
def test_resolve_checkpoint_downloads_what_each_model_uri_points_at(cfg, registered, checkpoints):
    name, alias = cfg.tracking.registered_model, cfg.tracking.alias
    first_run, _ = registered["runs"]
    tracking.log_dir(cfg.tracking.uri, first_run, str(checkpoints[1]), "checkpoints/last")  # a plain run artifact
    original = [(c / META).read_text() for c in checkpoints]
    cases = {
        f"models:/{name}@{alias}": original[1],
        f"models:/{name}/1": original[0],
        f"models:/{name}/2": original[1],
        f"runs:/{first_run}/model": original[0],
        f"runs:/{first_run}/checkpoints/last": original[1],
    }
    for model_uri, expected in cases.items():
        local = Path(tracking.resolve_checkpoint(model_uri, cfg))
        assert local.is_dir() and str(local).startswith(str(Path(cfg.storage.cache_dir)))
        assert (local / META).read_text() == expected, model_uri
        assert (local / "learner.safetensors").is_file()
    # a second resolution reuses the cached download
    assert tracking.resolve_checkpoint(f"models:/{name}/1", cfg) == tracking.resolve_checkpoint(f"models:/{name}/1", cfg)


@slow
def test_resolve_checkpoint_errors_name_the_uri_and_what_is_missing(cfg, registered, tmp_path, checkpoints):
    name = cfg.tracking.registered_model
    with pytest.raises(tracking.TrackingError, match=rf"models:/{name}@nope.*no alias 'nope'"):
        tracking.resolve_checkpoint(f"models:/{name}@nope", cfg)
    with pytest.raises(tracking.TrackingError, match=rf"models:/{name}/7.*no version 7"):
        tracking.resolve_checkpoint(f"models:/{name}/7", cfg)
    with pytest.raises(tracking.TrackingError, match=r"models:/no-such-model@candidate.*no registered model named"):
        tracking.resolve_checkpoint("models:/no-such-model@candidate", cfg)
    with pytest.raises(tracking.TrackingError, match=rf"models:/{name}: expected models:/<name>@<alias>"):
        tracking.resolve_checkpoint(f"models:/{name}", cfg)
    with pytest.raises(tracking.TrackingError, match=r"runs:/0123456789abcdef/model.*no run"):
        tracking.resolve_checkpoint("runs:/0123456789abcdef/model", cfg)
    run_id = registered["runs"][0]
    with pytest.raises(tracking.TrackingError, match=rf"runs:/{run_id}/config.yaml.*no {META}"):
        tracking.resolve_checkpoint(f"runs:/{run_id}/config.yaml", cfg)
    with pytest.raises(tracking.TrackingError, match=rf"{tmp_path}.*no {META}"):
        tracking.resolve_checkpoint(str(tmp_path), cfg)
    # a checkpoint URI is returned unchanged
    assert tracking.resolve_checkpoint(str(checkpoints[0]), cfg) == str(checkpoints[0])
    assert tracking.resolve_checkpoint(f"file://{checkpoints[0]}", cfg) == f"file://{checkpoints[0]}"


@slow
def test_registered_model_loads_as_pyfunc_and_classifies_tiles(cfg, registered, tmp_path, monkeypatch):
    import mlflow.pyfunc
    import pandas as pd

    monkeypatch.setenv("MLFLOW_TRACKING_URI", cfg.tracking.uri)  # pyfunc.load_model resolves models:/ globally
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        path = tmp_path / f"tile{i}.png"
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))

    model = mlflow.pyfunc.load_model(f"models:/{cfg.tracking.registered_model}@{cfg.tracking.alias}")
    out = model.predict(pd.DataFrame({"uri": paths}))
    assert list(out.columns) == ["uri", "label", "probability", "caption"]
    assert list(out["uri"]) == paths
    assert set(out["label"]) <= set(CLASSES)
    assert ((out["probability"] > 0) & (out["probability"] <= 1)).all()
    assert out["probability"].min() >= 1 / len(CLASSES) - 1e-6  # the argmax of a softmax
    assert all(isinstance(c, str) and c for c in out["caption"])  # bimors reads captions


# -- the embedded default: a local SQLite store ------------------------------------------------


@slow
def test_local_sqlite_store_keeps_everything_beside_the_database(model_dir, tmp_path, monkeypatch, checkpoints):
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "store"
    store.mkdir()
    cfg = make_config(model_dir, tmp_path / "cache", ["tracking.uri=sqlite:///store/mlflow.db"])
    run_id = tracking.start_run(cfg, "local")
    tracking.log_metrics(tracking.tracking_uri(cfg.tracking), run_id, {"acc": 0.5}, step=1)
    assert tracking.register_model(cfg, run_id, str(checkpoints[0])) == 1
    local = tracking.resolve_checkpoint(f"models:/{cfg.tracking.registered_model}@{cfg.tracking.alias}", cfg)
    assert (Path(local) / META).read_text() == (checkpoints[0] / META).read_text()
    assert sorted(p.name for p in store.iterdir()) == ["mlflow.db", "mlruns"]
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()
    assert "mlflow ui --backend-store-uri sqlite:///" in tracking.run_url(tracking.tracking_uri(cfg.tracking), run_id)
