"""The one base class of mistakes a user can fix.

Every error whose message is meant for the person running a command (a bad config key, a missing
bucket, an unreadable model folder, a checkpoint for other classes) derives from
:class:`BimorsError`, so the workflows turn exactly these into one ``error: ...`` line and exit
status 2 and leave everything else (bugs) with its traceback. Subclasses also derive from the
builtin they refine (``ValueError``, ``OSError``, ...), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class BimorsError(Exception):
    """A mistake in the input, the config or the environment; the message says what and how to fix it."""


def user_error_in(err: BaseException) -> BimorsError | None:
    """The :class:`BimorsError` behind ``err``, also when Ray wrapped it on its way back from a task,
    an actor or a Ray Train worker (``RayTaskError.cause``, ``WorkerGroupError.worker_failures``,
    ``ControllerError.controller_failure``, ``__cause__`` chains); ``None`` for anything else."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [err]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, BimorsError):
            return current
        pending.extend([current.__cause__, current.__context__, getattr(current, "cause", None)])
        for attr in ("worker_failures", "errors"):
            failures = getattr(current, attr, None)
            if isinstance(failures, dict):
                pending.extend(f for f in failures.values() if isinstance(f, BaseException))
            elif isinstance(failures, (list, tuple)):
                pending.extend(f for f in failures if isinstance(f, BaseException))
        for attr in ("error", "controller_failure"):  # Ray Data's and Ray Train's controller wrappers
            inner = getattr(current, attr, None)
            if isinstance(inner, BaseException):
                pending.append(inner)
    return None
