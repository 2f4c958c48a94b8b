"""The endpoint's scene-URL allow-list on its own (no server): prefixes, traversal, symlinks,
schemes, and config validation. The HTTP behaviour is in test_serve.py."""

from __future__ import annotations

import os

import pytest

from bimors.config import ConfigError, load_config
from bimors.serve.scene_sources import REFUSED, SceneSourceRefused, SceneSources


@pytest.fixture
def allowed(tmp_path):
    scenes = tmp_path / "scenes"
    (scenes / "2026").mkdir(parents=True)
    (scenes / "2026" / "a.tif").write_bytes(b"II*\x00")
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key.tif").write_bytes(b"II*\x00")
    (scenes / "escape.tif").symlink_to(secret / "key.tif")
    (scenes / "outside").symlink_to(secret, target_is_directory=True)
    return tmp_path, SceneSources([f"{scenes}/", "s3://acquisitions/daily/", "https://tiles.example.org/cogs"])


def refused(sources: SceneSources, uri: str) -> bool:
    try:
        sources.check(uri)
    except SceneSourceRefused as err:
        assert str(err) == REFUSED  # one message whatever the reason
        return True
    return False


def test_urls_under_a_listed_prefix_are_allowed(allowed):
    tmp, sources = allowed
    assert sources.check(str(tmp / "scenes" / "2026" / "a.tif")) == str((tmp / "scenes" / "2026" / "a.tif").resolve())
    assert sources.check(f"file://{tmp}/scenes/2026/a.tif") == str((tmp / "scenes" / "2026" / "a.tif").resolve())
    assert sources.check("s3://acquisitions/daily/2026-11-30/S2A.tif") == "s3://acquisitions/daily/2026-11-30/S2A.tif"
    assert sources.check("S3://Acquisitions/daily/x.tif")  # scheme and bucket/host compare case-insensitively
    assert sources.check("https://tiles.example.org/cogs/x.tif")
    # a path inside the allowed folder that does not exist is allowed (opening it then says "no such file")
    assert sources.check(str(tmp / "scenes" / "missing.tif")).endswith("missing.tif")


@pytest.mark.parametrize("uri", [
    "/etc/passwd",
    "file:///etc/passwd",
    "file:/etc/passwd",
    "etc/passwd",  # relative: would depend on the server's working directory
    "~/.ssh/id_rsa",
    "http://127.0.0.1:8000/health",
    "http://169.254.169.254/latest/meta-data/",
    "https://tiles.example.org/other/x.tif",
    "https://tiles.example.org.evil.com/cogs/x.tif",
    "https://tiles.example.org@evil.com/cogs/x.tif",
    "https://user@tiles.example.org/cogs/x.tif",
    "https://tiles.example.org/cogs/x.tif?redirect=http://169.254.169.254/",
    "https://tiles.example.org/cogs/../secrets/x.tif",
    "https://tiles.example.org/cogs",  # the prefix itself is a folder, not a scene
    "http://tiles.example.org/cogs/x.tif",  # another scheme
    "s3://acquisitions/dailyx/a.tif",  # not on a segment boundary
    "s3://acquisitions/daily/../private/a.tif",
    "s3://acquisitions/daily//a.tif",
    "s3://acquisitions-other/daily/a.tif",
    "s3://other-bucket/daily/a.tif",
    "gs://acquisitions/daily/a.tif",
    "s3://acquisitions/daily/a.tif#frag",
    "",
    "s3://acquisitions/daily/a\x00.tif",
])
def test_everything_else_is_refused_with_one_message(allowed, uri):
    _, sources = allowed
    assert refused(sources, uri)


def test_local_paths_are_judged_after_resolving_dotdot_and_symlinks(allowed):
    tmp, sources = allowed
    scenes = tmp / "scenes"
    assert refused(sources, f"{scenes}/../secret/key.tif")
    assert refused(sources, f"{scenes}/2026/../../secret/key.tif")
    assert refused(sources, str(scenes / "escape.tif"))  # a symlink out of the allowed folder
    assert refused(sources, str(scenes / "outside" / "key.tif"))  # through a symlinked folder
    assert refused(sources, str(scenes))  # the folder itself
    assert refused(sources, f"{tmp}/scenes-evil/a.tif")  # a sibling sharing the prefix's characters
    # what is opened is the resolved path that was checked, not the string that was sent
    assert sources.check(f"{scenes}/2026/../2026/a.tif") == str((scenes / "2026" / "a.tif").resolve())


def test_an_empty_list_allows_nothing(allowed):
    tmp, _ = allowed
    nothing = SceneSources([])
    for uri in (str(tmp / "scenes" / "2026" / "a.tif"), "s3://acquisitions/daily/a.tif", "https://tiles.example.org/cogs/x.tif"):
        assert refused(nothing, uri)


def test_an_allowed_folder_reached_through_a_symlink_still_works(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "a.tif").write_bytes(b"II*\x00")
    os.symlink(real, tmp_path / "link")
    sources = SceneSources([str(tmp_path / "link")])  # the listed prefix is resolved too
    assert sources.check(str(real / "a.tif")) == str((real / "a.tif").resolve())
    assert sources.check(str(tmp_path / "link" / "a.tif")) == str((real / "a.tif").resolve())


def test_config_default_is_uploads_only_and_bad_prefixes_fail_with_the_key():
    assert load_config(None).serve.scene_sources == []
    assert load_config(None, ["serve.scene_sources=[s3://bucket/scenes/, /data/scenes]"]).serve.scene_sources == [
        "s3://bucket/scenes/", "/data/scenes"]
    for bad in ("[relative/folder]", "[s3://bucket/../x]", "['https://u@host/x']", "[s3://]"):
        with pytest.raises(ConfigError, match="serve.scene_sources"):
            load_config(None, [f"serve.scene_sources={bad}"])
