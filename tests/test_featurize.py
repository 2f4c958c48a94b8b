"""The featurize pipeline on a real local Ray, with tiles and the store on a real S3 API server."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bimors import storage
from bimors.config import Config
from bimors.data.manifest import build_manifest, records_to_table, tile_id, write_manifest
from bimors.data.splits import TileRecord
from bimors.data.synthetic import generate_synthetic
from bimors.data.tiles import read_tile
from bimors.pipelines.feature_store import ERRORS, FEATURES, FeatureStore, StoreMismatchError, column_to_numpy
from bimors.pipelines.featurize import featurize

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
CLASSES = ["beach", "forest", "river", "dense_residential"]


def pipeline_config(base: Config, root: str, storage_cfg=None, **featurize_overrides) -> Config:
    """Small batches so that even a few dozen tiles flow through several batches and shards."""
    fc = base.featurize.model_copy(
        update={
            "scope": "all",
            "decode": base.featurize.decode.model_copy(update={"batch_size": 8, "num_cpus": 0.25}),
            "caption": base.featurize.caption.model_copy(update={"batch_size": 8, "actors": 1, "num_cpus": 0.25}),
            "clip": base.featurize.clip.model_copy(update={"batch_size": 8, "actors": 1, "num_cpus": 0.25}),
            "shard_rows": 12,
            **featurize_overrides,
        }
    )
    data = base.data.model_copy(
        update={
            "root": root,
            "generate_synthetic": False,
            "shots": 2,
            "synthetic": base.data.synthetic.model_copy(update={"classes": CLASSES, "images_per_class": 8}),
        }
    )
    return base.model_copy(update={"featurize": fc, "data": data, "storage": storage_cfg or base.storage})


def png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


BAD_TILES = {
    "forest/corrupt.jpg": (b"\xff\xd8\xff\xe0" + os.urandom(300), "decode"),
    "forest/truncated.png": (png_bytes(1)[:60], "decode"),
    "river/empty.png": (b"", "decode"),
    "river/not_an_image.png": (b"hello, I am a text file\n", "decode"),
}


def assert_exactly_once(store: FeatureStore, expected_ids: set[str]) -> tuple[pa.Table, pa.Table]:
    features, errors = store.features(), store.errors()
    stored = features.column("tile_id").to_pylist()
    failed = errors.column("tile_id").to_pylist()
    assert len(stored) == len(set(stored)), "a tile was stored twice"
    assert len(failed) == len(set(failed)), "a tile failed twice"
    assert not set(stored) & set(failed), "a tile is both stored and failed"
    assert set(stored) | set(failed) == expected_ids
    return features, errors


def test_featurize_s3_tiles_into_an_s3_store(ray_cluster, tiny_config, s3_server, s3_storage, backbone):
    bucket = s3_server.create_bucket("tiles")
    root = f"s3://{bucket}/dataset"
    cfg = pipeline_config(tiny_config, root, s3_storage)
    generate_synthetic(root, cfg.data.synthetic, s3_storage)
    for key, (body, _) in BAD_TILES.items():
        s3_server.put(bucket, f"dataset/{key}", body)
    manifest = build_manifest(cfg.data, s3_storage)
    # a tile listed in the manifest whose object is gone by the time the job reads it
    missing = TileRecord(f"{root}/beach/vanished.png", "beach/vanished.png", 0, "beach", "test")
    manifest = pa.concat_tables([manifest, records_to_table([missing], manifest.schema.metadata[b"bimors.dataset"].decode(), CLASSES)])
    write_manifest(manifest, f"s3://{bucket}/manifest.parquet", s3_storage)
    output = f"s3://{bucket}/store"

    summary = featurize(cfg, output, manifest_uri=f"s3://{bucket}/manifest.parquet")

    n = manifest.num_rows
    assert summary.inputs == n == len(CLASSES) * 8 + len(BAD_TILES) + 1
    assert summary.stored + summary.errors == n and summary.already_done == 0
    assert summary.errors == len(BAD_TILES) + 1
    assert summary.errors_by_stage == {"decode": len(BAD_TILES), "read": 1}
    store = FeatureStore(output, s3_storage)
    features, errors = assert_exactly_once(store, set(manifest.column("tile_id").to_pylist()))
    by_uri = dict(zip(errors.column("uri").to_pylist(), zip(errors.column("stage").to_pylist(), errors.column("error").to_pylist())))
    for key, (_, stage) in BAD_TILES.items():
        assert by_uri[f"{root}/{key}"][0] == stage
    assert "empty" in by_uri[f"{root}/river/empty.png"][1]
    assert by_uri[missing.uri][0] == "read" and missing.uri in by_uri[missing.uri][1]
    assert len(store.shards(FEATURES)) >= 3  # shard_rows=12 -> several shards

    # the stored features are what the frozen models give for that tile
    emb, tokens, cap = column_to_numpy(features, "image_emb"), column_to_numpy(features, "visual_tokens"), column_to_numpy(features, "caption_emb")
    assert emb.shape == (len(features), backbone.embed_dim) and cap.shape == (len(features), 384)
    assert tokens.shape == (len(features), 50, backbone.vision_width) and tokens.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert all(isinstance(c, str) and c for c in features.column("caption").to_pylist())
    uri = features.column("uri")[0].as_py()
    image = read_tile(uri, cfg.data.decode, s3_storage, cfg.featurize.max_side)
    direct = backbone.encode_image(backbone.preprocess([image]))
    np.testing.assert_allclose(emb[0], direct.embedding[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(tokens[0], direct.tokens[0].numpy(), atol=2e-2, rtol=1e-2)
    assert features.column("classname").to_pylist()[0] in CLASSES

    # re-running the same job writes nothing new
    shards_before = store.shards(FEATURES) + store.shards(ERRORS)
    again = featurize(cfg, output, manifest_uri=f"s3://{bucket}/manifest.parquet")
    assert (again.already_done, again.stored, again.errors) == (n, 0, 0)
    assert store.shards(FEATURES) + store.shards(ERRORS) == shards_before


def local_dataset(tmp_path: Path, base: Config, images_per_class: int = 8) -> Config:
    cfg = pipeline_config(base, str(tmp_path / "tiles"))
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"synthetic": cfg.data.synthetic.model_copy(update={"images_per_class": images_per_class})})})
    generate_synthetic(cfg.data.root, cfg.data.synthetic)
    return cfg


def test_torn_shard_is_set_aside_and_its_tiles_recomputed(ray_cluster, tiny_config, tmp_path):
    cfg = local_dataset(tmp_path, tiny_config)
    output = str(tmp_path / "store")
    first = featurize(cfg, output)
    store = FeatureStore(output)
    victim = Path(store.shards(FEATURES)[0])
    victim_rows = pq.read_table(victim).num_rows
    torn = victim.read_bytes()[: victim.stat().st_size // 2]
    victim.write_bytes(torn)  # a torn write
    second = featurize(cfg, output)
    assert second.stored == victim_rows and second.already_done == first.inputs - victim_rows
    (quarantined,) = (Path(output) / "quarantine" / FEATURES).iterdir()  # kept aside, not deleted
    assert quarantined.name.startswith(victim.name) and quarantined.read_bytes() == torn
    assert_exactly_once(store, set(build_manifest(cfg.data).column("tile_id").to_pylist()))


def test_a_store_refuses_features_from_other_models(ray_cluster, tiny_config, tmp_path):
    cfg = local_dataset(tmp_path, tiny_config, images_per_class=2)
    output = str(tmp_path / "store")
    featurize(cfg, output)
    other = cfg.model_copy(update={"model": cfg.model.model_copy(update={"captioner": cfg.model.captioner.model_copy(update={"num_beams": 2})})})
    with pytest.raises(StoreMismatchError, match="captioner"):
        featurize(other, output)


def run_cli(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "workflows" / "featurize.py"), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
        start_new_session=True, **kwargs,
    )


def cli_overrides(cfg: Config) -> list[str]:
    fc = cfg.featurize
    return [
        f"data.root={cfg.data.root}", "data.generate_synthetic=false", f"data.shots={cfg.data.shots}",
        f"model.backbone.name={cfg.model.backbone.name}", f"model.captioner.name={cfg.model.captioner.name}",
        "featurize.scope=all", f"featurize.shard_rows={fc.shard_rows}",
        "featurize.decode.batch_size=4", "featurize.decode.num_cpus=0.25",
        "featurize.caption.batch_size=4", "featurize.caption.actors=1", "featurize.caption.num_cpus=0.25",
        "featurize.clip.batch_size=4", "featurize.clip.actors=1", "featurize.clip.num_cpus=0.25",
        f"storage.cache_dir={cfg.storage.cache_dir}",
    ]


def test_killed_run_resumes_with_every_tile_exactly_once(ray_cluster, tiny_config, tmp_path):
    cfg = local_dataset(tmp_path, tiny_config, images_per_class=30)
    cfg = cfg.model_copy(update={"featurize": cfg.featurize.model_copy(update={"shard_rows": 4})})
    output = tmp_path / "store"
    expected = set(build_manifest(cfg.data).column("tile_id").to_pylist())
    proc = run_cli("--config", str(REPO / "configs" / "quickstart.yaml"), "--output", str(output), *cli_overrides(cfg),
                   env={"RAY_ADDRESS": ray_cluster})
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if len(list((output / FEATURES).glob("*.parquet"))) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, f"the job ended before it could be killed: {proc.communicate()}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = FeatureStore(str(output)).done_tile_ids()
    assert 0 < len(partial) < len(expected), "the kill should land midway"

    summary = featurize(cfg, str(output))
    assert summary.already_done == len(partial)
    assert summary.already_done + summary.stored + summary.errors == len(expected)
    assert_exactly_once(FeatureStore(str(output)), expected)


def test_cli_prints_the_summary_and_fails_with_one_line(ray_cluster, tiny_config, tmp_path, s3_server, s3_storage):
    cfg = local_dataset(tmp_path, tiny_config, images_per_class=2)
    ok = run_cli("--config", str(REPO / "configs" / "quickstart.yaml"), "--output", str(tmp_path / "store"),
                 *cli_overrides(cfg), env={"RAY_ADDRESS": ray_cluster})
    out, err = ok.communicate(timeout=300)
    assert ok.returncode == 0, err
    assert f"featurize: {len(CLASSES) * 2} tiles = 0 already in the store + {len(CLASSES) * 2} stored + 0 errors" in out

    bad = run_cli("--config", str(REPO / "configs" / "quickstart.yaml"), "--data", "s3://no-such-bucket/tiles",
                  "--output", str(tmp_path / "other"), f"storage.endpoint_url={s3_server.endpoint_url}",
                  "storage.key=testing", "storage.secret=testing", "data.generate_synthetic=false")
    out, err = bad.communicate(timeout=120)
    assert bad.returncode == 2
    assert err.strip().splitlines()[-1].startswith("error: s3://no-such-bucket")
    assert "bucket does not exist" in err and "Traceback" not in err


def test_tile_ids_are_the_manifest_keys(tmp_path, tiny_config):
    cfg = local_dataset(tmp_path, tiny_config, images_per_class=1)
    manifest = build_manifest(cfg.data)
    assert manifest.column("tile_id").to_pylist() == [tile_id(u) for u in manifest.column("uri").to_pylist()]
    assert storage.exists(cfg.data.root)
