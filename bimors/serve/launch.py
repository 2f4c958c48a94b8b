"""Starting the application on a cluster, with a deadline.

``serve.run`` waits until every deployment is running, and waits forever when the cluster cannot
place a replica (a 2-CPU laptop asked for 2.5 CPUs; a GPU deployment on a CPU-only cluster); all a
user sees is Ray's "taken more than 30s to be scheduled" warning. :func:`deploy` waits at most
``serve.startup_timeout_s`` and then removes the application and says which deployment is waiting,
what one replica asks for and what the cluster has.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

from bimors import console
from bimors.config import Config
from bimors.errors import BimorsError

APP_NAME = "bimors"


class DeploymentUnplaceable(BimorsError):
    """A deployment's replicas did not start in time; the message compares needs and resources."""


def deploy(cfg: Config, model_uri: str, name: str = APP_NAME) -> str:
    """Resolve the model, start Serve's HTTP proxy and run the application; returns its URL.

    Raises :class:`DeploymentUnplaceable` (after removing the half-started application) when it is
    not running within ``serve.startup_timeout_s``."""
    from ray import serve

    from bimors.pinned_model import pin_model
    from bimors.pipelines.runtime import ensure_ray
    from bimors.serve.app import compose

    model = pin_model(model_uri, cfg)  # once: a bad --model fails here, and every replica loads this version
    ensure_ray()
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    app = compose(cfg, model)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            serve.run(app, name=name, route_prefix="/")
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
            failure.append(err)

    runner = threading.Thread(target=run, name="serve-run", daemon=True)
    runner.start()
    runner.join(cfg.serve.startup_timeout_s)
    if failure:
        raise failure[0]
    if runner.is_alive():
        message = unplaced_message(cfg, name)
        serve.delete(name, _blocking=False)
        raise DeploymentUnplaceable(message)
    return f"http://{cfg.serve.host}:{cfg.serve.port}"


def unplaced_message(cfg: Config, name: str = APP_NAME) -> str:
    """One line: the deployments not running yet, what each replica needs, what the cluster has."""
    import ray
    from ray import serve

    from bimors.serve.app import DEPLOYMENT_CONFIG_KEYS

    application = serve.status().applications.get(name)
    waiting = {dep: status for dep, status in (application.deployments if application else {}).items()
               if str(getattr(status.status, "value", status.status)) != "HEALTHY"}
    parts = []
    for dep in waiting or DEPLOYMENT_CONFIG_KEYS:
        key = DEPLOYMENT_CONFIG_KEYS.get(dep)
        if key is None:
            continue
        replicas = getattr(cfg.serve, key)
        parts.append(f"{dep} (serve.{key}: {replicas.min_replicas} replica(s) x {_resources(replicas.num_cpus, replicas.num_gpus)})")
    total, free = ray.cluster_resources(), ray.available_resources()
    have = (f"{_resources(total.get('CPU', 0), total.get('GPU', 0))} in all, "
            f"{_resources(free.get('CPU', 0), free.get('GPU', 0))} free")
    return (f"Serve could not start {', '.join(parts)} within serve.startup_timeout_s={cfg.serve.startup_timeout_s:g} s: "
            f"the cluster has {have}; lower those deployments' num_cpus/num_gpus or min_replicas, or add nodes")


def _resources(cpus: Any, gpus: Any) -> str:
    return f"{float(cpus):g} CPU" + (f" + {float(gpus):g} GPU" if float(gpus) else "")


def serve_until_interrupted() -> None:
    """Block until Ctrl-C or SIGTERM (what ``kill`` and container runtimes send), then shut Serve down."""
    from ray import serve

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        with console.chatter_to_log():  # Ray reports its controller's shutdown on stdout
            serve.shutdown()
