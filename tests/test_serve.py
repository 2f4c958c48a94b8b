"""The Ray Serve application, started on a local Ray and spoken to over HTTP with a real client:
auth, tiles, scenes (URL and upload, with polling), every bad input, and a bounded load."""

from __future__ import annotations

import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import rasterio
from PIL import Image

from bimors.data.synthetic_scene import write_synthetic_scene
from model_fixtures import SCENE_CLASSES, random_images
from s3_server import free_port

pytestmark = pytest.mark.slow
TOKEN = "test-token-" + "x" * 8
REPO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def png(image: np.ndarray) -> bytes:
    sink = io.BytesIO()
    Image.fromarray(image).save(sink, format="PNG")
    return sink.getvalue()


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory) -> Path:
    """The one local folder the test endpoint may open scenes from (serve.scene_sources)."""
    return tmp_path_factory.mktemp("allowed-scenes")


@pytest.fixture(scope="module")
def scene_bucket(s3_server) -> str:
    """A bucket whose ``acquisitions/`` prefix the test endpoint may open scenes from."""
    return s3_server.create_bucket("scenes")


@pytest.fixture(scope="module")
def app(ray_cluster, tiny_config, learner_checkpoint, tmp_path_factory, scene_dir, scene_bucket, s3_server):
    from ray import serve

    from bimors.pinned_model import pin_model
    from bimors.serve.app import compose
    from s3_server import FAKE_KEY, FAKE_SECRET, REGION

    out = tmp_path_factory.mktemp("serve")
    small = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.25}
    cfg = tiny_config.model_validate(tiny_config.model_dump() | {
        "scene": tiny_config.scene.model_dump() | {"tile_size": 64},
        "storage": tiny_config.storage.model_dump() | {"endpoint_url": s3_server.endpoint_url, "region": REGION,
                                                      "key": FAKE_KEY, "secret": FAKE_SECRET},
        "serve": {"api_token": TOKEN, "max_upload_bytes": 200_000, "max_scene_pixels": 300 * 300, "output": str(out),
                  "scene_sources": [str(scene_dir), f"s3://{scene_bucket}/acquisitions/"],
                  "ingress": small, "captioner": small | {"max_batch_size": 8}, "classifier": small | {"max_batch_size": 16}},
    })
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(compose(cfg, pin_model(str(learner_checkpoint), cfg)), name="bimors-test", route_prefix="/")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120)
    try:
        yield client, cfg, out
    finally:
        client.close()
        serve.shutdown()


def test_health_needs_no_token_everything_else_does(app):
    client, _, _ = app
    assert httpx.get(f"{client.base_url}/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        response = httpx.get(f"{client.base_url}/model", headers=headers)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    bare = httpx.post(f"{client.base_url}/classify/tile", content=png(random_images(1)[0]))
    assert bare.status_code == 401


def test_model_info(app):
    client, _, _ = app
    info = client.get("/model").json()
    assert info["classes"] == SCENE_CLASSES and info["method"] == "bimors" and info["mlflow_version"] is None
    assert info["backbone"]["fingerprint"] and info["needs_captions"] is True
    # the model every replica loaded, pinned once when the app was built
    assert info["pinned"]["uri"] == info["model"] and info["pinned"]["digest"].startswith("sha256:")


def test_tile_gives_top_k_and_a_caption_matching_the_library(app, tiny_config, learner_checkpoint):
    from bimors.data.tiles import tile_from_bytes
    from bimors.pinned_model import load_pinned, pin_model

    client, cfg, _ = app
    body = png(random_images(1, size=80, seed=3)[0])
    result = client.post("/classify/tile", content=body, params={"top_k": 3}).json()
    assert len(result["top"]) == 3 and result["caption"]
    probs = [t["probability"] for t in result["top"]]
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    # the library's own path on the same bytes: same classes, same probabilities, same caption
    predictor = load_pinned(tiny_config, pin_model(str(learner_checkpoint), tiny_config))
    expected, captions = predictor.predict_images([tile_from_bytes(body, cfg.data.decode, cfg.featurize.max_side)])
    order = np.argsort(-expected[0])[:3]
    assert [t["class"] for t in result["top"]] == [SCENE_CLASSES[i] for i in order]
    assert probs == pytest.approx(expected[0][order].tolist(), rel=1e-4, abs=1e-6)
    assert result["caption"] == captions[0]


@pytest.mark.parametrize("body, status, words", [
    (b"definitely not an image", 422, "not a usable image"),
    (b"", 400, "empty request body"),
    (b"\x89PNG" + b"\x00" * 300_000, 413, "over the limit"),
])
def test_bad_tiles_get_4xx_with_a_reason(app, body, status, words):
    client, _, _ = app
    response = client.post("/classify/tile", content=body)
    assert response.status_code == status and words in response.json()["detail"]


def test_tile_over_the_pixel_limit_is_refused_from_its_header(app):
    client, _, _ = app
    big = png(np.zeros((400, 400, 3), np.uint8))  # compresses to a few KB, 160,000 pixels > 90,000
    assert len(big) < 200_000
    response = client.post("/classify/tile", content=big)
    assert response.status_code == 413 and "pixels" in response.json()["detail"]


def wait_for(client: httpx.Client, job: dict, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/jobs/{job['job_id']}").json()
        if status["state"] in ("done", "failed"):
            return status
        time.sleep(0.5)
    raise AssertionError(f"job {job['job_id']} did not finish: {status}")


def test_scene_by_url_and_by_upload(app, scene_dir):
    client, _, out = app
    tmp_path = scene_dir
    write_synthetic_scene(tmp_path / "scene.tif", SCENE_CLASSES, (2, 3), block=64, nodata_blocks=[(0, 0)])
    submitted = client.post("/classify/scene", json={"url": str(tmp_path / "scene.tif")})
    assert submitted.status_code == 202 and submitted.headers["location"] == f"/jobs/{submitted.json()['job_id']}"
    done = wait_for(client, submitted.json())
    assert done["state"] == "done", done
    assert (done["tiles"], done["classified"], done["nodata"], done["errors"]) == (6, 5, 1, 0)
    with rasterio.open(done["outputs"]["class_map"]) as cm, rasterio.open(tmp_path / "scene.tif") as src:
        assert cm.crs == src.crs and cm.transform == src.transform
    summary = json.loads(Path(done["outputs"]["summary"]).read_text())
    assert summary["model"] == client.get("/model").json()["pinned"]  # the scene records the model that classified it

    uploaded = client.post("/classify/scene", content=(tmp_path / "scene.tif").read_bytes(),
                           headers={"Content-Type": "image/tiff"})
    assert uploaded.status_code == 202
    done = wait_for(client, uploaded.json())
    assert done["state"] == "done" and done["classified"] == 5
    assert done["outputs"]["tiles"].startswith(str(out))


def test_bad_scenes_get_4xx_and_unknown_jobs_404(app, scene_dir):
    client, _, _ = app
    tmp_path = scene_dir
    missing = client.post("/classify/scene", json={"url": str(tmp_path / "nowhere.tif")})
    assert missing.status_code == 400 and "nowhere.tif" in missing.json()["detail"]
    bad_uri = client.post("/classify/scene", json={"url": "s3://"})
    assert bad_uri.status_code == 403  # malformed URLs are under no allowed prefix either
    assert client.post("/classify/scene", json={"nope": 1}).status_code == 400
    not_image = client.post("/classify/scene", content=b"plain text", headers={"Content-Type": "text/plain"})
    assert not_image.status_code == 422
    (tmp_path / "fake.tif").write_bytes(b"II*\x00 not really a tiff")
    assert client.post("/classify/scene", json={"url": str(tmp_path / "fake.tif")}).status_code == 422
    write_synthetic_scene(tmp_path / "big.tif", SCENE_CLASSES, (5, 5), block=64, bands=3, dtype="uint8")  # 320 x 320
    big = client.post("/classify/scene", json={"url": str(tmp_path / "big.tif")})
    assert big.status_code == 413 and "over the limit" in big.json()["detail"]
    assert client.get("/jobs/0123456789abcdef").status_code == 404
    assert client.get("/jobs/..%2F..%2Fetc").status_code == 404
    assert client.get("/health").status_code == 200  # and the replica is still fine


class Listener:
    """A TCP listener on loopback that records every connection made to it (and answers nothing)."""

    def __init__(self):
        import socket
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self):
        self._stop.set()
        self._thread.join()
        self.sock.close()


def test_scene_urls_outside_the_allow_list_are_refused_with_403_and_never_opened(app, scene_dir, tmp_path, s3_server,
                                                                                 scene_bucket):
    client, _, _ = app
    private = tmp_path / "private.tif"  # a real, readable scene outside the allowed folder
    write_synthetic_scene(private, SCENE_CLASSES, (1, 1), block=64)
    (scene_dir / "escape.tif").symlink_to(private)
    other_bucket = s3_server.create_bucket("private")
    s3_server.put(other_bucket, "acquisitions/scene.tif", private.read_bytes())
    s3_server.put(scene_bucket, "elsewhere/scene.tif", private.read_bytes())
    listener = Listener()
    try:
        urls = [
            "/etc/passwd", "file:///etc/passwd", "/no/such/file.tif", str(private), f"file://{private}",
            f"{scene_dir}/{os.path.relpath(private, scene_dir)}",  # .. traversal out of the allowed folder
            str(scene_dir / "escape.tif"),  # a symlink out of the allowed folder
            f"http://127.0.0.1:{listener.port}/scene.tif", f"https://127.0.0.1:{listener.port}/scene.tif",
            "http://169.254.169.254/latest/meta-data/",
            f"s3://{other_bucket}/acquisitions/scene.tif", f"s3://{scene_bucket}/elsewhere/scene.tif",
            f"s3://{scene_bucket}/acquisitions/../elsewhere/scene.tif",
        ]
        answers = [client.post("/classify/scene", json={"url": url}) for url in urls]
    finally:
        listener.close()
    assert [a.status_code for a in answers] == [403] * len(urls)
    # one body for every refusal: nothing tells a caller whether a server path or object exists
    assert len({a.text for a in answers}) == 1 and "scene_sources" in answers[0].json()["detail"]
    assert listener.connections == 0  # the server never fetched from the loopback address


def test_scenes_under_an_allowed_bucket_prefix_are_classified(app, scene_dir, s3_server, scene_bucket):
    client, _, _ = app
    write_synthetic_scene(scene_dir / "for-s3.tif", SCENE_CLASSES, (1, 2), block=64)
    s3_server.put(scene_bucket, "acquisitions/2026-11-30/scene.tif", (scene_dir / "for-s3.tif").read_bytes())
    submitted = client.post("/classify/scene", json={"url": f"s3://{scene_bucket}/acquisitions/2026-11-30/scene.tif"})
    assert submitted.status_code == 202, submitted.text
    done = wait_for(client, submitted.json())
    assert done["state"] == "done" and done["classified"] == 2, done


def test_bounded_load_completes_without_5xx(app):
    client, _, _ = app
    bodies = [png(image) for image in random_images(12, size=64, seed=7)]

    def one(i: int) -> int:
        return client.post("/classify/tile", content=bodies[i % len(bodies)]).status_code

    started = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(one, range(300)))
    assert codes.count(200) == 300, {c: codes.count(c) for c in set(codes)}
    assert time.perf_counter() - started < 300


def test_deployments_load_the_model_from_the_mlflow_registry(tiny_config, learner_checkpoint, mlflow_server):
    """What the classifier replica does at start-up with ``--model models:/name@alias``."""
    from bimors import tracking
    from bimors.pinned_model import load_pinned, pin_model
    from bimors.serve.app import build_app

    cfg = tiny_config.model_copy(update={"tracking": tiny_config.tracking.model_copy(update={
        "uri": mlflow_server.uri, "registered_model": "scene-model", "alias": "champion"})})
    run_id = tracking.start_run(cfg, "serve-registry")
    version = tracking.register_model(cfg, run_id, str(learner_checkpoint))
    tracking.end_run(mlflow_server.uri, run_id)

    predictor = load_pinned(cfg, pin_model("models:/scene-model@champion", cfg), encoders=False)
    assert predictor.classnames == SCENE_CLASSES
    assert pin_model("models:/scene-model@champion", cfg).mlflow_version == str(version)
    assert pin_model(str(learner_checkpoint), cfg).mlflow_version is None
    with pytest.raises(tracking.TrackingError, match="no alias 'gone'"):
        pin_model("models:/scene-model@gone", cfg)
    app = build_app({"config": str(REPO_CONFIG), "model": "models:/scene-model@champion",
                     "overrides": [f"tracking.uri={mlflow_server.uri}"]})
    assert type(app).__name__ == "Application"
    with pytest.raises(ValueError, match="needs a 'model'"):
        build_app({"config": str(REPO_CONFIG)})


def test_replicas_resources_and_autoscaling_come_from_the_config():
    from bimors.config import load_config
    from bimors.pinned_model import PinnedModel
    from bimors.serve.app import compose

    cfg = load_config(REPO_CONFIG, ["serve.captioner.max_replicas=7", "serve.captioner.num_gpus=0.5",
                                    "serve.classifier.min_replicas=0", "serve.classifier.target_ongoing_requests=3"])
    pinned = PinnedModel("models:/bimors@champion", "models:/bimors/3", "sha256:0", "3", "run0")  # nothing is loaded here
    ingress = compose(cfg, pinned)._bound_deployment
    deployments = {ingress.name: ingress} | {
        a._bound_deployment.name: a._bound_deployment for a in ingress.init_args if hasattr(a, "_bound_deployment")}
    assert set(deployments) == {"BimorsAPI", "Captioner", "Classifier"}
    captioner, classifier = deployments["Captioner"], deployments["Classifier"]
    assert captioner.ray_actor_options["num_gpus"] == 0.5 and captioner._deployment_config.autoscaling_config.max_replicas == 7
    scaling = classifier._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.target_ongoing_requests) == (0, 3)


def test_serve_workflow_refuses_a_bad_model_before_starting_anything(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(REPO_CONFIG.parents[1] / "workflows" / "serve.py"), "--config", str(REPO_CONFIG),
                           "--model", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "not a learner checkpoint" in done.stderr and "Traceback" not in done.stderr


# ------------------------------------------------------------------------------------------------
# scene jobs are Ray work of their own: they outlive the ingress replica, and a dead runner is reported


def submit_scene(client: httpx.Client, scene_dir: Path, name: str, grid=(4, 4)) -> dict:
    write_synthetic_scene(scene_dir / name, SCENE_CLASSES, grid, block=64, bands=3, dtype="uint8", seed=5)
    submitted = client.post("/classify/scene", json={"url": str(scene_dir / name)})
    assert submitted.status_code == 202, submitted.text
    return submitted.json()


def poll(client: httpx.Client, job: dict, until, timeout: float = 240) -> dict:
    """Poll the job until ``until(status)``, riding out the 5xx and dropped connections of an
    ingress replica being replaced."""
    deadline = time.monotonic() + timeout
    status: dict = {}
    while time.monotonic() < deadline:
        try:
            response = client.get(f"/jobs/{job['job_id']}")
            if response.status_code == 200:
                status = response.json()
                if until(status):
                    return status
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"job {job['job_id']}: condition not met within {timeout} s; last status {status}")


def test_a_scene_job_outlives_the_ingress_replica_that_accepted_it(app, scene_dir):
    import ray

    client, _, _ = app
    job = submit_scene(client, scene_dir, "outlives-ingress.tif")
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "BimorsAPI" in a["name"]]
    assert len(replicas) == 1, replicas
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
    done = poll(client, job, lambda s: s["state"] in ("done", "failed"))
    assert done["state"] == "done", done
    assert (done["tiles"], done["classified"]) == (16, 16)
    replaced = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "BimorsAPI" in a["name"]]
    assert replaced and replaced != [replicas[0]["name"]]  # a new replica answered the polls


def test_a_job_whose_runner_died_is_reported_failed_with_the_reason(app, scene_dir):
    import ray

    from bimors.serve.scene_jobs import NAMESPACE, runner_name

    client, _, _ = app
    job = submit_scene(client, scene_dir, "runner-dies.tif", grid=(4, 4))
    running = poll(client, job, lambda s: s["state"] == "running")
    assert running.get("tiles_done", 0) < 16
    ray.kill(ray.get_actor(runner_name(job["job_id"]), namespace=NAMESPACE))
    failed = poll(client, job, lambda s: s["state"] != "running", timeout=60)
    assert failed["state"] == "failed" and "runner stopped" in failed["error"], failed
    assert client.get(f"/jobs/{job['job_id']}").json()["state"] == "failed"  # recorded, not guessed again


def test_a_tile_gets_the_same_caption_class_and_probability_on_every_path(app, scene_dir, tmp_path, learner_checkpoint):
    """featurize + evaluation, the nightly job, the endpoint's tile route and its scene jobs all run
    the same stage code (CaptionModels, Predictor) on the same pixels."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bimors.data.manifest import MANIFEST_SCHEMA, tile_id
    from bimors.pipelines.evaluate import predict_splits
    from bimors.pipelines.feature_store import FeatureStore
    from bimors.pipelines.featurize import featurize_manifest
    from bimors.pipelines.nightly import run_nightly
    from bimors.pipelines.protocol_data import EvalSplit

    client, cfg, _ = app
    classes = client.get("/model").json()["classes"]
    write_synthetic_scene(scene_dir / "same.tif", SCENE_CLASSES, (1, 3), block=64, bands=3, dtype="uint8", seed=11)
    with rasterio.open(scene_dir / "same.tif") as ds:
        pixels = ds.read()
    (tmp_path / "tiles").mkdir()
    uris = []
    for i in range(3):  # the scene's three tiles as the files a labelled dataset would hold
        uris.append(str(tmp_path / "tiles" / f"{i}.png"))
        Path(uris[-1]).write_bytes(png(np.ascontiguousarray(pixels[:, :, 64 * i : 64 * (i + 1)].transpose(1, 2, 0))))

    # featurize + evaluation
    small = {"actors": 1, "num_cpus": 0.25}
    fcfg = cfg.model_validate(cfg.model_dump() | {"featurize": cfg.featurize.model_dump() | {
        "scope": "all", "decode": small | {"batch_size": 4}, "caption": small | {"batch_size": 4}, "clip": small | {"batch_size": 4}}})
    manifest = pa.table({"tile_id": [tile_id(u) for u in uris], "uri": uris, "dataset": ["same"] * 3, "split": ["test"] * 3,
                         "label": [0] * 3, "classname": [classes[0]] * 3}, schema=MANIFEST_SCHEMA)
    store = FeatureStore(str(tmp_path / "store"), cfg.storage)
    assert featurize_manifest(fcfg, store, manifest).stored == 3
    features = store.features()
    split = EvalSplit(classes, pa.table({"tile_id": [tile_id(u) for u in uris], "label": [0] * 3}))
    predicted = predict_splits(fcfg, str(learner_checkpoint), store, {"test": split})["test"].to_pylist()
    by_id = {row["tile_id"]: row for row in predicted}
    captions = dict(zip(features["tile_id"].to_pylist(), features["caption"].to_pylist()))
    evaluation = [(classes[by_id[tile_id(u)]["prediction"]], by_id[tile_id(u)]["probability"], captions[tile_id(u)]) for u in uris]

    # the nightly job
    (tmp_path / "night").mkdir()
    (tmp_path / "night" / "same.tif").write_bytes((scene_dir / "same.tif").read_bytes())
    assert run_nightly(cfg, str(tmp_path / "night"), str(tmp_path / "products"), str(learner_checkpoint)).classified == 1

    def from_parquet(path) -> list[tuple]:
        rows = sorted(pq.read_table(path).to_pylist(), key=lambda r: r["col_off"])
        return [(r["class_name"], r["probability"], r["caption"]) for r in rows]

    nightly = from_parquet(tmp_path / "products" / "same" / "tiles.parquet")

    # the endpoint: a tile at a time, and the scene as a job
    endpoint_tiles = []
    for uri in uris:
        answer = client.post("/classify/tile?top_k=1", content=Path(uri).read_bytes()).json()
        endpoint_tiles.append((answer["top"][0]["class"], answer["top"][0]["probability"], answer["caption"]))
    job = client.post("/classify/scene", json={"url": str(scene_dir / "same.tif")}).json()
    done = wait_for(client, job)
    assert done["state"] == "done", done
    endpoint_scene = from_parquet(done["outputs"]["tiles"])

    for path in (nightly, endpoint_tiles, endpoint_scene):
        assert [(c, cap) for c, _, cap in path] == [(c, cap) for c, _, cap in evaluation]
        assert np.allclose([p for _, p, _ in path], [p for _, p, _ in evaluation], atol=1e-5)
    assert all(caption for _, _, caption in evaluation)  # BiMoRS reads captions: they were made
