"""What every workflow script shares: ``--config PATH`` plus ``key=value`` overrides, logging, and
turning a user's mistake into one line on stderr and a non-zero exit status (not a traceback)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, NoReturn, Sequence

from bimors import console
from bimors.config import Config, load_config
from bimors.errors import user_error_in

#: Exit status for errors the user can fix (bad config, missing data, unreachable storage, ...).
USAGE_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse with the workflows' error contract: one ``error:`` line (pointing at --help), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"error: {message} (see {self.prog} --help)\n")


def parser(description: str | None) -> argparse.ArgumentParser:
    p = _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (see configs/quickstart.yaml, configs/paper.yaml)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides in dotted form, e.g. optim.lr=0.01 model.learner.method=coop",
    )
    p.add_argument("--verbose", action="store_true",
                   help="show everything on the console (debug logging, Ray's and the workers' output); "
                   "otherwise it goes to a log file under ~/.cache/bimors/logs (BIMORS_LOG_DIR)")
    return p


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, Config]:
    """Arguments and the validated config; logging goes to a log file from here on (see
    :mod:`bimors.console`), so the console shows progress and results only."""
    args = p.parse_intermixed_args(argv)  # overrides may stand before, between or after the flags
    script = Path(sys.argv[0]).stem if argv is None and sys.argv and sys.argv[0] else "bimors"
    console.setup(script, verbose=args.verbose)
    return args, load_config(args.config, args.overrides)


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Call ``main``; a user error (:class:`~bimors.errors.BimorsError`, also when Ray wrapped it)
    becomes ``error: <one line>`` and exit status 2; anything else is a bug and keeps its traceback."""
    try:
        status = main(argv)
        if console.log_file() is not None and not console.verbose():
            print(f"log: {console.log_file()} (Ray's own logs: /tmp/ray/session_latest/logs on each node)", file=sys.stderr)
        return status
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - only user errors are caught; bugs are re-raised
        mistake = user_error_in(err)
        if mistake is None or os.environ.get("BIMORS_DEBUG"):
            if console.log_file() is not None:
                print(f"(details in {console.log_file()})", file=sys.stderr)
            raise
        print("error: " + " ".join(str(mistake).split()), file=sys.stderr)
        return USAGE_ERROR
