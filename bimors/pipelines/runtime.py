"""Connecting to Ray: the cluster a job was submitted to, or a local one started on demand."""

from __future__ import annotations

import logging

from bimors.config import StageConfig

log = logging.getLogger(__name__)


def ensure_ray() -> None:
    """``ray.init()`` once: under ``ray job submit`` (or with RAY_ADDRESS set) this joins that
    cluster; otherwise it starts a local one sized to this machine."""
    import ray

    if ray.is_initialized():
        return
    ray.init(log_to_driver=True, logging_level=logging.WARNING)
    resources = ray.cluster_resources()
    log.info("ray: %s CPU, %s GPU", resources.get("CPU", 0), resources.get("GPU", 0))


def actor_pool(stage: StageConfig):
    """Ray Data compute strategy for a stage: a fixed pool, or an autoscaling one for ``[min, max]``."""
    import ray.data

    low, high = (stage.actors, stage.actors) if isinstance(stage.actors, int) else stage.actors
    return ray.data.ActorPoolStrategy(min_size=low, max_size=high)
