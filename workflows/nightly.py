"""Classify every new scene under an input prefix with a trained model, across the Ray cluster.

Scenes already processed (a manifest and per-scene summaries in the output prefix) are skipped,
so re-running the same night does nothing new. A bad scene is recorded and the others finish;
the exit status is 0 whenever the job itself ran, with the counts printed.

    python workflows/nightly.py --config configs/quickstart.yaml --input scenes/ --output outputs/nightly \\
        --model models:/bimors@champion
    ray job submit --working-dir . -- python workflows/nightly.py --config configs/paper.yaml \\
        --input s3://acquisitions/2026-11-24/ --output s3://products/classmaps --model models:/bimors@champion
"""

from __future__ import annotations

import sys
from typing import Sequence

from bimors.cli import parse, parser, run


def main(argv: Sequence[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--input", required=True, help="prefix (or single file) holding the scenes: path or s3://...")
    p.add_argument("--output", required=True, help="where class maps, the manifest and run summaries go")
    p.add_argument("--model", required=True, help="models:/name@alias, runs:/<id>/model, or a checkpoint URI")
    p.add_argument("--stac", help="a STAC ItemCollection JSON whose data assets are classified too")
    p.add_argument("--retry-failed", action="store_true", help="try scenes that failed in earlier runs again")
    args, cfg = parse(p, argv)

    from bimors.pipelines.nightly import run_nightly

    report = run_nightly(cfg, args.input, args.output, args.model, stac=args.stac, retry_failed=args.retry_failed)
    print(report.line())
    for scene, error in report.failures.items():
        print(f"  failed: {scene}: {error}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
