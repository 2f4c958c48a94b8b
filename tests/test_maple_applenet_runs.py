"""MaPLe and APPLeNet through the whole harness (real Ray, MLflow, Serve): the base-to-new protocol
with MLflow tracking, APPLeNet from the feature store's per-block token means on two DDP workers,
MaPLe from pixels, evaluation, the nightly job and a Serve endpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import pyarrow.parquet as pq
from bimors.config import Config
from bimors.data.synthetic import generate_synthetic
from bimors.data.synthetic_scene import write_synthetic_scene
from bimors.pipelines.feature_store import FEATURES, FeatureStore, column_to_numpy
from model_fixtures import SCENE_CLASSES, random_images

pytestmark = pytest.mark.slow
CLASSES = ["beach", "bridge", "desert", "forest", "harbor", "river"]


def variant(base: Config, root: str, mlflow_uri: str, workers: int = 1, **learner) -> Config:
    online = learner.get("method") == "maple"
    return base.model_validate(base.model_dump() | {
        "data": base.data.model_dump() | {
            "root": root, "generate_synthetic": False, "shots": 2, "subsample": "base",
            "synthetic": base.data.synthetic.model_dump() | {"classes": CLASSES, "images_per_class": 10},
        },
        "model": base.model.model_dump() | {"learner": base.model.learner.model_dump() | learner},
        "featurize": base.featurize.model_dump() | {"seeds": [1]},
        "optim": base.optim.model_dump() | {"epochs": 2, "batch_size": 2, "lr": 0.05, "warmup_epochs": 1},
        "train": base.train.model_dump() | {"cpus_per_worker": 0.5, "workers": workers, "features": "online" if online else "cached"},
        "evaluate": base.evaluate.model_dump() | {"methods": [learner["method"]], "seeds": [1],
                                                  "predict": {"batch_size": 64, "actors": 1, "num_cpus": 0.25}},
        "tracking": base.tracking.model_dump() | {"enabled": True, "uri": mlflow_uri, "experiment": "new-methods"},
    })


@pytest.fixture(scope="module")
def runs(ray_cluster, tiny_config, tmp_path_factory, mlflow_server):
    """APPLeNet then MaPLe through the base-to-new protocol, into one output (one feature store)."""
    from bimors.pipelines.protocol_runs import run_protocol

    root = tmp_path_factory.mktemp("new-methods")
    applenet = variant(tiny_config, str(root / "tiles"), mlflow_server.uri, workers=2, method="applenet")  # DDP
    maple = variant(tiny_config, str(root / "tiles"), mlflow_server.uri, method="maple", n_ctx=2, prompt_depth=2)
    generate_synthetic(applenet.data.root, applenet.data.synthetic)
    out = str(root / "out")
    tables = {cfg.model.learner.method: run_protocol(cfg, out, "base2new") for cfg in (applenet, maple)}
    return {"applenet": applenet, "maple": maple}, out, tables


def test_both_run_the_base_to_new_protocol_with_mlflow_tracking(runs, mlflow_server):
    from mlflow import MlflowClient

    configs, out, tables = runs
    for method, table in tables.items():
        (report,) = table.runs
        assert report.method == method and set(report.reports) == {"base", "new"}
        assert report.reports["base"].count == table.counts["base"] > 0 and report.reports["new"].count > 0
        assert all(0 <= v <= 100 for v in report.accuracies().values())
        meta = json.loads((Path(report.checkpoint) / "learner.json").read_text())
        assert meta["method"] == method and (Path(report.checkpoint) / "learner.safetensors").read_bytes()[:1] != b"\x80"
        client = MlflowClient(mlflow_server.uri)
        experiment = client.get_experiment_by_name("new-methods")
        (run,) = client.search_runs([experiment.experiment_id], f"tags.method = '{method}'")
        assert {"test_base_acc", "test_new_acc", "test_hm", "loss"} <= set(run.data.metrics)
    assert "| maple |" in (Path(out) / "tables" / "base2new.md").read_text()  # the last protocol run's table


def test_applenet_trains_from_stored_layer_means_and_maple_from_pixels(runs, backbone):
    configs, out, tables = runs
    store = FeatureStore(f"{out}/features")
    assert store.identity()["layer_means"] is True
    shard = pq.read_table(store.shards(FEATURES)[0])
    means = column_to_numpy(shard, "layer_means")
    assert means.shape[1:] == (backbone.vision_layers, backbone.vision_width) and np.isfinite(means).all()
    applenet_history, maple_history = (tables[m].runs[0].history for m in ("applenet", "maple"))
    assert [h["encoded_images"] for h in applenet_history] == [0, 0]  # cached: nothing re-encoded
    assert all(h["encoded_images"] > 0 for h in maple_history)  # online: every step through the prompted tower


@pytest.mark.parametrize("method", ["applenet", "maple"])
def test_evaluation_agrees_with_the_raw_tile_path_on_every_test_tile(runs, backbone, method):
    """The protocol's evaluation (APPLeNet: store rows; MaPLe: tiles decoded on Ray) and the raw-tile
    path of the nightly job and the endpoint (Predictor.classify_images) give the same confusion
    matrices over every test tile, base and new classes."""
    from bimors.data.tiles import read_tile
    from bimors.pipelines.inference import Predictor
    from bimors.pipelines.metrics import classification_report
    from bimors.pipelines.protocol_data import protocol_data

    configs, out, tables = runs
    cfg, report = configs[method], tables[method].runs[0]
    store = FeatureStore(f"{out}/features")
    uri_of = dict(zip(*store.read_manifest().select(["tile_id", "uri"]).to_pydict().values()))
    for name, split in protocol_data(cfg, store, seed=1).tests.items():
        ids, labels = split.rows.column("tile_id").to_pylist(), split.rows.column("label").to_numpy()
        images = [read_tile(uri_of[t], cfg.data.decode, cfg.storage, cfg.featurize.max_side) for t in ids]
        predictor = Predictor.from_checkpoint(cfg, report.checkpoint, classnames=split.classnames, backbone=backbone)
        raw = classification_report(labels, predictor.classify_images(images).argmax(-1), split.classnames)
        assert raw.count == report.reports[name].count
        assert raw.confusion.tolist() == report.reports[name].confusion.tolist(), name


def test_the_nightly_job_classifies_a_scene_with_either_model(runs, tmp_path):
    from bimors.pipelines.nightly import run_nightly

    configs, out, tables = runs
    (tmp_path / "in").mkdir()
    write_synthetic_scene(tmp_path / "in" / "a.tif", SCENE_CLASSES, (1, 2), block=64, bands=3, dtype="uint8")
    for method in ("applenet", "maple"):
        cfg = configs[method].model_copy(update={"scene": configs[method].scene.model_copy(update={"tile_size": 64})})
        report = run_nightly(cfg, str(tmp_path / "in"), str(tmp_path / method), tables[method].runs[0].checkpoint)
        assert (report.classified, report.failed, report.tiles) == (1, 0, 2), method
        summary = json.loads((tmp_path / method / "a" / "summary.json").read_text())
        assert summary["classified"] == 2


def test_a_serve_classifier_replica_answers_with_a_maple_model(runs):
    from ray import serve

    from bimors.pinned_model import pin_model
    from bimors.serve.deployments import ClassifierDeployment

    configs, out, tables = runs
    cfg = configs["maple"]
    handle = serve.run(ClassifierDeployment.options(ray_actor_options={"num_cpus": 0.25}).bind(
        cfg, pin_model(tables["maple"].runs[0].checkpoint, cfg)), name="maple-test", route_prefix=None)
    try:
        info = handle.info.remote().result()
        assert info["method"] == "maple" and info["needs_captions"] is False
        image = random_images(1, size=64, seed=4)[0]
        probs = handle.classify.remote((image, None)).result()
        assert probs.shape == (len(info["classes"]),) and abs(float(probs.sum()) - 1) < 1e-4
    finally:
        serve.delete("maple-test")
