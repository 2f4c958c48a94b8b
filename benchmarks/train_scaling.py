"""Epoch time of the training loop: 1 vs 2 Ray Train workers, and cached vs online image features,
all in one run on the same featurized synthetic dataset (tiny models by default).

Epoch time is the optimisation steps only (``epoch_seconds`` in the run's metrics): Ray Train's
per-epoch report and checkpoint are left out, since they do not depend on the workers or features.

    python benchmarks/train_scaling.py
    python benchmarks/train_scaling.py --classes 20 --shots 16 --epochs 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from bimors.config import load_config

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--arch", default=None, help="open_clip architecture with random weights instead of the "
                        "config's backbone, e.g. ViT-B-16 (the paper's size)")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()

    import ray

    from bimors.data.synthetic import generate_synthetic
    from bimors.pipelines.experiment import prepare_store
    from bimors.pipelines.protocol_data import protocol_data
    from bimors.pipelines.train import fit

    with tempfile.TemporaryDirectory() as tmp:
        images = 2 * args.shots + 8  # enough for K train shots after the 50/20/30 split
        overrides = [
            f"data.root={tmp}/tiles", "data.generate_synthetic=false", f"data.shots={args.shots}",
            "data.subsample=all", f"data.synthetic.classes={[f'class_{i:02d}' for i in range(args.classes)]}",
            f"data.synthetic.images_per_class={images}", "data.synthetic.image_size=128", "featurize.seeds=[1]",
            f"optim.epochs={args.epochs}", "optim.batch_size=4", "optim.warmup_epochs=0",
            "train.cpus_per_worker=0.5", "tracking.enabled=false", *args.overrides,
        ]
        if args.arch:
            from bimors.models.clip_backbone import build_random_clip

            build_random_clip(args.arch, Path(tmp) / args.arch)
            overrides += [f"model.backbone.name={tmp}/{args.arch}", "model.backbone.pretrained=null",
                          "model.backbone.create_if_missing=null"]
        cfg = load_config(args.config, overrides)
        generate_synthetic(cfg.data.root, cfg.data.synthetic)
        ray.init(logging_level="ERROR")
        store = prepare_store(cfg, f"{tmp}/out")
        data = protocol_data(cfg, store, seed=1)
        times: dict[tuple[int, str], float] = {}
        for features in ("cached", "online"):
            for workers in (1, 2):
                run = cfg.model_copy(update={"train": cfg.train.model_copy(update={"workers": workers, "features": features})})
                history = fit(run, data, f"{tmp}/out/runs", f"{features}-{workers}").history
                times[workers, features] = statistics.median(h["epoch_seconds"] for h in history[1:] or history)
        ray.shutdown()

    rows = len(data.splits["train"])
    print(f"backbone {args.arch or cfg.model.backbone.name}; "
          f"{rows} training tiles ({args.classes} classes x {args.shots} shots), global batch 4, "
          f"{args.epochs} epochs, median epoch time (optimisation steps only):")
    for (workers, features), seconds in times.items():
        print(f"  {features:6s} features, {workers} worker(s): {seconds:7.2f} s/epoch")
    print(f"2 vs 1 workers, cached : {times[1, 'cached'] / times[2, 'cached']:.2f}x speed-up")
    print(f"2 vs 1 workers, online : {times[1, 'online'] / times[2, 'online']:.2f}x speed-up")
    print(f"cached vs online, 1 worker: {times[1, 'online'] / times[1, 'cached']:.2f}x speed-up")


if __name__ == "__main__":
    main()
