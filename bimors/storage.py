"""Object storage through fsspec: local paths, ``file://`` and ``s3://`` (s3fs).

One place turns a URI plus :class:`~bimors.config.StorageConfig` into a filesystem, and turns the
many ways a bucket can fail (no such bucket, no key, no credentials) into one clear message that
names the URI. Remote model files are copied once into a local cache because the libraries that
load them (open_clip, transformers) want local paths.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from bimors.config import StorageConfig


class StorageError(OSError):
    """A URI could not be read or written; the message says which and why."""


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str) -> Path:
    """Local path of a local URI (plain path, ``~`` or ``file://``)."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return Path(os.path.expanduser(uri))


def storage_options(uri: str, cfg: StorageConfig | None) -> dict[str, Any]:
    """fsspec keyword arguments for ``uri``'s protocol; empty for local files."""
    if cfg is None or not uri.startswith(("s3://", "s3a://")):
        return {}
    opts: dict[str, Any] = {}
    client: dict[str, Any] = {}
    if cfg.endpoint_url:
        client["endpoint_url"] = cfg.endpoint_url
    if cfg.region:
        client["region_name"] = cfg.region
    if client:
        opts["client_kwargs"] = client
    if cfg.anonymous:
        opts["anon"] = True
    if cfg.key is not None and cfg.secret is not None:
        opts["key"] = cfg.key.get_secret_value()
        opts["secret"] = cfg.secret.get_secret_value()
    return opts


def filesystem(uri: str, cfg: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URI or local path."""
    if not is_remote(uri):
        uri = str(local_path(uri))
    try:
        return url_to_fs(uri, **storage_options(uri, cfg))
    except (ImportError, ValueError) as err:
        raise StorageError(f"cannot open {uri}: unsupported or malformed URI ({err})") from None


def explain(uri: str, err: BaseException) -> StorageError:
    """Turn an exception from fsspec/s3fs/botocore into a message a user can act on."""
    if isinstance(err, StorageError):
        return err
    name = type(err).__name__
    text = str(err) or name
    lowered = text.lower()
    if "nocredentials" in name.lower() or "unable to locate credentials" in lowered:
        why = (
            "no credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or a profile or IAM role), "
            "or storage.anonymous=true for a public bucket"
        )
    elif "nosuchbucket" in lowered or "bucket does not exist" in lowered:
        why = "the bucket does not exist"
    elif isinstance(err, FileNotFoundError) or "nosuchkey" in lowered or "not found" in lowered:
        why = "no such file or key"
    elif isinstance(err, PermissionError) or "accessdenied" in lowered or "forbidden" in lowered:
        why = f"access denied ({text})"
    elif "invalidaccesskeyid" in lowered or "signaturedoesnotmatch" in lowered:
        why = f"the credentials were rejected ({text})"
    elif "could not connect" in lowered or "connect timeout" in lowered or "name or service" in lowered:
        why = f"the storage endpoint is unreachable ({text})"
    else:
        why = f"{name}: {text}"
    return StorageError(f"{uri}: {why}")


def exists(uri: str, cfg: StorageConfig | None = None) -> bool:
    fs, path = filesystem(uri, cfg)
    try:
        return bool(fs.exists(path))
    except Exception as err:  # noqa: BLE001 - every backend raises its own types
        raise explain(uri, err) from err


def read_bytes(uri: str, cfg: StorageConfig | None = None) -> bytes:
    fs, path = filesystem(uri, cfg)
    try:
        with fs.open(path, "rb") as handle:
            return handle.read()
    except Exception as err:  # noqa: BLE001
        raise explain(uri, err) from err


def write_bytes(uri: str, data: bytes, cfg: StorageConfig | None = None) -> None:
    """Write a whole object; local files are replaced atomically so readers never see half a file."""
    fs, path = filesystem(uri, cfg)
    try:
        if not is_remote(uri):
            target = Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, target)
            return
        with fs.open(path, "wb") as handle:
            handle.write(data)
    except Exception as err:  # noqa: BLE001
        raise explain(uri, err) from err


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def stage_local(uri: str, cfg: StorageConfig | None = None) -> Path:
    """A local path holding ``uri`` (a file or a folder); remote objects are copied once into
    ``storage.cache_dir`` and reused, keyed by the URI."""
    if not is_remote(uri):
        return local_path(uri)
    cache_root = Path(os.path.expanduser(cfg.cache_dir if cfg else StorageConfig().cache_dir))
    key = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    name = uri.rstrip("/").rsplit("/", 1)[-1] or "object"
    target = cache_root / "remote" / key / name
    done = target.parent / ".complete"
    if done.exists():
        return target
    fs, path = filesystem(uri, cfg)
    staging = Path(tempfile.mkdtemp(dir=_ensure(cache_root / "remote"), prefix=".staging-"))
    try:
        if fs.isdir(path):
            fs.get(path.rstrip("/") + "/", str(staging / name), recursive=True)
        else:
            fs.get(path, str(staging / name))
        if not (staging / name).exists():
            raise FileNotFoundError(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        os.replace(staging / name, target)
        done.touch()
    except Exception as err:  # noqa: BLE001
        raise explain(uri, err) from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
