"""Whole-scene inference with the real predictor: memory stays flat as the scene grows, and
batching tiles into one model call beats classifying them one at a time.

Every run classifies a synthetic multiband 16-bit GeoTIFF with ``classify_scene`` and
``Predictor.predict_images`` of the tiny quickstart models (BLIP-2 caption with beam search, BERT
caption embedding, CLIP, an untrained BiMoRS learner), on CPU. Each run happens in a fresh
subprocess that loads the models, classifies a small warm-up scene (one batch of real tiles, and the
first COG write and preview, so imports and allocator pools are in place), and only then starts the
clock and the memory measurement.

* memory: a scene and one 2x larger per side (4x the pixels), same tile size and batch size.
  Reported: tiles/s, the process's resident memory after load + warm-up (the baseline: the model
  weights dominate it), the peak resident memory while the scene is classified
  (``getrusage(RUSAGE_SELF).ru_maxrss``, after the peak was reset to the baseline through
  ``/proc/self/clear_refs`` where Linux allows it, so the warm-up's peak does not count), and the
  increment, peak minus baseline. Tiles are read as windows and the class map is written as it
  goes, so the increment should not grow with the scene: large/small ~1 at 4x the pixels. GDAL's
  block cache is process-wide and by default may hold up to 5% of physical RAM of decoded blocks
  (the full-resolution blocks behind the decimated statistics read, the windows, the class map),
  so the pair is run twice: with GDAL's default cache and with ``scene.gdal_cache_mb`` set below
  what the smaller scene would fill (``--gdal-cachemax``, in MB; 0 skips that pair). Keep ``--side`` at
  or above ``scene.stats_max_side`` and ``scene.preview_max_side`` (1024): below them the
  statistics read and the preview grow with the scene by design.
* batching: the smaller scene with ``scene.classify.batch_size`` tiles per model call versus 1. Reported:
  tiles/s over the whole ``classify_scene`` call (reading, stretching, models, class map, COG,
  preview) and over the model calls alone.
  With the tiny models on CPU most of a call is per-call overhead (above all the captioner's
  beam-search ``generate`` loop, then tokenizer/processor and BERT calls), which a batch pays once.

Scenes are written before any clock runs; model building (tiny models on first use) and the learner
checkpoint happen in the parent, outside the children's clocks.

    python benchmarks/scene.py                        # 2048^2 vs 4096^2 px, 128-px tiles, batch 32 vs 1
    python benchmarks/scene.py --side 1024 --tile 128 --batch 16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["beach", "desert", "forest", "river", "harbor", "meadow", "parking lot", "dense residential"]
MiB = 1024 * 1024


# --------------------------------------------------------------------------------------------
# memory readings (Linux; ru_maxrss is in KiB on Linux and bytes on macOS)


def current_rss() -> int:
    """Resident memory now, in bytes."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # no /proc: the best we have is the peak so far
        return peak_rss()


def peak_rss() -> int:
    """Peak resident memory of this process (``ru_maxrss``), in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak() -> bool:
    """Reset the peak resident memory to the current one (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return peak_rss() <= current_rss() + 4 * MiB  # it took effect (ru_maxrss follows VmHWM)


# --------------------------------------------------------------------------------------------
# one run, in a fresh process


def child(spec: dict) -> dict:
    from bimors.config import load_config
    from bimors.pinned_model import load_pinned, pin_model
    from bimors.pipelines.scene import classify_scene

    cfg = load_config(spec["config"], spec["overrides"])
    predictor = load_pinned(cfg, pin_model(spec["checkpoint"], cfg), device="cpu", encoders=True)
    loaded = current_rss()
    model_seconds = [0.0]

    def classify(images):
        start = time.perf_counter()
        out = predictor.predict_images(images)
        model_seconds[0] += time.perf_counter() - start
        return out

    classify_scene(spec["warmup"], str(Path(spec["out"]) / "warmup"), classify, predictor.classnames, cfg.scene)
    model_seconds[0] = 0.0
    lifetime_peak = peak_rss()
    baseline = current_rss()
    was_reset = reset_peak()
    result = classify_scene(spec["scene"], str(Path(spec["out"]) / "scene"), classify, predictor.classnames, cfg.scene)
    peak = peak_rss()
    if result.errors or result.classified != result.tiles:
        raise RuntimeError(f"scene not classified cleanly: {result.to_json()}")
    return {
        "width": result.width, "height": result.height, "tiles": result.tiles,
        "batch_size": cfg.scene.classify.batch_size, "tile_size": cfg.scene.tile_size,
        "seconds": result.seconds, "model_seconds": model_seconds[0],
        "loaded": loaded, "baseline": baseline, "peak": peak, "peak_reset": was_reset,
        "lifetime_peak": max(lifetime_peak, peak),
    }


def run_child(spec: dict, gdal_cachemax: int | None = None) -> dict:
    """One run; ``gdal_cachemax`` (MB) caps GDAL's block cache through ``scene.gdal_cache_mb``,
    ``None`` leaves GDAL's default (5% of RAM)."""
    env = dict(os.environ)
    spec = {**spec, "overrides": [*spec["overrides"], f"scene.gdal_cache_mb={gdal_cachemax or 'null'}"]}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
        capture_output=True, text=True, cwd=REPO, env=env,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"child run failed ({proc.returncode}): {spec['scene']} {spec['overrides'][-2:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# setup and report


def build_checkpoint(cfg, folder: Path) -> None:
    """An untrained BiMoRS learner on the tiny backbone (builds the tiny models if missing)."""
    from bimors.models.caption_encoder import CaptionEncoder
    from bimors.models.captioner import Captioner
    from bimors.models.checkpoint import save_learner
    from bimors.models.classifier import build_learner
    from bimors.models.clip_backbone import FrozenCLIP

    Captioner.load(cfg.model.captioner, cfg.storage)  # built here on first use, not in a timed child
    backbone = FrozenCLIP.load(cfg.model.backbone, cfg.storage)
    encoder = CaptionEncoder.load(cfg.model.caption_encoder, cfg.storage)
    learner = build_learner(cfg.model.learner, backbone, encoder.dim)
    save_learner(str(folder), learner, CLASSES, backbone.identity, cfg.model_dump(mode="json"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    parser.add_argument("--side", type=int, default=2048, help="side of the smaller scene in pixels; the larger is 2x")
    parser.add_argument("--tile", type=int, default=128, help="scene.tile_size in pixels")
    parser.add_argument("--batch", type=int, default=32, help="scene.classify.batch_size of the batched runs")
    parser.add_argument("--unbatched", type=int, default=1, help="scene.classify.batch_size it is compared with")
    parser.add_argument("--gdal-cachemax", type=int, default=16,
                        help="scene.gdal_cache_mb (MB) of the second memory pair; 0 skips it")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.side % args.tile:
        parser.error(f"--side ({args.side}) must be a multiple of --tile ({args.tile})")

    import torch

    from bimors.config import load_config
    from bimors.data.synthetic_scene import write_synthetic_scene

    cfg = load_config(args.config, args.overrides)
    with tempfile.TemporaryDirectory(prefix="bimors-bench-scene-") as tmp:
        work = Path(tmp)
        build_checkpoint(cfg, work / "checkpoint")
        n = args.side // args.tile
        write_synthetic_scene(work / "warmup.tif", CLASSES, (2, max(1, -(-max(args.batch, args.unbatched) // 2))), block=args.tile)
        write_synthetic_scene(work / "small.tif", CLASSES, (n, n), block=args.tile, seed=1)
        write_synthetic_scene(work / "large.tif", CLASSES, (2 * n, 2 * n), block=args.tile, seed=2)

        def spec(scene: str, batch: int) -> dict:
            return {
                "config": args.config, "checkpoint": str(work / "checkpoint"), "warmup": str(work / "warmup.tif"),
                "scene": str(work / f"{scene}.tif"), "out": str(work / f"out-{scene}-{batch}"),
                "overrides": [*args.overrides, f"scene.tile_size={args.tile}", f"scene.classify.batch_size={batch}"],
            }

        load_before = os.getloadavg()[0]
        runs = {
            "small": run_child(spec("small", args.batch)),
            "large": run_child(spec("large", args.batch)),
            "unbatched": run_child(spec("small", args.unbatched)),
        }
        if args.gdal_cachemax:
            runs["small capped"] = run_child(spec("small", args.batch), args.gdal_cachemax)
            runs["large capped"] = run_child(spec("large", args.batch), args.gdal_cachemax)
        load_after = os.getloadavg()[0]

    reset = all(r["peak_reset"] for r in runs.values())
    default_cache = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.05 / MiB
    print(f"tiny models (BLIP-2 caption, {cfg.model.captioner.num_beams} beams + BERT + CLIP + BiMoRS learner), "
          f"{len(CLASSES)} classes, {args.tile}-px tiles of a 4-band uint16 GeoTIFF, CPU, {torch.get_num_threads()} threads; "
          f"each run in a fresh process after a warm-up scene; 1-min load average {load_before:.1f} before, "
          f"{load_after:.1f} after")
    print("peak = ru_maxrss while the scene is classified"
          + (" (reset to the baseline before it)" if reset else " (could not be reset: includes load + warm-up)")
          + "; baseline = resident memory after model load + warm-up; GDAL cache: GDAL_CACHEMAX "
          f"(default 5% of RAM = {default_cache:.0f} MiB here)")
    header = (f"{'scene':<8} {'batch':>5} {'GDAL cache':>10} {'tiles':>6} {'s':>6} {'tiles/s':>8} {'model tiles/s':>13} "
              f"{'baseline MiB':>12} {'peak MiB':>9} {'incr. MiB':>9}")
    print(header)
    print("-" * len(header))

    def increment(r: dict) -> float:
        return (r["peak"] - r["baseline"]) / MiB

    def rate(r: dict) -> float:
        return r["tiles"] / r["seconds"]

    def model_rate(r: dict) -> float:
        return r["tiles"] / r["model_seconds"]

    for key, r in runs.items():
        cache = f"{args.gdal_cachemax} MB" if "capped" in key else "default"
        print(f"{str(r['width']) + '^2':<8} {r['batch_size']:>5} {cache:>10} {r['tiles']:>6} {r['seconds']:>6.1f} {rate(r):>8.1f} "
              f"{model_rate(r):>13.1f} {r['baseline'] / MiB:>12.0f} {r['peak'] / MiB:>9.0f} {increment(r):>9.1f}")

    def memory_line(small: dict, large: dict, cache: str) -> str:
        pixels = large["width"] * large["height"] / (small["width"] * small["height"])
        return (f"memory ({cache}): {pixels:.1f}x pixels -> {increment(large) / max(increment(small), 1e-9):.2f}x peak increment "
                f"({increment(small):.1f} -> {increment(large):.1f} MiB over ~{small['baseline'] / MiB:.0f} MiB of models "
                f"and warm-up), {large['peak'] / small['peak']:.2f}x peak; {rate(large) / rate(small):.2f}x tiles/s")

    print(memory_line(runs["small"], runs["large"], "GDAL default cache"))
    if args.gdal_cachemax:
        print(memory_line(runs["small capped"], runs["large capped"], f"GDAL_CACHEMAX={args.gdal_cachemax} MB"))
    small, unbatched = runs["small"], runs["unbatched"]
    print(f"batching: {args.batch} vs {args.unbatched} tiles per call -> {rate(small) / rate(unbatched):.1f}x tiles/s "
          f"({rate(unbatched):.1f} -> {rate(small):.1f}; model calls alone {model_rate(small) / model_rate(unbatched):.1f}x)")


if __name__ == "__main__":
    main()
