"""MaPLe through the whole harness (real Ray, MLflow, Serve): the base-to-new protocol with MLflow
tracking, training from pixels on two DDP workers, evaluation from decoded tiles, the nightly job;
and APPLeNet in the nightly job and a Serve classifier replica. APPLeNet's run through a protocol
(two DDP workers, the store's per-block token means) is tests/test_experiment.py's
domain-generalization test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bimors.data.synthetic import generate_synthetic
from bimors.data.synthetic_scene import write_synthetic_scene
from bimors.pipelines.feature_store import FeatureStore
from model_fixtures import SCENE_CLASSES, random_images, raw_tile_report

pytestmark = pytest.mark.slow
CLASSES = ["beach", "bridge", "desert", "forest", "harbor", "river"]


@pytest.fixture(scope="module")
def maple_run(ray_cluster, tiny_config, tmp_path_factory, mlflow_server):
    """MaPLe (2 tokens, prompt depth 2 on the 2-block tiny CLIP) through the base-to-new protocol."""
    from bimors.pipelines.protocol_runs import run_protocol

    root = tmp_path_factory.mktemp("maple")
    base = tiny_config
    cfg = base.model_validate(base.model_dump() | {
        "data": base.data.model_dump() | {
            "root": str(root / "tiles"), "generate_synthetic": False, "shots": 2, "subsample": "base",
            "synthetic": base.data.synthetic.model_dump() | {"classes": CLASSES, "images_per_class": 10},
        },
        "model": base.model.model_dump() | {"learner": base.model.learner.model_dump() | {"method": "maple", "n_ctx": 2, "prompt_depth": 2}},
        "featurize": base.featurize.model_dump() | {"seeds": [1]},
        "optim": base.optim.model_dump() | {"epochs": 2, "batch_size": 2, "lr": 0.05, "warmup_epochs": 1},
        "train": base.train.model_dump() | {"cpus_per_worker": 0.5, "features": "online", "workers": 2},
        "evaluate": base.evaluate.model_dump() | {"methods": ["maple"], "seeds": [1],
                                                  "predict": {"batch_size": 64, "actors": 1, "num_cpus": 0.25}},
        "tracking": base.tracking.model_dump() | {"enabled": True, "uri": mlflow_server.uri, "experiment": "maple"},
    })
    generate_synthetic(cfg.data.root, cfg.data.synthetic)
    out = str(root / "out")
    return cfg, out, run_protocol(cfg, out, "base2new")


def test_maple_runs_the_base_to_new_protocol_with_mlflow_tracking(maple_run, mlflow_server):
    from mlflow import MlflowClient

    cfg, out, table = maple_run
    (report,) = table.runs
    assert report.method == "maple" and set(report.reports) == {"base", "new"}
    assert report.reports["base"].count == table.counts["base"] > 0 and report.reports["new"].count > 0
    assert all(0 <= v <= 100 for v in report.accuracies().values())
    assert "| maple |" in (Path(out) / "tables" / "base2new.md").read_text()
    meta = json.loads((Path(report.checkpoint) / "learner.json").read_text())
    assert meta["method"] == "maple" and (Path(report.checkpoint) / "learner.safetensors").read_bytes()[:1] != b"\x80"
    client = MlflowClient(mlflow_server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("maple").experiment_id], "tags.method = 'maple'")
    assert {"test_base_acc", "test_new_acc", "test_hm", "loss"} <= set(run.data.metrics)
    # trained from pixels: every step through the prompted image tower
    assert all(h["encoded_images"] > 0 for h in report.history)
    assert "layer_means" not in FeatureStore(f"{out}/features").identity()  # no method here reads them


def test_maple_evaluation_from_decoded_tiles_matches_the_raw_tile_path(maple_run, backbone):
    """Evaluation decodes the test tiles on Ray and feeds their pixels to the predict actors; the
    nightly job and the endpoint run Predictor.classify_images: same confusion matrices."""
    from bimors.pipelines.protocol_data import protocol_data

    cfg, out, table = maple_run
    (report,) = table.runs
    store = FeatureStore(f"{out}/features")
    for name, split in protocol_data(cfg, store, seed=1).tests.items():
        raw = raw_tile_report(cfg, store, report.checkpoint, split, backbone)
        assert raw.count == report.reports[name].count
        assert raw.confusion.tolist() == report.reports[name].confusion.tolist(), name


@pytest.fixture(scope="module")
def applenet_checkpoint(tiny_config, backbone, caption_encoder, tmp_path_factory) -> str:
    """An (untrained) APPLeNet learner on the tiny backbone, saved as a real checkpoint folder."""
    from bimors.config import LearnerConfig
    from bimors.models.checkpoint import save_learner
    from bimors.models.classifier import build_learner

    folder = tmp_path_factory.mktemp("applenet") / "checkpoint"
    learner = build_learner(LearnerConfig(method="applenet"), backbone, caption_encoder.dim)
    save_learner(str(folder), learner, SCENE_CLASSES, backbone.identity, tiny_config.model_dump(mode="json"))
    return str(folder)


@pytest.mark.parametrize("method", ["maple", "applenet"])
def test_the_nightly_job_classifies_a_scene(maple_run, applenet_checkpoint, tmp_path, method):
    from bimors.pipelines.nightly import run_nightly

    cfg, out, table = maple_run
    checkpoint = table.runs[0].checkpoint if method == "maple" else applenet_checkpoint
    (tmp_path / "in").mkdir()
    write_synthetic_scene(tmp_path / "in" / "a.tif", SCENE_CLASSES, (1, 2), block=64, bands=3, dtype="uint8")
    cfg = cfg.model_copy(update={"scene": cfg.scene.model_copy(update={"tile_size": 64})})
    report = run_nightly(cfg, str(tmp_path / "in"), str(tmp_path / "out"), checkpoint)
    assert (report.classified, report.failed, report.tiles) == (1, 0, 2)
    assert json.loads((tmp_path / "out" / "a" / "summary.json").read_text())["classified"] == 2


def test_a_serve_classifier_replica_answers_with_an_applenet_model(ray_cluster, tiny_config, backbone, applenet_checkpoint):
    from ray import serve

    from bimors.pinned_model import pin_model
    from bimors.pipelines.inference import Predictor
    from bimors.serve.deployments import ClassifierDeployment

    handle = serve.run(ClassifierDeployment.options(ray_actor_options={"num_cpus": 0.25}).bind(
        tiny_config, pin_model(applenet_checkpoint, tiny_config)), name="applenet-test", route_prefix=None)
    try:
        info = handle.info.remote().result()
        assert info["method"] == "applenet" and info["needs_captions"] is False and info["classes"] == SCENE_CLASSES
        image = random_images(1, size=64, seed=4)[0]
        probs = handle.classify.remote((image, None)).result()
        expected = Predictor.from_checkpoint(tiny_config, applenet_checkpoint, backbone=backbone).classify_images([image])[0]
        assert abs(float(probs.sum()) - 1) < 1e-4 and abs(probs - expected).max() < 1e-5
    finally:
        serve.shutdown()  # the next module starts Serve with its own HTTP options

