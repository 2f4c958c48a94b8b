"""A real S3-compatible server for tests: moto in server mode, in its own process, on loopback.

It is a plain TCP/HTTP listener, so anything that can open a socket to 127.0.0.1 reaches it: this
process, subprocesses and Ray workers alike (give them :meth:`S3Server.env`). No request ever goes
to AWS. moto accepts any credentials; use obviously fake ones (:data:`FAKE_KEY`).
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

FAKE_KEY = "testing"
FAKE_SECRET = "testing"
REGION = "us-east-1"


# Runs in the server process: exits when the process that started it is gone (pytest killed by a
# timeout or SIGKILL never runs fixture teardown), so no server outlives its test session.
_BOOTSTRAP = """
import os, sys, threading, time
parent = int(sys.argv[1])
def watch():
    while True:
        if os.getppid() != parent:
            os._exit(0)
        time.sleep(0.5)
threading.Thread(target=watch, daemon=True).start()
from moto.server import main
main(sys.argv[2:])
"""


def free_port() -> int:
    """A TCP port nobody listens on right now (closed again before returning)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class S3Server:
    """``moto_server`` started on 127.0.0.1 and a free port; use as a context manager or call
    :meth:`start` / :meth:`stop`."""

    def __init__(self, log_dir: Path | None = None, startup_timeout: float = 30.0) -> None:
        self.log_dir = log_dir
        self.startup_timeout = startup_timeout
        self.port: int | None = None
        self._proc: subprocess.Popen | None = None
        self._log = None
        self._counter = itertools.count()
        self._client = None

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        if self.port is None:
            raise RuntimeError("S3Server is not started")
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "S3Server":
        last_error = "never started"
        for _ in range(3):  # another process may grab the port between free_port() and bind
            port = free_port()
            log_path = (self.log_dir / f"moto-{port}.log") if self.log_dir else None
            log = open(log_path, "wb") if log_path else subprocess.DEVNULL
            env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
            proc = subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP, str(os.getpid()), "-H", "127.0.0.1", "-p", str(port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
            deadline = time.monotonic() + self.startup_timeout
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1):
                        pass
                    self.port, self._proc, self._log = port, proc, log
                    return self
                except (urllib.error.URLError, ConnectionError, OSError):
                    time.sleep(0.05)
            last_error = f"exit status {proc.poll()}" if proc.poll() is not None else "no answer"
            _terminate(proc)
            if log is not subprocess.DEVNULL:
                log.close()
        where = f" (log in {self.log_dir})" if self.log_dir else ""
        raise RuntimeError(f"moto_server did not start on 127.0.0.1: {last_error}{where}")

    def stop(self) -> None:
        if self._proc is not None:
            _terminate(self._proc)
            self._proc = None
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        self._log = None

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- helpers -----------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """Standard AWS environment variables that point any AWS SDK at this server."""
        return {
            "AWS_ACCESS_KEY_ID": FAKE_KEY,
            "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": self.endpoint_url,
        }

    def client(self):
        """A boto3 S3 client of this server: the "other client" that tests write through."""
        if self._client is None:
            import boto3

            self._client = boto3.client(
                "s3",
                endpoint_url=self.endpoint_url,
                region_name=REGION,
                aws_access_key_id=FAKE_KEY,
                aws_secret_access_key=FAKE_SECRET,
            )
        return self._client

    def create_bucket(self, prefix: str = "test") -> str:
        """Create a fresh, uniquely named bucket and return its name."""
        name = f"{prefix}-{next(self._counter)}-{uuid.uuid4().hex[:8]}".lower()[:63]
        self.client().create_bucket(Bucket=name)
        return name

    def put(self, bucket: str, key: str, body: bytes) -> None:
        self.client().put_object(Bucket=bucket, Key=key, Body=body)

    def delete(self, bucket: str, key: str) -> None:
        self.client().delete_object(Bucket=bucket, Key=key)


def _terminate(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
