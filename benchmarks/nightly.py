"""The nightly job's tile pipeline on this machine: does a large scene spread over the actors?

Three runs of :func:`bimors.pipelines.scene_pipeline.classify_scenes` (what ``workflows/nightly.py``
runs) on one local Ray, with the tiny quickstart models (BLIP-2 caption with beam search, BERT
caption embedding, CLIP, an untrained BiMoRS learner) on CPU:

* one large scene (``--tiles`` per side squared, >= 2,000 tiles) with 1 actor in each pool (read,
  caption, classify);
* the same scene with 2 actors in each pool;
* its four quadrants as four scenes (the same tiles in total) with 2 actors in each pool.

Each run starts its own pools (the models load inside the timed run, as they do in a nightly job);
the "tile phase" is from the first tile out of the classify stage to the last scene written, the
steady state the pools reach, and "cores busy" is the machine's CPU time over that phase divided by
its length (of ``os.cpu_count()``). Reported: tiles/s over the whole run and over the tile phase, the
speed-ups (``speed-up: N.Nx``), and whether the class bands agree: the 2-actor map must equal the
1-actor map, and each quadrant's map the matching quarter of the large one (an 8-bit RGB scene, so no
stretch differs between a scene and its quadrants).

    python benchmarks/nightly.py                 # 64 x 64 = 4,096 tiles of 64 px
    python benchmarks/nightly.py --tiles 46      # 2,116 tiles
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["beach", "desert", "forest", "river", "harbor", "meadow", "parking lot", "dense residential"]


def quadrants(scene: Path, folder: Path) -> list[Path]:
    """The four quadrants of ``scene`` as GeoTIFFs of their own (same CRS, shifted transforms)."""
    import rasterio
    from rasterio.windows import Window

    out = []
    with rasterio.open(scene) as src:
        h, w = src.height // 2, src.width // 2
        for name, (row, col) in {"nw": (0, 0), "ne": (0, w), "sw": (h, 0), "se": (h, w)}.items():
            window = Window(col, row, w, h)
            profile = src.profile | {"height": h, "width": w, "transform": src.window_transform(window)}
            path = folder / f"{name}.tif"
            with rasterio.open(path, "w", **profile) as dst:
                dst.write(src.read(window=window))
            out.append(path)
    return out


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine since boot (Linux /proc/stat; zeros elsewhere)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except OSError:
        return 0, 0
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def run(cfg, scenes: list[Path], output: Path, model) -> dict:
    from bimors.pipelines.scene_pipeline import SceneTask, classify_scenes

    tasks = [SceneTask(str(s), str(output / s.stem)) for s in scenes]
    started = time.perf_counter()
    first: list = []

    def on_tiles(done: int, total: int) -> None:
        if not first:
            first.extend([time.perf_counter(), cpu_times()])

    outcomes = list(classify_scenes(cfg, tasks, model, on_tiles=on_tiles))
    seconds = time.perf_counter() - started
    busy, total = cpu_times()
    bad = [o for o in outcomes if not o.ok or o.result.errors]
    if bad or not first:
        raise SystemExit(f"a scene did not classify cleanly: {bad[0] if bad else 'no tiles came out'}")
    tiles = sum(o.result.tiles for o in outcomes)
    (busy0, total0) = first[1]
    cores = (os.cpu_count() or 1) * (busy - busy0) / max(1, total - total0)
    return {"tiles": tiles, "seconds": seconds, "tile_seconds": time.perf_counter() - first[0], "cores": cores}


def class_band(path: Path) -> np.ndarray:
    import rasterio

    with rasterio.open(path / "class_map.tif") as ds:
        return ds.read(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    parser.add_argument("--tiles", type=int, default=64, help="tiles per side of the large scene (even)")
    parser.add_argument("--tile", type=int, default=64, help="scene.tile_size in pixels")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()
    if args.tiles % 2:
        parser.error("--tiles must be even (the scene is cut into four quadrants)")

    import ray
    import ray.data
    import torch

    from bimors import console
    from bimors.config import load_config
    from bimors.data.synthetic_scene import write_synthetic_scene
    from bimors.pinned_model import pin_model
    from scene import build_checkpoint  # benchmarks/scene.py: the same untrained learner

    console.setup("benchmark-nightly")
    base = load_config(args.config, [*args.overrides, f"scene.tile_size={args.tile}"])

    def sized(actors: int):
        pools = {name: getattr(base.scene, name).model_copy(update={"actors": actors}) for name in ("read", "caption", "classify")}
        return base.model_copy(update={"scene": base.scene.model_copy(update=pools)})

    with tempfile.TemporaryDirectory(prefix="bimors-bench-nightly-") as tmp:
        work = Path(tmp)
        build_checkpoint(base, work / "checkpoint")
        large = work / "large.tif"
        write_synthetic_scene(large, CLASSES, (args.tiles, args.tiles), block=args.tile, bands=3, dtype="uint8", seed=3)
        (work / "parts").mkdir()
        parts = quadrants(large, work / "parts")
        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR", configure_logging=False, log_to_driver=False)
        console.quiet_ray_loggers()  # Ray Data's progress goes to the log file, the table to stdout
        ray.data.DataContext.get_current().enable_progress_bars = False
        model = pin_model(str(work / "checkpoint"), base)
        load_before = os.getloadavg()[0]
        runs = {
            "1 scene, 1 actor per pool": run(sized(1), [large], work / "one-1", model),
            "1 scene, 2 actors per pool": run(sized(2), [large], work / "one-2", model),
            "4 scenes, 2 actors per pool": run(sized(2), parts, work / "four-2", model),
        }
        load_after = os.getloadavg()[0]
        one, two = class_band(work / "one-1" / "large"), class_band(work / "one-2" / "large")
        h, w = one.shape[0] // 2, one.shape[1] // 2
        quarters = {"nw": two[:h, :w], "ne": two[:h, w:], "sw": two[h:, :w], "se": two[h:, w:]}
        identical = bool((one == two).all()) and all((class_band(work / "four-2" / k) == v).all() for k, v in quarters.items())
        ray.shutdown()

    print(f"tiny models (BLIP-2 caption, {base.model.captioner.num_beams} beams + BERT + CLIP + BiMoRS learner), CPU, "
          f"local Ray with {args.cpus} CPUs ({torch.get_num_threads()} torch threads in the driver); {args.tile}-px tiles of an "
          f"8-bit RGB GeoTIFF; pools: read/caption/classify batch {base.scene.read.batch_size}/{base.scene.caption.batch_size}/"
          f"{base.scene.classify.batch_size}, {base.scene.classify.num_cpus} CPU per actor; 1-min load average "
          f"{load_before:.1f} before, {load_after:.1f} after")
    header = f"{'run':<30} {'tiles':>6} {'s':>7} {'tiles/s':>8} {'tile phase s':>13} {'tiles/s':>8} {'cores busy':>10}"
    print(header)
    print("-" * len(header))
    for name, r in runs.items():
        print(f"{name:<30} {r['tiles']:>6} {r['seconds']:>7.1f} {r['tiles'] / r['seconds']:>8.1f} {r['tile_seconds']:>13.1f} "
              f"{r['tiles'] / r['tile_seconds']:>8.1f} {r['cores']:>10.1f}")
    keys = list(runs)

    def speed_up(a: str, b: str, key: str) -> float:
        return runs[a][key] / runs[b][key]

    print(f"2 vs 1 actors per pool, one scene: speed-up: {speed_up(keys[0], keys[1], 'seconds'):.1f}x "
          f"(tile phase {speed_up(keys[0], keys[1], 'tile_seconds'):.1f}x)")
    print(f"4 scenes vs 1 of the same tiles, 2 actors per pool: speed-up: {speed_up(keys[1], keys[2], 'seconds'):.1f}x "
          f"(tile phase {speed_up(keys[1], keys[2], 'tile_seconds'):.1f}x)")
    print(f"class bands identical across runs: {'yes' if identical else 'NO'}")
    if not identical:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
