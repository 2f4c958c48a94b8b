"""Featurize a dataset into a Parquet feature store: a caption, a caption embedding and CLIP image
features for every tile, computed once by Ray Data actor pools. Re-running resumes; tiles already
stored are skipped. Tiles that cannot be read or decoded are recorded in the store's errors table.

    python workflows/featurize.py --config configs/quickstart.yaml --output outputs/features
    python workflows/featurize.py --config configs/paper.yaml --data s3://bucket/PatternNet \\
        --output s3://bucket/features/patternnet featurize.caption.num_gpus=1
"""

from __future__ import annotations

import sys
from typing import Sequence

from bimors.cli import parse, parser, run


def main(argv: Sequence[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--data", help="dataset root URI (class folders or a split JSON); default: data.root")
    p.add_argument("--manifest", help="featurize the tiles of this manifest Parquet instead of a dataset root")
    p.add_argument("--output", required=True, help="feature store URI (local path or s3://...)")
    args, cfg = parse(p, argv)

    from bimors.pipelines.featurize import featurize

    summary = featurize(cfg, args.output, args.data, args.manifest)
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
