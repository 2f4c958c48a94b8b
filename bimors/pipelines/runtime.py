"""Connecting to Ray: the cluster a job was submitted to, or a local one started on demand."""

from __future__ import annotations

import logging

from bimors.config import StageConfig

log = logging.getLogger(__name__)


def ensure_ray() -> None:
    """``ray.init()`` once: under ``ray job submit`` (or with RAY_ADDRESS set) this joins that
    cluster; otherwise it starts a local one sized to this machine."""
    import ray

    from bimors import console

    if ray.is_initialized():
        return
    # Workers' output reaches this console only with --verbose; otherwise it stays in Ray's log files
    # (/tmp/ray/session_latest/logs) and Ray Data shows no bars of its own: bimors.console shows progress.
    with console.chatter_to_log():
        ray.init(log_to_driver=console.verbose(), logging_level=logging.WARNING, configure_logging=console.verbose())
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = console.verbose()
    console.quiet_ray_loggers()
    resources = ray.cluster_resources()
    log.info("ray: %s CPU, %s GPU", resources.get("CPU", 0), resources.get("GPU", 0))


def actor_pool(stage: StageConfig):
    """Ray Data compute strategy for a stage: a fixed pool, or an autoscaling one for ``[min, max]``.

    One batch in flight per actor: Ray Data's default queues several on an actor, and a queued
    batch waits behind its actor's current one while another actor of the pool sits idle (with
    few, large batches, as at the end of a scene, that left whole actors unused)."""
    import ray.data

    low, high = (stage.actors, stage.actors) if isinstance(stage.actors, int) else stage.actors
    return ray.data.ActorPoolStrategy(min_size=low, max_size=high, max_tasks_in_flight_per_actor=1)
