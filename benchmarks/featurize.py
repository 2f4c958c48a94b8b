"""Featurize throughput: the Ray Data pipeline versus a one-image-at-a-time loop, same models, same tiles.

The loop does what the reference's gen_caption.py does per image: read, decode, caption (beam
search on one image), embed the caption, encode the image, keep the result. The pipeline is
``bimors.pipelines.featurize`` with batched actor pools. Both start with models not yet loaded;
Ray itself is started before either clock runs (a cluster is already up when a job is submitted).

    python benchmarks/featurize.py                     # tiny models, 10000 synthetic 256-px tiles, CPU
    python benchmarks/featurize.py --tiles 600 --loop-tiles 200
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bimors.config import Config, load_config
from bimors.data.manifest import build_manifest
from bimors.data.synthetic import generate_synthetic
from bimors.data.tiles import read_tile

REPO = Path(__file__).resolve().parents[1]


def loop_featurize(cfg: Config, uris: list[str]) -> float:
    """One image at a time; returns seconds, model loading included."""
    from bimors.models.caption_encoder import CaptionEncoder
    from bimors.models.captioner import Captioner
    from bimors.models.clip_backbone import FrozenCLIP

    start = time.perf_counter()
    captioner = Captioner.load(cfg.model.captioner, cfg.storage)
    encoder = CaptionEncoder.load(cfg.model.caption_encoder, cfg.storage)
    backbone = FrozenCLIP.load(cfg.model.backbone, cfg.storage)
    rows = []
    for uri in uris:
        image = read_tile(uri, cfg.data.decode, cfg.storage, cfg.featurize.max_side)
        caption = captioner.caption([image])[0]
        caption_emb = encoder.encode([caption])[0]
        feats = backbone.encode_image(backbone.preprocess([image]))
        rows.append((uri, caption, caption_emb.numpy(), feats.embedding[0].numpy(), feats.tokens[0].half().numpy()))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    parser.add_argument("--tiles", type=int, default=10000, help="tiles through the pipeline")
    parser.add_argument("--loop-tiles", type=int, default=500, help="tiles through the loop (it is slow)")
    parser.add_argument("--size", type=int, default=256, help="tile size in pixels (PatternNet: 256)")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()

    import ray

    from bimors.pipelines.featurize import featurize

    with tempfile.TemporaryDirectory() as tmp:
        classes = 20
        cfg = load_config(
            args.config,
            [
                f"data.root={tmp}/tiles",
                "data.generate_synthetic=false",
                f"data.synthetic.classes={[f'class_{i:02d}' for i in range(classes)]}",
                f"data.synthetic.images_per_class={-(-args.tiles // classes)}",
                f"data.synthetic.image_size={args.size}",
                "featurize.scope=all",
                *args.overrides,
            ],
        )
        generate_synthetic(cfg.data.root, cfg.data.synthetic)
        uris = build_manifest(cfg.data).column("uri").to_pylist()[: args.loop_tiles]
        loop_featurize(cfg, uris[:1])  # builds the tiny models if missing, outside both clocks
        loop_seconds = loop_featurize(cfg, uris)  # before Ray starts, so nothing else runs beside it

        ray.init(logging_level="ERROR")
        pipeline = featurize(cfg, f"{tmp}/store")
        n_pipeline = pipeline.stored + pipeline.errors
        ray.shutdown()

    pipeline_rate = n_pipeline / pipeline.seconds
    loop_rate = len(uris) / loop_seconds
    fc = cfg.featurize
    print(f"tiny models, {args.size}-px tiles, CPU; pipeline: caption batch {fc.caption.batch_size} x "
          f"{fc.caption.actors} actors, CLIP batch {fc.clip.batch_size} x {fc.clip.actors} actors")
    print(f"one image at a time : {len(uris):5d} tiles in {loop_seconds:7.1f} s = {loop_rate:6.1f} tiles/s")
    print(f"ray data pipeline   : {n_pipeline:5d} tiles in {pipeline.seconds:7.1f} s = {pipeline_rate:6.1f} tiles/s"
          f" ({pipeline.errors} errors)")
    print(f"speed-up: {pipeline_rate / loop_rate:.1f}x")


if __name__ == "__main__":
    main()
