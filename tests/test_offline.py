"""Nothing in the model code reaches the network unless a config names a hub model."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from bimors.config import load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_network(monkeypatch):
    """Any name lookup or connection beyond loopback fails at once (and is recorded)."""
    attempts: list[object] = []
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1")) or self.family == socket.AF_UNIX:
            return real_connect(self, address)
        attempts.append(address)
        raise OSError(f"network access attempted to {address}")

    real_getaddrinfo = socket.getaddrinfo

    def resolve(host, *args, **kwargs):
        if host in (None, "localhost") or str(host).startswith("127.") or host == "::1":
            return real_getaddrinfo(host, *args, **kwargs)
        attempts.append(host)
        raise socket.gaierror(f"name resolution attempted for {host}")

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    return attempts


def test_quickstart_models_build_and_load_with_no_network(tmp_path, no_network, monkeypatch):
    """The test session runs with HF_HUB_OFFLINE=1; here the hub client believes it is online, so
    any attempt to reach a hub would show up as a blocked connection."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    from bimors.models.caption_encoder import CaptionEncoder
    from bimors.models.captioner import Captioner
    from bimors.models.clip_backbone import FrozenCLIP

    cfg = load_config(
        REPO / "configs" / "quickstart.yaml",
        [f"model.backbone.name={tmp_path}/clip", f"model.captioner.name={tmp_path}/blip2"],
    )
    FrozenCLIP.load(cfg.model.backbone)
    Captioner.load(cfg.model.captioner)
    CaptionEncoder.load(cfg.model.caption_encoder)
    assert no_network == []
    assert (tmp_path / "clip" / "open_clip_model.safetensors").is_file() and (tmp_path / "blip2" / "config.json").is_file()


def test_the_guard_does_see_network_access(no_network):
    """Proof that the test above could fail: an HTTP request to the hub is caught by the guard."""
    import urllib.request

    with pytest.raises(OSError):
        urllib.request.urlopen("https://huggingface.co/api/models/bert-base-uncased", timeout=5)
    assert no_network == ["huggingface.co"]
