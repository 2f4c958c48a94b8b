"""Fit a prompt learner on a few labelled tiles with Ray Train, evaluate it on the full test split,
and record the run (params, per-epoch metrics, plots, checkpoint, registered model) in MLflow.

Missing features are computed first by the featurize pipeline. Re-running the same command resumes
the same Ray Train run from its last checkpoint (run names carry a hash of the config).

    python workflows/train.py --config configs/quickstart.yaml
    ray job submit --working-dir . -- python workflows/train.py --config configs/paper.yaml \\
        --data s3://bucket/PatternNet --output s3://bucket/bimors train.workers=4 train.use_gpu=true
"""

from __future__ import annotations

import sys
from typing import Sequence

from bimors.cli import parse, parser, run


def main(argv: Sequence[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--data", help="dataset root URI (class folders or a split JSON); default: data.root")
    p.add_argument("--output", default="outputs", help="where the feature store and runs go (path or s3://...)")
    args, cfg = parse(p, argv)

    from bimors.pipelines.experiment import train_and_evaluate

    report = train_and_evaluate(cfg, args.output, args.data)
    print(report.table())
    print(f"checkpoint: {report.checkpoint}")
    if report.mlflow_location:
        version = f" (registered as {cfg.tracking.registered_model} v{report.model_version}, alias {cfg.tracking.alias})" if report.model_version else ""
        print(f"mlflow run: {report.mlflow_location}{version}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
