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

    from bimors.serve.launch import deploy, serve_until_interrupted

    url = deploy(cfg, args.model)
    auth = "bearer token required" if cfg.serve.token() else "no auth (set serve.api_token or BIMORS_API_TOKEN)"
    sources = ", ".join(cfg.serve.scene_sources) or "none: uploads only (serve.scene_sources)"
    print(f"serving {args.model} on {url} ({auth}; scene URLs from {sources}); Ctrl-C stops", flush=True)
    serve_until_interrupted()
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
