"""The feature store under real storage faults (a proxy in front of the S3 test server that answers
503 or drops connections): a storage error stops the read with the URI and the cause and never
deletes or rewrites a shard; only a shard whose bytes were read whole and are not Parquet is set
aside (quarantined, not deleted), and its tiles are recomputed."""

from __future__ import annotations

import re

import pyarrow as pa
import pytest

from bimors.config import StorageConfig
from bimors.pipelines.feature_store import ERRORS, FEATURES, FeatureStore
from bimors.storage import StorageError
from fault_proxy import FaultProxy
from s3_server import FAKE_KEY, FAKE_SECRET, REGION

pytestmark = pytest.mark.slow


def storage_at(endpoint: str, cache) -> StorageConfig:
    return StorageConfig(endpoint_url=endpoint, region=REGION, key=FAKE_KEY, secret=FAKE_SECRET, cache_dir=str(cache))


@pytest.fixture
def store_uri(s3_server, s3_bucket, tmp_cache) -> tuple[str, set[str]]:
    """A store with three feature shards and one errors shard, written straight to the server."""
    uri = f"s3://{s3_bucket}/store"
    store = FeatureStore(uri, storage_at(s3_server.endpoint_url, tmp_cache))
    ids: set[str] = set()
    for shard in range(3):
        tile_ids = [f"tile-{shard}-{i}" for i in range(4)]
        store.write_shard(FEATURES, pa.table({"tile_id": tile_ids, "caption": ["a river"] * 4}))
        ids.update(tile_ids)
    store.write_shard(ERRORS, pa.table({"tile_id": ["bad-0"], "uri": ["s3://x/bad.tif"], "stage": ["decode"], "error": ["truncated"]}))
    return uri, ids | {"bad-0"}


def snapshot(s3_server, bucket: str) -> dict[str, bytes]:
    client = s3_server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


@pytest.mark.parametrize("fault", ["503", "drop"])
def test_a_storage_error_stops_the_read_and_changes_nothing_in_the_store(s3_server, s3_bucket, tmp_cache, store_uri, fault):
    uri, ids = store_uri
    before = snapshot(s3_server, s3_bucket)
    with FaultProxy(s3_server.endpoint_url) as proxy:
        through = storage_at(proxy.endpoint_url, tmp_cache)
        proxy.fault, proxy.pattern = fault, re.compile(r"/store/features/part-")
        with pytest.raises(StorageError) as raised:
            FeatureStore(uri, through).done_tile_ids()
        assert f"{uri}/features/part-" in str(raised.value)  # names the shard it could not read
        failed_gets = [p for m, p in proxy.requests if m == "GET" and "/features/part-" in p]
        assert len(failed_gets) >= 2, proxy.requests  # retried (bounded back-off) before giving up
        assert {m for m, _ in proxy.requests} <= {"GET", "HEAD"}, proxy.requests  # no DELETE, PUT or copy
        proxy.fault = None  # the network is fine again: a rerun finds every shard intact
        assert FeatureStore(uri, through).done_tile_ids() == ids
    assert snapshot(s3_server, s3_bucket) == before


def test_only_a_shard_that_is_not_parquet_is_set_aside(s3_server, s3_bucket, tmp_cache, store_uri):
    uri, ids = store_uri
    direct = storage_at(s3_server.endpoint_url, tmp_cache)
    store = FeatureStore(uri, direct)
    victim = store.shards(FEATURES)[0]
    key = victim.split(f"s3://{s3_bucket}/", 1)[1]
    torn = snapshot(s3_server, s3_bucket)[key][:100]  # a torn write: the first 100 bytes
    s3_server.put(s3_bucket, key, torn)
    done = store.done_tile_ids()
    assert len(ids - done) == 4 and done < ids  # the torn shard's tiles are to be recomputed
    after = snapshot(s3_server, s3_bucket)
    assert key not in after
    quarantined = [k for k in after if k.startswith("store/quarantine/features/")]
    assert len(quarantined) == 1 and after[quarantined[0]] == torn  # set aside whole, not deleted


def test_done_tile_ids_reads_the_tile_id_column_not_the_features(s3_server, s3_bucket, tmp_cache):
    """Parquet projection over ranged reads: the bytes that cross the network are under 2% of a
    store whose shards hold ViT-B/16-sized visual tokens (~0.3 MB a tile)."""
    import numpy as np

    from bimors.pipelines.feature_store import tensor_column

    direct = storage_at(s3_server.endpoint_url, tmp_cache)
    uri = f"s3://{s3_bucket}/big-store"
    store = FeatureStore(uri, direct)
    rng = np.random.default_rng(0)
    ids = set()
    for shard in range(2):
        tile_ids = [f"tile-{shard}-{i}" for i in range(30)]
        tokens = rng.standard_normal((30, 197 * 768)).astype(np.float16)  # ViT-B/16's tokens, incompressible
        store.write_shard(FEATURES, pa.table({"tile_id": tile_ids, "visual_tokens": tensor_column(tokens, pa.float16())}))
        ids.update(tile_ids)
    size = sum(len(v) for k, v in snapshot(s3_server, s3_bucket).items() if "/features/" in k)
    with FaultProxy(s3_server.endpoint_url) as proxy:
        assert FeatureStore(uri, storage_at(proxy.endpoint_url, tmp_cache)).done_tile_ids() == ids
    assert proxy.bytes_sent < 0.02 * size, (proxy.bytes_sent, size)  # the footer and the tile_id chunks


def test_a_selection_of_tiles_fetches_only_the_row_groups_that_hold_them(s3_server, s3_bucket, tmp_cache):
    """Shards are sorted by tile_id in row groups of ROW_GROUP_ROWS; a few selected tiles (a seed's
    shots) cost their row groups, not the whole store."""
    import numpy as np

    from bimors.pipelines.feature_store import ROW_GROUP_ROWS, tensor_column

    direct = storage_at(s3_server.endpoint_url, tmp_cache)
    uri = f"s3://{s3_bucket}/selected-store"
    store = FeatureStore(uri, direct)
    rng = np.random.default_rng(1)
    tile_ids = [f"tile-{i:04d}" for i in range(8 * ROW_GROUP_ROWS)]
    tokens = rng.standard_normal((len(tile_ids), 50 * 768)).astype(np.float16)
    store.write_shard(FEATURES, pa.table({"tile_id": tile_ids[::-1], "visual_tokens": tensor_column(tokens, pa.float16())}))
    size = sum(len(v) for k, v in snapshot(s3_server, s3_bucket).items() if "selected-store/features/" in k)
    wanted = {tile_ids[3], tile_ids[5]}  # both in the first row group once sorted
    with FaultProxy(s3_server.endpoint_url) as proxy:
        selected = FeatureStore(uri, storage_at(proxy.endpoint_url, tmp_cache)).features(tile_ids=wanted)
    assert set(selected.column("tile_id").to_pylist()) == wanted
    assert proxy.bytes_sent < 0.25 * size, (proxy.bytes_sent, size)  # one row group of eight, plus the footer
