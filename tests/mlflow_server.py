"""A real MLflow tracking server for tests: ``mlflow server`` on loopback, SQLite backend, artifacts
served through the server (``mlflow-artifacts:/``), exactly as a team deployment but in a temp folder.

``mlflow server`` is a launcher: it starts uvicorn (and possibly job runners) as child processes.
So it runs under a small supervisor that leads its own process group; the supervisor kills the
whole group when the process that started it is gone (pytest killed by a timeout or SIGKILL never
runs fixture teardown), and :meth:`MLflowServer.stop` kills the group too.
No ``--allowed-hosts`` is needed: MLflow 3's default host check admits ``127.0.0.1:*``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from s3_server import free_port

# Runs as the process-group leader: starts the server, then waits for it or for the parent to go.
_SUPERVISOR = """
import os, signal, subprocess, sys, time
parent = int(sys.argv[1])
child = subprocess.Popen(sys.argv[2:])
def stop_group(*_):
    os.killpg(0, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.1)
    os.killpg(0, signal.SIGKILL)
signal.signal(signal.SIGTERM, lambda *_: None)
while child.poll() is None:
    if os.getppid() != parent:
        stop_group()
    time.sleep(0.5)
sys.exit(child.returncode)
"""


class MLflowServer:
    """``mlflow server`` on 127.0.0.1 and a free port; :meth:`start` / :meth:`stop`."""

    def __init__(self, root: Path, startup_timeout: float = 90.0) -> None:
        self.root = Path(root)
        self.startup_timeout = startup_timeout
        self.port: int | None = None
        self.log_path = self.root / "server.log"
        self._proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        if self.port is None:
            raise RuntimeError("MLflowServer is not started")
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "MLflowServer":
        mlflow = Path(sys.executable).with_name("mlflow")
        env = {
            **os.environ,
            "MLFLOW_DISABLE_TELEMETRY": "true",  # no network here, and nothing to report
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no background job runner processes
        }
        env.pop("MLFLOW_TRACKING_URI", None)
        last_error = "never started"
        for _ in range(3):  # another process may take the port between free_port() and bind
            port = free_port()
            command = [
                str(mlflow), "server",
                "--host", "127.0.0.1", "--port", str(port),
                "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination", str(self.root / "artifacts"),
                "--workers", "1",
            ]  # fmt: skip
            with open(self.log_path, "ab") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-c", _SUPERVISOR, str(os.getpid()), *command],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env=env, cwd=self.root, start_new_session=True,
                )  # fmt: skip
            deadline = time.monotonic() + self.startup_timeout
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as answer:
                        if answer.status == 200:
                            self.port, self._proc = port, proc
                            return self
                except (urllib.error.URLError, ConnectionError, OSError):
                    pass
                time.sleep(0.2)
            last_error = f"exit status {proc.poll()}" if proc.poll() is not None else "no answer on /health"
            _kill_group(proc)
        raise RuntimeError(
            f"mlflow server did not start on 127.0.0.1 ({last_error}); last lines of {self.log_path}:\n"
            + self.log_tail()
        )

    def stop(self) -> None:
        if self._proc is not None:
            _kill_group(self._proc)
            self._proc = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (supervisor, launcher, uvicorn), then SIGKILL stragglers."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if proc.poll() is not None and not _group_alive(proc.pid):
                return
            time.sleep(0.1)
    proc.wait(timeout=5)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
