"""Run one of the paper's protocols for every method in evaluate.methods and every seed in
evaluate.seeds, on one harness, and write the tables (mean ± std, CSV + Markdown) to
<output>/tables and to MLflow.

    python workflows/evaluate.py --config configs/quickstart.yaml --protocol base2new
    python workflows/evaluate.py --config configs/paper.yaml --protocol cross-dataset --output s3://bucket/eval \\
        evaluate.datasets.patternnet=s3://bucket/PatternNet evaluate.datasets.rsicd=s3://bucket/RSICD \\
        evaluate.datasets.resisc45=s3://bucket/RESISC45 evaluate.datasets.mlrsnet=s3://bucket/MLRSNet
"""

from __future__ import annotations

import sys
from typing import Sequence

from bimors.cli import parse, parser, run


def main(argv: Sequence[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--protocol", required=True, choices=["base2new", "cross-dataset", "domain-generalization"])
    p.add_argument("--data", help="dataset root for base2new (default: data.root)")
    p.add_argument("--output", default="outputs/evaluate", help="feature stores, runs and tables (path or s3://...)")
    args, cfg = parse(p, argv)

    from bimors.pipelines.protocol_runs import run_protocol

    table = run_protocol(cfg, args.output, args.protocol, args.data)
    print(table.markdown())
    print(f"tables: {args.output}/tables/{args.protocol}.md and .csv")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
