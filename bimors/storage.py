"""Object storage through fsspec: local paths, ``file://`` and ``s3://`` (s3fs).

One place turns a URI plus :class:`~bimors.config.StorageConfig` into a filesystem, and turns the
many ways a bucket can fail (no such bucket, no key, no credentials, endpoint down) into one clear
message that names the URI. Remote model files are copied once into a local cache because the
libraries that load them (open_clip, transformers) want local paths.

Every helper here talks to the store directly: s3fs' directory-listing cache is switched off, so an
object written, replaced or deleted by another process or client is seen at once.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from bimors.config import StorageConfig
from bimors.errors import BimorsError


class StorageError(BimorsError, OSError):
    """A URI could not be read or written; the message says which and why."""


# botocore settings for every S3 client made here. Connection failures are retried a couple of
# times (standard mode: jittered exponential back-off, at most a few seconds in all) and then
# reported, instead of botocore's legacy 5 attempts and s3fs' 60 s default timeouts.
S3_CLIENT_CONFIG: dict[str, Any] = {
    "connect_timeout": 10,
    "read_timeout": 60,
    "retries": {"max_attempts": 3, "mode": "standard"},
}

#: s3fs' own retry rounds around botocore's attempts (see :func:`filesystem`).
S3FS_RETRIES = 2

_S3_SCHEMES = ("s3", "s3a")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str) -> Path:
    """Local path of a local URI (plain path, ``~``, ``file:///abs`` or ``file:/abs``); a malformed
    remote URI (``s3:/bucket``) is an error here rather than a local folder of that name."""
    _check_uri(uri)
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    elif uri.startswith("file:/"):
        uri = uri[len("file:") :]
    return Path(os.path.expanduser(uri))


def _check_uri(uri: str) -> None:
    """Reject URIs that fsspec would misread (``s3:/bucket/key`` silently becomes a local path,
    ``s3:///key`` an opaque s3fs error) with a message that says what the URI should look like."""
    if not isinstance(uri, str) or not uri.strip():
        raise StorageError(f"{uri!r}: malformed URI (empty)")
    if "://" in uri:
        scheme, _, rest = uri.partition("://")
        if not _SCHEME.fullmatch(scheme + ":"):
            raise StorageError(f"{uri}: malformed URI (bad scheme {scheme!r}; expected e.g. s3://bucket/key)")
        if scheme.lower() in _S3_SCHEMES:
            bucket = rest.split("/", 1)[0]
            if not bucket:
                raise StorageError(f"{uri}: malformed URI (no bucket name; expected {scheme}://bucket/key)")
        return
    match = _SCHEME.match(uri)
    if match and len(match.group(1)) > 1:  # one letter is a Windows drive, not a scheme
        scheme = match.group(1).lower()
        if scheme == "file" and uri.startswith("file:/"):
            return  # file:/abs/path is a valid (RFC 8089) local file URI
        if scheme in fsspec.available_protocols() or scheme in _S3_SCHEMES:
            raise StorageError(f"{uri}: malformed URI (expected {scheme}://...)")


def storage_options(uri: str, cfg: StorageConfig | None) -> dict[str, Any]:
    """fsspec keyword arguments for ``uri``'s protocol; empty for local files.

    For S3 this always disables s3fs' listing cache and bounds timeouts/retries; endpoint, region
    and credentials come from ``cfg`` where set, else from the standard AWS chain."""
    if not uri.lower().startswith(tuple(f"{s}://" for s in _S3_SCHEMES)):
        return {}
    opts: dict[str, Any] = {
        "use_listings_cache": False,
        "config_kwargs": {**S3_CLIENT_CONFIG, "retries": dict(S3_CLIENT_CONFIG["retries"])},
    }
    if cfg is None:
        return opts
    client: dict[str, Any] = {}
    if cfg.endpoint_url:
        client["endpoint_url"] = cfg.endpoint_url
    if cfg.region:
        client["region_name"] = cfg.region
    if client:
        opts["client_kwargs"] = client
    if cfg.anonymous:
        opts["anon"] = True
    if (cfg.key is None) != (cfg.secret is None):
        missing = "storage.secret" if cfg.secret is None else "storage.key"
        raise StorageError(f"{uri}: incomplete credentials: {missing} is not set (set both, or neither)")
    if cfg.key is not None and cfg.secret is not None:
        opts["key"] = cfg.key.get_secret_value()
        opts["secret"] = cfg.secret.get_secret_value()
    return opts


def filesystem(uri: str, cfg: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URI or local path."""
    _check_uri(uri)
    if not is_remote(uri):
        uri = str(local_path(uri))
    try:
        fs, path = url_to_fs(uri, **storage_options(uri, cfg))
    except StorageError:
        raise
    except (ImportError, ValueError) as err:
        raise StorageError(_redact(f"{uri}: unsupported or malformed URI ({err})", cfg)) from None
    if hasattr(fs, "retries"):
        # s3fs retries each call 5 times around botocore's own attempts, nested: a dropped connection
        # then costs ~200 requests and ~100 s before the error surfaces. Two rounds around
        # botocore's 3 jittered attempts still ride out a blip and fail within seconds.
        fs.retries = S3FS_RETRIES
    return fs, path


def _explain(uri: str, err: BaseException) -> StorageError:
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
    elif "partialcredentials" in name.lower():
        why = f"incomplete credentials ({text})"
    elif "nosuchbucket" in lowered or "bucket does not exist" in lowered:
        why = "the bucket does not exist"
    elif "invalid bucket name" in lowered:
        why = "malformed URI (invalid bucket name)"
    elif "could not connect" in lowered or "connect timeout" in lowered or "name or service" in lowered:
        why = f"the storage endpoint is unreachable ({text})"
    elif "read timeout" in lowered or "connection was closed" in lowered:
        why = f"the storage endpoint did not answer in time ({text})"
    elif isinstance(err, IsADirectoryError):
        why = "is a folder, not a file"
    elif isinstance(err, FileNotFoundError) or "nosuchkey" in lowered or "not found" in lowered:
        why = "no such file or key"
    elif "invalidaccesskeyid" in lowered or "signaturedoesnotmatch" in lowered:
        why = f"the credentials were rejected ({text})"
    elif isinstance(err, PermissionError) or "accessdenied" in lowered or "forbidden" in lowered:
        why = f"access denied ({text})"
    else:
        why = f"{name}: {text}"
    return StorageError(f"{uri}: {why}")


def _redact(message: str, cfg: StorageConfig | None) -> str:
    """Belt and braces: no configured key or secret ever reaches a message."""
    if cfg is not None:
        for secret in (cfg.key, cfg.secret):
            value = secret.get_secret_value() if secret is not None else ""
            if len(value) >= 6:  # shorter ones would mangle the message and cannot be real keys
                message = message.replace(value, "***")
    return message


def storage_error(uri: str, err: BaseException, cfg: StorageConfig | None = None) -> StorageError:
    """``err`` from a filesystem call about ``uri`` as the StorageError to raise: what went wrong, in
    words a user can act on, with configured credentials redacted (see :func:`translated_errors`)."""
    explained = _explain(uri, err)
    message = _redact(str(explained), cfg)
    return explained if message == str(explained) else StorageError(message)


@contextmanager
def translated_errors(uri: str, cfg: StorageConfig | None = None) -> Iterator[None]:
    """Around raw filesystem calls about ``uri``: whatever fsspec, s3fs or botocore raise comes out
    as one :class:`StorageError` naming the URI and the cause (configured credentials redacted).
    The one way this package wraps storage errors, so every message reads the same."""
    try:
        yield
    except StorageError:
        raise
    except Exception as err:  # noqa: BLE001 - every backend raises its own types
        raise storage_error(uri, err, cfg) from err


def exists(uri: str, cfg: StorageConfig | None = None) -> bool:
    """Whether a file, folder (prefix with objects) or bucket exists. A missing key in an existing
    bucket is ``False``; a bucket that does not exist, missing credentials or an unreachable
    endpoint raise :class:`StorageError` rather than passing for "not there"."""
    fs, path = filesystem(uri, cfg)
    try:
        fs.info(path)
        return True
    except FileNotFoundError:
        pass
    except Exception as err:  # noqa: BLE001 - every backend raises its own types
        raise storage_error(uri, err, cfg) from err
    if is_remote(uri) and "/" in path.strip("/"):
        bucket = path.strip("/").split("/", 1)[0]
        try:
            fs.info(bucket)
        except FileNotFoundError as err:
            raise StorageError(_redact(f"{uri}: the bucket does not exist", cfg)) from err
        except Exception:  # noqa: BLE001 - e.g. no ListBucket permission: the key is simply absent
            pass
    return False


def read_bytes(uri: str, cfg: StorageConfig | None = None) -> bytes:
    fs, path = filesystem(uri, cfg)
    with translated_errors(uri, cfg):
        return fs.cat_file(path)


def _read_umask() -> int:
    umask = os.umask(0o022)  # the only portable way to read it; done once, at import
    os.umask(umask)
    return umask


_NEW_FILE_MODE = 0o666 & ~_read_umask()


def _replace_local(target: Path, fill: Callable[[BinaryIO], None]) -> None:
    """Write a local file through a temporary beside it and rename it into place, so readers
    never see half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            fill(handle)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates 0600 files; give the result the mode a plain open() would
        os.chmod(tmp, target.stat().st_mode & 0o7777 if target.exists() else _NEW_FILE_MODE)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(uri: str, data: bytes, cfg: StorageConfig | None = None) -> None:
    """Write a whole object; local files are replaced atomically so readers never see half a file."""
    fs, path = filesystem(uri, cfg)
    with translated_errors(uri, cfg):
        if not is_remote(uri):
            _replace_local(Path(path), lambda handle: handle.write(data))
        else:
            fs.pipe_file(path, bytes(data))


def write_parquet(uri: str, table: pa.Table, cfg: StorageConfig | None = None, row_group_size: int | None = None) -> None:
    """One Parquet file (zstd), written whole like :func:`write_bytes`."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", row_group_size=row_group_size)
    write_bytes(uri, buffer.getvalue(), cfg)


def put_file(local: str | Path, uri: str, cfg: StorageConfig | None = None) -> None:
    """Copy a local file to ``uri`` without reading it into memory (outputs can be large);
    local targets are replaced atomically like :func:`write_bytes`."""
    fs, path = filesystem(uri, cfg)
    with translated_errors(uri, cfg):
        if not is_remote(uri):
            with open(local, "rb") as source:
                _replace_local(Path(path), lambda handle: shutil.copyfileobj(source, handle))
        else:
            fs.put_file(str(local), path)


def move(uri: str, target: str, cfg: StorageConfig | None = None) -> None:
    """Move one object or file within one filesystem (local: a rename; S3: copy, then delete)."""
    fs, path = filesystem(uri, cfg)
    _, target_path = filesystem(target, cfg)
    with translated_errors(uri, cfg):
        if not is_remote(uri):
            Path(target_path).parent.mkdir(parents=True, exist_ok=True)
        fs.mv(path, target_path)


def join(uri: str, *parts: str) -> str:
    """``join("s3://b/models/", "clip", "w.bin") == "s3://b/models/clip/w.bin"``; empty parts are skipped."""
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts if p.strip("/"))])


def stage_local(uri: str, cfg: StorageConfig | None = None) -> Path:
    """A local path holding ``uri`` (a file or a folder); remote objects are copied once into
    ``storage.cache_dir`` and reused, keyed by the endpoint and the URI (published atomically, see
    :func:`publish_folder`)."""
    if not is_remote(uri):
        _check_uri(uri)
        return local_path(uri)
    cfg = cfg or StorageConfig()
    fs, path = filesystem(uri, cfg)
    cache_root = Path(os.path.expanduser(cfg.cache_dir)) / "remote"
    ident = uri.rstrip("/") if not cfg.endpoint_url else f"{cfg.endpoint_url.rstrip('/')} {uri.rstrip('/')}"
    name = uri.rstrip("/").rsplit("/", 1)[-1] or "object"

    def download(staging: Path) -> None:
        if fs.info(path)["type"] == "directory":
            fs.get(path.rstrip("/") + "/", str(staging / name), recursive=True)
            (staging / name).mkdir(exist_ok=True)
        else:
            fs.get(path, str(staging / name))
        if not (staging / name).exists():
            raise FileNotFoundError(uri)

    with translated_errors(uri, cfg):
        entry = publish_folder(cache_root / hashlib.sha256(ident.encode()).hexdigest()[:16], download)
    return entry / name


COMPLETE = ".complete"  # marks a published folder as whole (publish_folder)


def publish_folder(target: Path, fill: Callable[[Path], None]) -> Path:
    """``target``, built once: ``fill(staging)`` writes into a fresh folder beside it, which is then
    renamed into place, so no reader ever sees a partial folder. The one "stage then publish" of
    this package (remote copies, MLflow downloads, models built on first use).

    A complete ``target`` (holding the ``.complete`` marker) is used as it is; when several workers
    race, the first rename wins and the others keep the winner's copy; an incomplete leftover (a
    killed run) is replaced."""
    if (target / COMPLETE).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.staging-"))
    try:
        fill(staging)
        (staging / COMPLETE).touch()
        for _ in range(3):
            try:
                os.rename(staging, target)
                return target
            except OSError:
                if (target / COMPLETE).exists():
                    return target
                shutil.rmtree(target, ignore_errors=True)
        os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def pyarrow_filesystem(uri: str, cfg: StorageConfig | None = None):
    """(pyarrow filesystem or None, path) for libraries that take pyarrow filesystems (Ray Train's
    storage): local URIs become absolute paths, remote ones go through the same fsspec settings
    (endpoint, credentials) as everything else here."""
    if not is_remote(uri):
        return None, str(local_path(uri).resolve())
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = filesystem(uri, cfg)
    return PyFileSystem(FSSpecHandler(fs)), path
