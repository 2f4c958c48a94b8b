"""`python workflows/serve.py` as the README runs it: the quickstart config comes up on this 2-CPU
machine (its own local Ray, nothing else running in it) and answers /health; a deployment the
cluster cannot place ends the command within serve.startup_timeout_s with one line that names it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from s3_server import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"


def serve_command(model_dir: Path, checkpoint: Path, port: int, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "workflows" / "serve.py"), "--config", str(QUICKSTART), "--model", str(checkpoint),
            f"model.backbone.name={model_dir / 'clip-tiny'}", f"model.captioner.name={model_dir / 'blip2-tiny'}",
            f"storage.cache_dir={model_dir / 'cache'}", "serve.host=127.0.0.1", f"serve.port={port}", *extra]


def own_ray_env(tmp_path: Path) -> dict[str, str]:
    """The command starts its own local Ray (no RAY_ADDRESS), sized to this machine, as on a laptop."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return env | {"BIMORS_LOG_DIR": str(tmp_path / "logs")}


def test_quickstart_serve_comes_up_on_two_cpus_and_answers_health(tmp_path, model_dir, learner_checkpoint):
    port = free_port()
    started = time.monotonic()
    proc = subprocess.Popen(serve_command(model_dir, learner_checkpoint, port), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=own_ray_env(tmp_path), start_new_session=True)
    printed: list[str] = []
    reader = threading.Thread(target=lambda: printed.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        healthy_after = None
        while time.monotonic() - started < 120 and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    healthy_after = time.monotonic() - started
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert proc.poll() is None, proc.communicate(timeout=30)
        assert healthy_after is not None and healthy_after < 60, f"/health answered after {healthy_after} s"
        model = httpx.get(f"http://127.0.0.1:{port}/model", timeout=30).json()  # the models are loaded too
        assert model["method"] == "bimors" and model["classes"]
        while not printed and time.monotonic() - started < 120:  # the command says so once serve.run returned
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)  # what `kill` and container runtimes send: a clean shutdown
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(timeout=10)
        err = proc.stderr.read()
    assert proc.returncode == 0, err
    out = "".join(printed)
    assert f"serving {learner_checkpoint} on http://127.0.0.1:{port}" in out, out + err
    assert "uploads only" in out  # the quickstart opens no scene URLs
    assert len((out + err).strip().splitlines()) <= 5, out + err  # Ray's chatter is in the log file


def test_a_deployment_the_cluster_cannot_place_fails_in_bounded_time_with_one_line(tmp_path, model_dir, learner_checkpoint):
    started = time.monotonic()
    done = subprocess.run(serve_command(model_dir, learner_checkpoint, free_port(), "serve.classifier.num_cpus=512",
                                        "serve.startup_timeout_s=20"),
                          capture_output=True, text=True, env=own_ray_env(tmp_path), timeout=240)
    elapsed = time.monotonic() - started
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "Classifier (serve.classifier: 1 replica(s) x 512 CPU)" in lines[0]
    assert re.search(r"the cluster has \d+ CPU in all, [\d.]+ CPU free", lines[0]) and "startup_timeout_s=20" in lines[0]
    assert "Captioner" not in lines[0]  # only the deployment that is waiting is named
    assert elapsed < 20 + 90, elapsed  # the deadline plus starting Ray and the models
