"""bimors.storage against the local filesystem and a real S3 API server (moto, on loopback)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from bimors import storage
from bimors.config import Config, StorageConfig, flatten
from bimors.storage import StorageError
from s3_server import REGION, free_port

s3 = pytest.mark.slow  # needs the S3 server (see the `slow` marker in pyproject.toml)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------------------------
# local files


def test_local_round_trip_by_path_and_file_uris(tmp_path: Path):
    target = tmp_path / "deep" / "er" / "blob.bin"
    storage.write_bytes(str(target), b"\x00payload\xff")  # creates parent folders
    assert target.read_bytes() == b"\x00payload\xff"
    for uri in (str(target), f"file://{target}", f"file:{target}"):
        assert storage.read_bytes(uri) == b"\x00payload\xff"
        assert storage.exists(uri)
        assert storage.stage_local(uri) == target  # local files are used in place
    storage.write_bytes(f"file://{tmp_path}/other.txt", b"via file uri")
    assert (tmp_path / "other.txt").read_bytes() == b"via file uri"
    assert storage.exists(str(tmp_path / "deep"))  # folders exist too
    assert not storage.exists(str(tmp_path / "nope.bin"))
    assert not storage.exists(f"file://{tmp_path}/nope.bin")


def test_local_writes_replace_the_file_atomically(tmp_path: Path):
    target = tmp_path / "model.json"
    storage.write_bytes(str(target), b"old" * 1000)
    with open(target, "rb") as reader:  # a reader that opened the old file ...
        storage.write_bytes(str(target), b"new")
        assert reader.read() == b"old" * 1000  # ... still sees the whole old file, never a mix
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json"]  # no temporary files left
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()  # not mkstemp's private 0600


def test_failed_local_write_keeps_the_old_file_and_leaves_no_debris(tmp_path: Path):
    target = tmp_path / "weights.bin"
    storage.write_bytes(str(target), b"good")
    with pytest.raises(StorageError) as info:
        storage.write_bytes(str(target), 12345)  # type: ignore[arg-type] - not bytes
    assert str(target) in str(info.value)
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.bin"]


def test_local_errors_name_the_path(tmp_path: Path):
    missing = tmp_path / "missing.bin"
    with pytest.raises(StorageError, match="no such file") as info:
        storage.read_bytes(str(missing))
    assert str(missing) in str(info.value)
    with pytest.raises(StorageError, match="folder, not a file"):
        storage.read_bytes(str(tmp_path))
    assert isinstance(info.value, OSError)  # StorageError is an OSError: callers may catch either


@pytest.mark.parametrize(
    ("uri", "parts", "expected"),
    [
        ("s3://bucket", ("models", "clip.bin"), "s3://bucket/models/clip.bin"),
        ("s3://bucket/models/", ("/clip/", "w.bin"), "s3://bucket/models/clip/w.bin"),
        ("s3://bucket/run", ("", "a"), "s3://bucket/run/a"),
        ("/data/out/", ("features", "part-0.parquet"), "/data/out/features/part-0.parquet"),
        ("file:///data", ("x",), "file:///data/x"),
        ("s3://bucket/x", (), "s3://bucket/x"),
    ],
)
def test_join(uri, parts, expected):
    assert storage.join(uri, *parts) == expected


# --------------------------------------------------------------------------------------------
# S3 round trips


@s3
def test_s3_round_trip(s3_storage, s3_bucket):
    uri = f"s3://{s3_bucket}/runs/1/learner.json"
    assert not storage.exists(uri, s3_storage)
    storage.write_bytes(uri, b'{"ok": true}', s3_storage)
    assert storage.read_bytes(uri, s3_storage) == b'{"ok": true}'
    assert storage.exists(uri, s3_storage)
    assert storage.exists(f"s3://{s3_bucket}/runs/1", s3_storage)  # a prefix with objects is a folder
    assert storage.exists(f"s3://{s3_bucket}", s3_storage)
    storage.write_bytes(uri, b"", s3_storage)  # empty objects are fine
    assert storage.read_bytes(uri, s3_storage) == b""


@s3
def test_s3_round_trip_with_the_standard_aws_environment(s3_env, s3_server, s3_bucket):
    uri = f"s3://{s3_bucket}/from-env.txt"
    storage.write_bytes(uri, b"env", None)  # no StorageConfig at all: endpoint + keys from AWS_*
    assert storage.read_bytes(uri, StorageConfig()) == b"env"
    assert s3_server.client().get_object(Bucket=s3_bucket, Key="from-env.txt")["Body"].read() == b"env"


@s3
def test_s3_sees_changes_made_through_another_client(s3_server, s3_storage, s3_bucket):
    uri = f"s3://{s3_bucket}/data/x.bin"
    storage.write_bytes(uri, b"short", s3_storage)
    assert storage.exists(uri, s3_storage)
    assert storage.exists(f"s3://{s3_bucket}/data", s3_storage)  # lists the folder
    s3_server.put(s3_bucket, "data/y.bin", b"new")  # written behind our back ...
    assert storage.exists(f"s3://{s3_bucket}/data/y.bin", s3_storage)  # ... and seen at once
    s3_server.put(s3_bucket, "data/x.bin", b"a much longer replacement")
    assert storage.read_bytes(uri, s3_storage) == b"a much longer replacement"
    s3_server.delete(s3_bucket, "data/x.bin")
    assert not storage.exists(uri, s3_storage)
    with pytest.raises(StorageError, match="no such file"):
        storage.read_bytes(uri, s3_storage)


# --------------------------------------------------------------------------------------------
# staging remote files into the local cache


@s3
def test_stage_local_copies_a_remote_file_once(s3_server, s3_storage, s3_bucket, tmp_cache):
    uri = f"s3://{s3_bucket}/models/clip/open_clip_model.safetensors"
    s3_server.put(s3_bucket, "models/clip/open_clip_model.safetensors", b"weights" * 100)
    path = storage.stage_local(uri, s3_storage)
    assert path.is_file() and path.name == "open_clip_model.safetensors"
    assert path.read_bytes() == b"weights" * 100
    assert tmp_cache in path.parents
    s3_server.delete(s3_bucket, "models/clip/open_clip_model.safetensors")
    assert not storage.exists(uri, s3_storage)
    assert storage.stage_local(uri, s3_storage) == path  # reused: the object is gone remotely
    assert path.read_bytes() == b"weights" * 100
    assert not [p for p in (tmp_cache / "remote").iterdir() if p.name.startswith(".staging")]


@s3
def test_stage_local_copies_a_remote_folder_once(s3_server, s3_storage, s3_bucket, tmp_cache):
    files = {
        "config.json": b"{}",
        "tokenizer/vocab.txt": b"[PAD]\n[UNK]\n",
        "tokenizer/nested/deeper.bin": b"\x01\x02",
    }
    for rel, body in files.items():
        s3_server.put(s3_bucket, f"models/bert/{rel}", body)
    s3_server.put(s3_bucket, "models/bert-other/decoy.txt", b"not part of the folder")
    uri = f"s3://{s3_bucket}/models/bert/"
    folder = storage.stage_local(uri, s3_storage)
    assert folder.is_dir() and folder.name == "bert"
    staged = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert staged == files
    for rel in files:
        s3_server.delete(s3_bucket, f"models/bert/{rel}")
    assert storage.stage_local(uri, s3_storage) == folder  # reused without the remote copy
    assert storage.stage_local(uri.rstrip("/"), s3_storage) == folder  # trailing slash: same entry
    assert {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} == set(files)


@s3
def test_stage_local_of_a_missing_object_fails_and_caches_nothing(s3_storage, s3_bucket, tmp_cache):
    uri = f"s3://{s3_bucket}/models/absent/"
    with pytest.raises(StorageError, match="no such file") as info:
        storage.stage_local(uri, s3_storage)
    assert uri in str(info.value)
    assert list((tmp_cache / "remote").iterdir()) == []


@s3
def test_stage_local_keys_the_cache_by_endpoint(s3_server, s3_storage, s3_bucket, monkeypatch):
    monkeypatch.setitem(storage.S3_CLIENT_CONFIG, "retries", {"max_attempts": 1, "mode": "standard"})
    s3_server.put(s3_bucket, "w.bin", b"A")
    here = storage.stage_local(f"s3://{s3_bucket}/w.bin", s3_storage)
    dead = f"http://127.0.0.1:{free_port()}"
    elsewhere = s3_storage.model_copy(update={"endpoint_url": dead})
    other = storage.storage_options(f"s3://{s3_bucket}/w.bin", elsewhere)
    assert other["client_kwargs"]["endpoint_url"] == dead
    # same URI on another S3 service is another object: never served from this cache entry
    with pytest.raises(StorageError):
        storage.stage_local(f"s3://{s3_bucket}/w.bin", elsewhere)
    assert here.read_bytes() == b"A"


# --------------------------------------------------------------------------------------------
# errors: clear, naming the URI


@s3
def test_missing_bucket(s3_storage):
    uri = "s3://no-such-bucket-bimors/models/w.bin"
    for call in (
        lambda: storage.read_bytes(uri, s3_storage),
        lambda: storage.write_bytes(uri, b"x", s3_storage),
        lambda: storage.exists(uri, s3_storage),  # a typo'd bucket is not "file not there yet"
        lambda: storage.stage_local(uri, s3_storage),
    ):
        with pytest.raises(StorageError, match="bucket does not exist") as info:
            call()
        assert uri in str(info.value)
    assert storage.exists("s3://no-such-bucket-bimors", s3_storage) is False


@s3
def test_missing_key(s3_storage, s3_bucket):
    uri = f"s3://{s3_bucket}/nothing/here.bin"
    with pytest.raises(StorageError, match="no such file or key") as info:
        storage.read_bytes(uri, s3_storage)
    assert str(info.value).startswith(uri)
    assert storage.exists(uri, s3_storage) is False


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("foo://bucket/key", "unsupported or malformed URI"),
        ("s3:/bucket/key", "malformed URI"),
        ("s3:bucket/key", "malformed URI"),
        ("s3://", "no bucket name"),
        ("s3:///key", "no bucket name"),
        ("://bucket/key", "malformed URI"),
        ("my data://bucket/key", "malformed URI"),
        ("", "malformed URI"),
    ],
)
def test_bad_uris_are_refused_with_the_uri_in_the_message(uri, reason):
    cfg = StorageConfig(key="testing", secret="testing")
    for call in (
        lambda: storage.read_bytes(uri, cfg),
        lambda: storage.write_bytes(uri, b"x", cfg),
        lambda: storage.exists(uri, cfg),
        lambda: storage.stage_local(uri, cfg),
    ):
        with pytest.raises(StorageError, match=reason) as info:
            call()
        assert uri in str(info.value)


@s3
def test_invalid_bucket_name(s3_storage):
    uri = "s3://Not A Bucket!/key"
    with pytest.raises(StorageError, match="invalid bucket name") as info:
        storage.read_bytes(uri, s3_storage)
    assert uri in str(info.value)


@s3
def test_missing_credentials(s3_server, s3_bucket, monkeypatch, tmp_cache):
    # conftest removed every AWS_* credential variable and pointed the config files at /dev/null;
    # make sure nothing crept back, so botocore finds no credentials at all (a client-side error:
    # moto would accept any signature)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    s3_server.client().put_object(Bucket=s3_bucket, Key="w.bin", Body=b"x", ACL="public-read")
    cfg = StorageConfig(endpoint_url=s3_server.endpoint_url, region=REGION, cache_dir=str(tmp_cache))
    uri = f"s3://{s3_bucket}/w.bin"
    for call in (
        lambda: storage.read_bytes(uri, cfg),
        lambda: storage.write_bytes(uri, b"y", cfg),
        lambda: storage.exists(uri, cfg),
        lambda: storage.exists(f"s3://{s3_bucket}", cfg),
        lambda: storage.stage_local(uri, cfg),
    ):
        with pytest.raises(StorageError, match="no credentials") as info:
            call()
        assert str(info.value).startswith("s3://" + s3_bucket)
        assert "AWS_ACCESS_KEY_ID" in str(info.value)  # says how to fix it
    # a public object needs none: anonymous (unsigned) requests go through
    assert storage.read_bytes(uri, cfg.model_copy(update={"anonymous": True})) == b"x"


def test_half_configured_credentials_are_an_error():
    with pytest.raises(StorageError, match="storage.secret is not set") as info:
        storage.read_bytes("s3://bucket/key", StorageConfig(key="testing"))
    assert "s3://bucket/key" in str(info.value)
    with pytest.raises(StorageError, match="storage.key is not set"):
        storage.exists("s3://bucket/key", StorageConfig(secret="testing"))


@s3
def test_unreachable_endpoint_fails_fast(tmp_cache):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    cfg = StorageConfig(endpoint_url=endpoint, region=REGION, key="testing", secret="testing")
    uri = "s3://some-bucket/w.bin"
    start = time.monotonic()
    with pytest.raises(StorageError, match="endpoint is unreachable") as info:
        storage.read_bytes(uri, cfg)
    assert time.monotonic() - start < 15  # a couple of quick retries, not minutes
    assert uri in str(info.value) and endpoint in str(info.value)


@s3
def test_unreachable_endpoint_is_not_reported_as_missing(monkeypatch):
    # one attempt only, to keep the test short; the message must not pretend the object is absent
    monkeypatch.setitem(storage.S3_CLIENT_CONFIG, "retries", {"max_attempts": 1, "mode": "standard"})
    cfg = StorageConfig(endpoint_url=f"http://127.0.0.1:{free_port()}", region=REGION, key="k", secret="s")
    for uri in ("s3://some-bucket/w.bin", "s3://some-bucket"):
        with pytest.raises(StorageError, match="endpoint is unreachable"):
            storage.exists(uri, cfg)
    with pytest.raises(StorageError, match="endpoint is unreachable"):
        storage.write_bytes("s3://some-bucket/w.bin", b"x", cfg)


# --------------------------------------------------------------------------------------------
# secrets


KEY = "AKIALEAKCHECK0000001"
SECRET = "s3cr3t/never+in+logs"


def test_credentials_stay_out_of_repr_and_dumps():
    cfg = StorageConfig(endpoint_url="http://127.0.0.1:9", key=KEY, secret=SECRET)
    shown = [
        repr(cfg),
        str(cfg),
        str(cfg.model_dump()),
        cfg.model_dump_json(),
        str(cfg.model_dump(mode="json")),
        repr(Config(storage=cfg)),
        str(flatten(Config(storage=cfg))),  # what MLflow params and checkpoint JSON are made from
    ]
    for text in shown:
        assert KEY not in text and SECRET not in text, text
    assert cfg.key.get_secret_value() == KEY  # still usable where it is needed


@s3
def test_credentials_stay_out_of_error_messages(s3_server, s3_bucket, monkeypatch, tmp_cache):
    monkeypatch.setitem(storage.S3_CLIENT_CONFIG, "retries", {"max_attempts": 1, "mode": "standard"})
    good = StorageConfig(
        endpoint_url=s3_server.endpoint_url, region=REGION, key=KEY, secret=SECRET, cache_dir=str(tmp_cache)
    )
    dead = good.model_copy(update={"endpoint_url": f"http://127.0.0.1:{free_port()}"})
    failures = [
        lambda: storage.read_bytes(f"s3://{s3_bucket}/missing", good),
        lambda: storage.read_bytes("s3://no-such-bucket-bimors/x", good),
        lambda: storage.write_bytes("s3://no-such-bucket-bimors/x", b"x", good),
        lambda: storage.stage_local(f"s3://{s3_bucket}/missing/", good),
        lambda: storage.read_bytes("s3://Not A Bucket!/x", good),
        lambda: storage.read_bytes(f"s3://{s3_bucket}/x", dead),
        lambda: storage.read_bytes("foo://bucket/x", good),
    ]
    for call in failures:
        with pytest.raises(StorageError) as info:
            call()
        message = str(info.value)
        assert KEY not in message and SECRET not in message, message
        assert KEY not in repr(info.value) and SECRET not in repr(info.value)


@s3
def test_concurrent_stagers_all_get_one_complete_copy(s3_server, s3_storage, s3_bucket, tmp_cache):
    from concurrent.futures import ThreadPoolExecutor

    files = {f"shard-{i}.bin": bytes([i]) * 2048 for i in range(6)}
    for rel, body in files.items():
        s3_server.put(s3_bucket, f"ckpt/{rel}", body)
    uri = f"s3://{s3_bucket}/ckpt"
    with ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(lambda _: storage.stage_local(uri, s3_storage), range(8)))
    assert len(set(paths)) == 1
    assert {p.name: p.read_bytes() for p in paths[0].iterdir()} == files
    assert [p.name for p in (tmp_cache / "remote").iterdir()] == [paths[0].parent.name]
