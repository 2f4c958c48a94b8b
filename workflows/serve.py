"""Serve a trained model over HTTP with Ray Serve (blocks until interrupted).

    python workflows/serve.py --config configs/quickstart.yaml --model outputs/runs/<run>/checkpoint_best
    python workflows/serve.py --config configs/paper.yaml --model models:/bimors@champion \\
        serve.captioner.num_gpus=1 serve.captioner.max_replicas=8

On a cluster, deploy the same application with ``serve deploy`` or KubeRay's RayService using the
import path ``bimors.serve.app:build_app`` (see infra/). The API token comes from serve.api_token
or the BIMORS_API_TOKEN environment variable.
"""

from __future__ import annotations

import sys
from typing import Sequence

from bimors.cli import parse, parser, run


def main(argv: Sequence[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--model", required=True, help="models:/name@alias, runs:/<id>/model, or a checkpoint URI")
    args, cfg = parse(p, argv)

    import time

    from ray import serve

    from bimors.pipelines.runtime import ensure_ray
    from bimors.serve.app import compose
    from bimors.tracking import resolve_checkpoint

    resolve_checkpoint(args.model, cfg)  # a bad --model fails here, with its reason, not in a replica
    ensure_ray()
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(compose(cfg, args.model), name="bimors", route_prefix="/")
    auth = "bearer token required" if cfg.serve.token() else "no auth (set serve.api_token or BIMORS_API_TOKEN)"
    print(f"serving {args.model} on http://{cfg.serve.host}:{cfg.serve.port} ({auth}); Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
