"""Endpoint scene jobs: Ray work that outlives the ingress replica that accepted it.

``POST /classify/scene`` starts a :class:`SceneJobRunner`, a detached, named Ray actor that drives
the nightly job's pipeline (:func:`~bimors.pipelines.scene_pipeline.classify_scenes`: tiles through
read, caption and classify pools) for one scene and then exits. The replica only starts it: a
redeploy, crash or downscale of the ingress neither stops the job nor forgets it.

The job's state lives in object storage (``serve.output``/jobs/<id>/status.json, written by the
runner as it goes), so any replica answers ``GET /jobs/{id}``. A job that is not finished according
to its status is checked against its runner; a runner that died (killed, its node lost) turns the
job ``failed`` with the reason, so nothing says ``running`` forever. The pools' actors belong to
the runner and go with it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from datetime import datetime, timezone
from typing import Any

import ray

from bimors import storage
from bimors.config import Config
from bimors.pinned_model import PinnedModel

log = logging.getLogger(__name__)

NAMESPACE = "bimors"
FINISHED = ("done", "failed")
PROGRESS_EVERY_S = 2.0  # status.json rewrites while tiles flow (each one a PUT on S3)
PING_TIMEOUT_S = 10.0


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def job_dir(cfg: Config, job_id: str) -> str:
    return storage.join(cfg.serve.output, "jobs", job_id)


def runner_name(job_id: str) -> str:
    return f"scene-job-{job_id}"


def write_status(cfg: Config, status: dict[str, Any]) -> None:
    uri = storage.join(job_dir(cfg, status["job_id"]), "status.json")
    storage.write_bytes(uri, json.dumps(status, indent=2).encode(), cfg.storage)


def read_status(cfg: Config, job_id: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_bytes(storage.join(job_dir(cfg, job_id), "status.json"), cfg.storage))
    except storage.StorageError:
        return None


@ray.remote(num_cpus=0, max_restarts=0, max_concurrency=4)
class SceneJobRunner:
    """Runs one scene job in a thread of its own and exits when it is over; ``ping`` answers meanwhile."""

    def __init__(self, cfg: Config, model: PinnedModel, status: dict[str, Any]):
        self.cfg, self.model = cfg, model
        context = ray.get_runtime_context()
        runner = {"node": context.get_node_id(), "pid": os.getpid()}  # where to look when it dies
        self.status = {**status, "state": "running", "started": now(), "runner": runner}
        write_status(cfg, self.status)  # before the ingress answers 202, so a poll always finds the job
        threading.Thread(target=self._run, name="scene-job", daemon=True).start()

    def ping(self) -> str:
        return self.status["state"]

    def _run(self) -> None:
        from bimors.pipelines.scene_pipeline import SceneTask, classify_scenes

        last = [0.0]

        def on_tiles(done: int, total: int) -> None:
            if time.monotonic() - last[0] >= PROGRESS_EVERY_S or done == total:
                last[0] = time.monotonic()
                self.status = {**self.status, "tiles_done": done, "tiles": total}
                write_status(self.cfg, self.status)

        task = SceneTask(self.status["scene"], storage.join(job_dir(self.cfg, self.status["job_id"]), "output"))
        try:
            outcomes = list(classify_scenes(self.cfg, [task], self.model, self.cfg.serve.max_scene_pixels, on_tiles))
            outcome = outcomes[0]
            if outcome.result is None:
                self._finish(state="failed", error=outcome.error)
            else:
                r = outcome.result
                self._finish(state="done", tiles=r.tiles, tiles_done=r.tiles, classified=r.classified, nodata=r.nodata,
                             errors=r.errors, classes=r.classes, outputs=r.outputs)
        except Exception as err:  # noqa: BLE001 - a failed job is reported with its reason
            log.exception("scene job %s failed", self.status["job_id"])
            self._finish(state="failed", error=f"{type(err).__name__}: {err}")
        finally:
            ray.kill(ray.get_runtime_context().current_actor)  # frees the name; the status says the rest

    def _finish(self, **fields: Any) -> None:
        self.status = {**self.status, **fields, "finished": now()}
        write_status(self.cfg, self.status)


def start_job(cfg: Config, model: PinnedModel, status: dict[str, Any]) -> None:
    """Start the runner of a new job and wait until it has written its first status (blocking: call
    from a worker thread)."""
    runner = SceneJobRunner.options(name=runner_name(status["job_id"]), namespace=NAMESPACE, lifetime="detached").remote(
        cfg, model, status
    )
    ray.get(runner.ping.remote())


def job_status(cfg: Config, job_id: str) -> dict[str, Any] | None:
    """The job's status, or None for an unknown job. An unfinished job whose runner is gone is
    recorded ``failed`` with the reason (blocking: call from a worker thread)."""
    status = read_status(cfg, job_id)
    if status is None or status.get("state") in FINISHED:
        return status
    reason = runner_gone(job_id)
    if reason is None:
        return status
    status = read_status(cfg, job_id) or status  # it may have finished just before it exited
    if status.get("state") in FINISHED:
        return status
    status = {**status, "state": "failed", "finished": now(), "error": f"the job's runner stopped before the job finished: {reason}"}
    write_status(cfg, status)
    return status


def runner_gone(job_id: str) -> str | None:
    """Why the job's runner is gone, or None while it is alive (or too busy to answer yet)."""
    from ray.exceptions import GetTimeoutError, RayActorError

    try:
        runner = ray.get_actor(runner_name(job_id), namespace=NAMESPACE)
    except ValueError:
        return "no runner is alive for this job (it exited or its node was lost)"
    try:
        ray.get(runner.ping.remote(), timeout=PING_TIMEOUT_S)
    except GetTimeoutError:
        return None
    except RayActorError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        return " ".join(lines[:2])[:300] or type(err).__name__
    return None
