"""Which scene URLs the endpoint may open: an allow-list of URI prefixes (``serve.scene_sources``).

A scene URL in a request is attacker-controlled. Without a list, the server would open any raster
on its own disk, any bucket its credentials reach and any HTTP address (the cloud metadata
service, services on loopback), and its error messages would tell a caller which server paths
exist. So a URL is opened only when it falls under a listed prefix, judged on the URL alone,
before anything is read:

* remote URLs (``s3://``, ``https://``, ...): same scheme, same host/bucket, and the prefix's path
  segments are the first segments of the URL's path; no ``.``/``..``/empty segments, no user info,
  query or fragment (they could make the opened object differ from the checked string);
* local paths (plain, ``~`` or ``file://``): allowed only under a listed local prefix, compared after
  resolving ``..`` and symlinks on both sides; what is opened is the resolved path that was checked.

Every refusal raises :class:`SceneSourceRefused` with one fixed message, whatever the reason, so a
refusal never reveals whether something exists on the server.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
from urllib.parse import urlsplit

from bimors.errors import BimorsError

REFUSED = "scene URL not allowed: this endpoint only opens URLs under its configured scene sources (serve.scene_sources)"


class SceneSourceRefused(BimorsError):
    """The URL is not under any allowed prefix (the message is the same for every refusal)."""

    def __init__(self) -> None:
        super().__init__(REFUSED)


@dataclass(frozen=True)
class _Remote:
    scheme: str
    host: str
    segments: tuple[str, ...]


def _is_local(uri: str) -> bool:
    return uri.lower().startswith("file:") or "://" not in uri


def _local_path(uri: str) -> str:
    if uri.lower().startswith("file://"):
        uri = uri[len("file://"):]
    elif uri.lower().startswith("file:"):
        uri = uri[len("file:"):]
    return os.path.expanduser(uri)


def _remote(uri: str) -> _Remote | None:
    """The URL's scheme, host and path segments, or ``None`` when it has anything that could make
    the object opened differ from the string checked."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return None
    if not parts.scheme or not parts.netloc or parts.query or parts.fragment or "@" in parts.netloc:
        return None
    if "\\" in uri or any(ord(ch) < 32 or ch == "\x7f" for ch in uri):
        return None
    segments = parts.path.split("/")[1:] if parts.path else []
    if segments and segments[-1] == "":
        segments = segments[:-1]  # a trailing slash names a folder
    if any(s in ("", ".", "..") for s in segments):
        return None
    return _Remote(parts.scheme.lower(), parts.netloc.lower(), tuple(segments))


def validate_prefix(prefix: str) -> str:
    """The prefix as stored, or ``ValueError`` saying what a prefix must look like (config check)."""
    if _is_local(prefix):
        if not os.path.isabs(_local_path(prefix)):
            raise ValueError(f"scene source {prefix!r}: a local prefix must be an absolute path (or file:///...)")
        return prefix
    if _remote(prefix) is None:
        raise ValueError(f"scene source {prefix!r}: expected scheme://host-or-bucket/optional/path/ with no '..', query or user info")
    return prefix


class SceneSources:
    """The allow-list of one endpoint; :meth:`check` turns a requested URL into the one to open."""

    def __init__(self, prefixes: Sequence[str]):
        self.local = [Path(os.path.realpath(_local_path(p))) for p in prefixes if _is_local(p)]
        self.remote = [r for p in prefixes if not _is_local(p) and (r := _remote(p)) is not None]

    def check(self, uri: str) -> str:
        """The URI to open (for local files: the resolved real path), or :class:`SceneSourceRefused`."""
        if not isinstance(uri, str) or not uri or "\x00" in uri:
            raise SceneSourceRefused()
        if _is_local(uri):
            return self._check_local(uri)
        wanted = _remote(uri)
        if wanted is None:
            raise SceneSourceRefused()
        for allowed in self.remote:
            if (wanted.scheme, wanted.host) == (allowed.scheme, allowed.host) and \
                    wanted.segments[: len(allowed.segments)] == allowed.segments and len(wanted.segments) > len(allowed.segments):
                return uri
        raise SceneSourceRefused()

    def _check_local(self, uri: str) -> str:
        path = _local_path(uri)
        if not self.local or not os.path.isabs(path):
            raise SceneSourceRefused()  # relative paths would depend on the server's working directory
        real = Path(os.path.realpath(path))
        if any(real != root and real.is_relative_to(root) for root in self.local):
            return str(real)
        raise SceneSourceRefused()
