"""What a person running a workflow sees: progress per stage and the results, nothing else.

Ray, Ray Data, Ray Train, MLflow and the model libraries all talk a lot (execution plans, actor
warnings, worker log lines, deprecation warnings). :func:`setup` sends every log record and
warning to a log file and keeps the console for :class:`Progress` lines and the workflow's own
output; ``--verbose`` puts everything back on the console (Ray's worker output included).

A progress display is a tqdm bar when stderr is a terminal and otherwise (CI, ``ray job submit``
logs, a pipe) one line every :data:`LINE_INTERVAL_S` seconds plus a last line, so piped output
stays short and readable.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import IO, Iterator

#: Seconds between progress lines when stderr is not a terminal.
LINE_INTERVAL_S = 5.0
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_verbose = False
_log_file: Path | None = None


def verbose() -> bool:
    """Whether the console shows everything (``--verbose``); Ray forwards worker output only then."""
    return _verbose


def log_file() -> Path | None:
    return _log_file


def setup(name: str, verbose: bool = False, log_dir: str | os.PathLike | None = None) -> Path:
    """Route logging for one workflow run: every record at INFO and above (DEBUG with ``verbose``)
    and every Python warning to ``<log_dir>/<name>-<time>.log``; the console (stderr) gets this
    package's warnings and errors, or everything with ``verbose``. Returns the log file's path.

    ``log_dir`` defaults to ``BIMORS_LOG_DIR``, else ``~/.cache/bimors/logs``."""
    global _verbose, _log_file
    _verbose = verbose
    folder = Path(os.path.expanduser(log_dir or os.environ.get("BIMORS_LOG_DIR") or "~/.cache/bimors/logs"))
    folder.mkdir(parents=True, exist_ok=True)
    _log_file = folder / f"{name}-{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.log"

    if not verbose:
        _native_stderr_to(_log_file)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    to_file = logging.FileHandler(_log_file)
    to_file.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
    root.addHandler(to_file)
    to_console = logging.StreamHandler(sys.stderr)
    to_console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if verbose else "%(levelname)s: %(message)s"))
    if not verbose:
        to_console.addFilter(_OwnWarnings())
    root.addHandler(to_console)
    for noisy in ("urllib3", "botocore", "s3fs", "fsspec", "filelock", "httpx", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.captureWarnings(True)
    warnings.simplefilter("default")
    os.environ.setdefault("TQDM_DISABLE", "0" if verbose else "1")  # libraries' own bars (not ours)
    if not verbose:
        os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")  # MLflow's records reach the log file via root
    return _log_file


def _native_stderr_to(path: Path) -> None:
    """Point file descriptor 2 at the log file and keep the terminal for Python's ``sys.stderr``.

    Ray's C++ core (in this process and in the processes it starts) and native libraries write
    straight to descriptor 2, past any Python logging setup; this sends that to the log file while
    progress, results, ``error:`` lines and tracebacks still reach the person through
    ``sys.stderr``, now a duplicate of the original terminal descriptor."""
    try:
        sys.stderr.flush()
        terminal = os.fdopen(os.dup(2), "w", buffering=1, encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
                             errors="backslashreplace")
        log_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(log_fd, 2)
        os.close(log_fd)
    except (OSError, ValueError, AttributeError):  # no real descriptor 2 (embedded, some IDEs): leave it
        return
    sys.stderr = terminal


class _OwnWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and record.name.split(".")[0] == "bimors"


def quiet_ray_loggers() -> None:
    """Ray installs console handlers on its own loggers (``ray``, ``ray.data``, ``ray.train``,
    ``ray.serve``) when they are first imported; unless ``--verbose``, their records go to the log
    file through the root logger instead."""
    if _verbose or _log_file is None:
        return
    for name in ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "ray.air"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
        logger.propagate = True


@contextlib.contextmanager
def chatter_to_log() -> Iterator[None]:
    """Send what a library prints on ``sys.stderr`` meanwhile (e.g. Ray's notices at ``ray.init``)
    to the log file, unless ``--verbose``."""
    if _verbose or _log_file is None:
        yield
        return
    with open(_log_file, "a", buffering=1) as sink, contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
        yield


class Progress:
    """Progress of one stage (``featurize``, ``train``, ...) toward ``total`` units."""

    def __init__(self, stage: str, total: int, unit: str, stream: IO[str] | None = None, interval: float | None = None):
        self.stage, self.total, self.unit = stage, total, unit
        self.done = 0
        self.note = ""
        self.stream = stream or sys.stderr
        self.interval = LINE_INTERVAL_S if interval is None else interval
        self.started = time.monotonic()
        self._last_line = self.started
        self._bar = None
        if getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=stage, unit=f" {unit}", file=self.stream, dynamic_ncols=True, leave=True, disable=False)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1, note: str | None = None) -> None:
        self.done += n
        if note is not None:
            self.note = note
        if self._bar is not None:
            self._bar.update(n)
            if note is not None:
                self._bar.set_postfix_str(note, refresh=False)
        elif time.monotonic() - self._last_line >= self.interval and self.done < self.total:
            self._write()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.total:
            self._write()

    def _write(self) -> None:
        self._last_line = time.monotonic()
        elapsed = self._last_line - self.started
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        rate = ""
        if elapsed > 0 and self.done:
            per_second = self.done / elapsed
            rate = f", {per_second:.1f} {self.unit}/s" if per_second >= 1 else f", {elapsed:.0f} s"
        note = f", {self.note}" if self.note else ""
        print(f"{self.stage}: {self.done}/{self.total} {self.unit}{pct}{rate}{note}", file=self.stream, flush=True)
