"""The feature store at ViT-B/16 feature sizes: what its reads cost, locally and on S3.

A store of ``--tiles`` tiles (default 5,000) with ViT-B/16-sized features (197 x 768 float16 visual
tokens, ~0.3 MB a tile, random values; 512-d image and 384-d caption embeddings) is written as
featurize writes it (sorted shards of 512 rows), on local disk and on an S3-compatible server (moto,
on loopback). Reported, in one run:

1. bytes read by ``FeatureStore.done_tile_ids()`` as a fraction of the store's size: locally from
   the process's read counter (``/proc/self/io`` rchar), on S3 from the response bytes through a
   counting proxy in front of the server (target <= 2%);
2. its time against pyarrow reading the ``tile_id`` column of every shard directly (pyarrow's own
   local and S3 filesystems), median of ``--repeats`` (target <= 1.5x);
3. the driver's peak memory while every tile of the store is evaluated (``evaluate_splits``: a
   BiMoRS learner on a backbone with ViT-B/16-sized tokens, features streamed from the local store
   to one predict actor), for the store and a 4x larger one, each in a fresh process; the peak is
   that process's resident memory sampled every 10 ms during the evaluation (``ru_maxrss`` would
   carry the parent's peak over fork + exec) (target: grows <= 1.2x).

    python benchmarks/feature_store.py                  # 5,000 and 20,000 tiles: ~8 GB on /tmp
    python benchmarks/feature_store.py --tiles 2000     # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the loopback S3 server and the counting proxy of the tests
CLASSES = ["beach", "bridge", "dense_residential", "desert", "forest", "harbor", "meadow", "parking", "river", "storage_tank"]
TOKENS, WIDTH, EMBED, CAPTION = 197, 768, 512, 384
SHARD = 512
MiB = 2**20


def write_store(uri: str, first: int, count: int, storage_cfg=None) -> None:
    """Tiles ``first .. first+count-1`` as feature shards (random values, the store's real layout)."""
    import pyarrow as pa

    from bimors.data.manifest import MANIFEST_SCHEMA, tile_id
    from bimors.pipelines.feature_store import FEATURES, FeatureStore, tensor_column, with_shapes

    store = FeatureStore(uri, storage_cfg)
    rng = np.random.default_rng(first)
    for start in range(first, first + count, SHARD):
        n = min(SHARD, first + count - start)
        uris = [f"s3://tiles/{i}.png" for i in range(start, start + n)]
        labels = [i % len(CLASSES) for i in range(start, start + n)]
        columns = {
            "tile_id": pa.array([tile_id(u) for u in uris], pa.string()), "uri": pa.array(uris, pa.string()),
            "dataset": pa.array(["bench"] * n, pa.string()), "split": pa.array(["test"] * n, pa.string()),
            "label": pa.array(labels, pa.int32()), "classname": pa.array([CLASSES[c] for c in labels], pa.string()),
        }
        table = pa.table(columns, schema=MANIFEST_SCHEMA)
        table = table.append_column("caption", pa.array(["a satellite image"] * n, pa.string()))
        emb = rng.standard_normal((n, EMBED), np.float32)
        table = table.append_column("caption_emb", tensor_column(rng.standard_normal((n, CAPTION), np.float32), pa.float32()))
        table = table.append_column("image_emb", tensor_column(emb / np.linalg.norm(emb, axis=1, keepdims=True), pa.float32()))
        tokens = rng.standard_normal((n, TOKENS, WIDTH), np.float32).astype(np.float16)
        table = table.append_column("visual_tokens", tensor_column(tokens, pa.float16()))
        shapes = {"caption_emb": [CAPTION], "image_emb": [EMBED], "visual_tokens": [TOKENS, WIDTH]}
        store.write_shard(FEATURES, with_shapes(table, shapes))


def read_chars() -> int:
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))
    except (OSError, StopIteration):
        return 0


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def pyarrow_tile_ids(paths: list[str], filesystem) -> set[str]:
    import pyarrow.parquet as pq

    ids: set[str] = set()
    for path in paths:
        ids.update(pq.read_table(path, columns=["tile_id"], filesystem=filesystem).column("tile_id").to_pylist())
    return ids


# --------------------------------------------------------------------------------------------
# (3) in a fresh process: the driver's memory while a store is evaluated


def child(spec: dict) -> dict:
    import pyarrow as pa
    import ray

    from bimors.config import load_config
    from bimors.pipelines.evaluate import evaluate_splits
    from bimors.pipelines.feature_store import FeatureStore
    from bimors.pipelines.protocol_data import EvalSplit

    cfg = load_config(spec["config"], spec["overrides"])
    store = FeatureStore(spec["store"])
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", configure_logging=False, log_to_driver=False)
    stored, _ = store.tile_ids()
    rows = pa.table({"tile_id": sorted(stored), "label": [hash(t) % len(CLASSES) for t in sorted(stored)]})
    split = EvalSplit(CLASSES, rows)
    del stored
    baseline = current_rss()
    peak = Peak().start()  # sampled: ru_maxrss would carry the parent's peak over fork + exec
    start = time.perf_counter()
    report = evaluate_splits(cfg, spec["checkpoint"], store, {"all": split})["all"]
    seconds = time.perf_counter() - start
    ray.shutdown()
    return {"tiles": report.count, "seconds": seconds, "baseline": baseline, "peak": peak.stop()}


class Peak:
    """The highest resident memory of this process, sampled every 10 ms."""

    def __init__(self) -> None:
        import threading

        self.value = current_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Peak":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.value = max(self.value, current_rss())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.value, current_rss())


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"evaluation of {spec['store']} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def build_checkpoint(cfg, folder: Path) -> None:
    from bimors.models.checkpoint import save_learner
    from bimors.models.classifier import build_learner
    from bimors.models.clip_backbone import FrozenCLIP

    backbone = FrozenCLIP.load(cfg.model.backbone, cfg.storage)
    assert backbone.vision_width == WIDTH and backbone.embed_dim == EMBED, (backbone.vision_width, backbone.embed_dim)
    save_learner(str(folder), build_learner(cfg.model.learner, backbone, CAPTION), CLASSES, backbone.identity, cfg.model_dump(mode="json"))


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="where the stores go (default: a temporary folder)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    import pyarrow.fs as pafs
    import s3fs

    from bimors.config import StorageConfig, load_config
    from bimors.pipelines.feature_store import FEATURES, FeatureStore
    from fault_proxy import FaultProxy
    from s3_server import FAKE_KEY, FAKE_SECRET, REGION, S3Server

    with tempfile.TemporaryDirectory(prefix="bimors-bench-store-", dir=args.workdir) as tmp, S3Server() as server:
        work = Path(tmp)
        overrides = [
            f"model.backbone.name={work / 'clip-b16-tokens'}", "model.backbone.create_if_missing=bimors-b16-tokens",
            f"model.captioner.name={work / 'blip2-tiny'}", f"storage.cache_dir={work / 'cache'}",
            "evaluate.predict.batch_size=256", "evaluate.predict.num_cpus=1",
        ]
        config = str(REPO / "configs" / "quickstart.yaml")
        cfg = load_config(config, overrides)
        build_checkpoint(cfg, work / "checkpoint")

        started = time.perf_counter()
        local = str(work / "store")
        write_store(local, 0, args.tiles)
        bucket = server.create_bucket("store")
        s3_cfg = StorageConfig(endpoint_url=server.endpoint_url, key=FAKE_KEY, secret=FAKE_SECRET, region=REGION)
        s3 = s3fs.S3FileSystem(key=FAKE_KEY, secret=FAKE_SECRET, client_kwargs={"endpoint_url": server.endpoint_url})
        s3.put(f"{local}/{FEATURES}", f"{bucket}/store/", recursive=True)
        write_seconds = time.perf_counter() - started

        local_store = FeatureStore(local)
        paths = local_store.shards(FEATURES)
        size = sum(os.path.getsize(p) for p in paths)

        # (1) bytes read
        before = read_chars()
        assert len(local_store.done_tile_ids()) == args.tiles
        local_bytes = read_chars() - before
        with FaultProxy(server.endpoint_url) as proxy:
            proxied = FeatureStore(f"s3://{bucket}/store", s3_cfg.model_copy(update={"endpoint_url": proxy.endpoint_url}))
            assert len(proxied.done_tile_ids()) == args.tiles
            s3_bytes = proxy.bytes_sent

        # (2) time against pyarrow reading the tile_id column itself
        s3_store = FeatureStore(f"s3://{bucket}/store", s3_cfg)
        s3_paths = [uri.removeprefix("s3://") for uri in s3_store.shards(FEATURES)]
        native_s3 = pafs.S3FileSystem(access_key=FAKE_KEY, secret_key=FAKE_SECRET, region=REGION,
                                      endpoint_override=server.endpoint_url, scheme="http")
        times = {
            "local store": timed(local_store.done_tile_ids, args.repeats),
            "local pyarrow": timed(lambda: pyarrow_tile_ids(paths, pafs.LocalFileSystem()), args.repeats),
            "s3 store": timed(s3_store.done_tile_ids, args.repeats),
            "s3 pyarrow": timed(lambda: pyarrow_tile_ids(s3_paths, native_s3), args.repeats),
        }

        # (3) driver memory while evaluating the store and one 4x larger (local)
        larger = str(work / "store4x")
        os.makedirs(f"{larger}/{FEATURES}")
        for p in paths:  # the same shards, plus three times as many new ones
            os.link(p, f"{larger}/{FEATURES}/{os.path.basename(p)}")
        write_store(larger, args.tiles, 3 * args.tiles)
        spec = {"config": config, "overrides": overrides, "checkpoint": str(work / "checkpoint")}
        small = run_child({**spec, "store": local})
        large = run_child({**spec, "store": larger})

    print(f"store: {args.tiles:,} tiles, {len(paths)} shards, {size / MiB:,.0f} MiB (197 x 768 fp16 visual tokens, 512-d image "
          f"and 384-d caption embeddings, random values; written + uploaded in {write_seconds:.0f} s); S3: moto on loopback")
    print(f"(1) bytes read by done_tile_ids(): local {local_bytes / MiB:.2f} MiB = {100 * local_bytes / size:.2f}% of the store; "
          f"S3 {s3_bytes / MiB:.2f} MiB = {100 * s3_bytes / size:.2f}%")
    print(f"(2) done_tile_ids() vs pyarrow reading the tile_id column, median of {args.repeats}: local "
          f"{times['local store']:.2f} s vs {times['local pyarrow']:.2f} s = {times['local store'] / times['local pyarrow']:.2f}x; "
          f"S3 {times['s3 store']:.2f} s vs {times['s3 pyarrow']:.2f} s = {times['s3 store'] / times['s3 pyarrow']:.2f}x")

    def incr(r: dict) -> float:
        return (r["peak"] - r["baseline"]) / MiB

    print(f"(3) driver memory while evaluating every tile (BiMoRS, features streamed to 1 predict actor): "
          f"{small['tiles']:,} tiles: peak {small['peak'] / MiB:.0f} MiB ({incr(small):.0f} MiB over {small['baseline'] / MiB:.0f} MiB before, "
          f"{small['seconds']:.0f} s); {large['tiles']:,} tiles: peak {large['peak'] / MiB:.0f} MiB ({incr(large):.0f} MiB over "
          f"{large['baseline'] / MiB:.0f} MiB, {large['seconds']:.0f} s); 4x the store -> {large['peak'] / small['peak']:.2f}x peak")


if __name__ == "__main__":
    main()
