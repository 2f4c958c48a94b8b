"""What every workflow script shares: ``--config PATH`` plus ``key=value`` overrides, logging, and
turning a user's mistake into one line on stderr and a non-zero exit status (not a traceback)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, Sequence

from bimors.config import Config, ConfigError, load_config

#: Exit status for errors the user can fix (bad config, missing data, unreachable storage, ...).
USAGE_ERROR = 2


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions whose message is meant for the user; anything else is a bug and keeps its traceback."""
    from bimors.data.catalog import DatasetError
    from bimors.data.decode import DecodeError
    from bimors.models.checkpoint import CheckpointMismatchError
    from bimors.models.sources import ModelUnavailableError
    from bimors.pipelines.feature_store import StoreMismatchError
    from bimors.pipelines.scene import SceneError
    from bimors.storage import StorageError
    from bimors.tracking import TrackingError

    return (
        ConfigError,
        StorageError,
        DatasetError,
        DecodeError,
        ModelUnavailableError,
        CheckpointMismatchError,
        StoreMismatchError,
        SceneError,
        TrackingError,
        FileNotFoundError,
    )


def parser(description: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (see configs/quickstart.yaml, configs/paper.yaml)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides in dotted form, e.g. optim.lr=0.01 model.learner.method=coop",
    )
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return p


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, Config]:
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("urllib3", "botocore", "s3fs", "fsspec", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return args, load_config(args.config, args.overrides)


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Call ``main``; a user error becomes ``error: <one line>`` and exit status 2."""
    try:
        return main(argv)
    except user_errors() as err:
        if os.environ.get("BIMORS_DEBUG"):
            raise
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
