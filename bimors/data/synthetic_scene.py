"""Synthetic georeferenced scenes: a mosaic of synthetic class tiles written as a GeoTIFF, so the
scene path (windowed reads, nodata, multiband 16-bit stretch, CRS round trip) runs offline.

The ground truth is known block by block, which lets tests check that a class map lands on the
right pixels. Written block-row by block-row, so a scene far larger than memory can be made.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

from bimors.data.synthetic import render_tile


def write_synthetic_scene(
    path: str | Path,
    classes: Sequence[str],
    grid: tuple[int, int],
    block: int = 64,
    bands: int = 4,
    dtype: str = "uint16",
    nodata_blocks: Sequence[tuple[int, int]] = (),
    crs: str = "EPSG:32633",
    origin: tuple[float, float] = (500_000.0, 5_200_000.0),
    pixel_size: float = 10.0,
    seed: int = 0,
) -> np.ndarray:
    """Write a ``grid[0] x grid[1]`` mosaic of ``block``-pixel class tiles and return the class
    index of each block (``-1`` for blocks listed in ``nodata_blocks``, which hold nodata = 0).

    Bands beyond the first three carry a darker copy of the red band (a stand-in for NIR), and
    16-bit scenes hold reflectance-like values (``8 * value + 100``) so they need a stretch."""
    rows, cols = grid
    truth = np.empty(grid, np.int64)
    nodata = set(map(tuple, nodata_blocks))
    profile = dict(
        driver="GTiff", width=cols * block, height=rows * block, count=bands, dtype=dtype, crs=crs,
        transform=from_origin(*origin, pixel_size, pixel_size), nodata=0, tiled=True,
        blockxsize=min(256, block * cols) // 16 * 16 or 16, blockysize=min(256, block * rows) // 16 * 16 or 16,
        compress="deflate",
    )
    with rasterio.open(path, "w", **profile) as out:
        for r in range(rows):
            strip = np.zeros((bands, block, cols * block), dtype)
            for c in range(cols):
                if (r, c) in nodata:
                    truth[r, c] = -1
                    continue
                index = (r * cols + c + seed) % len(classes)
                truth[r, c] = index
                rgb = render_tile(classes[index], r * cols + c, block, seed).astype(np.float64)
                planes = [rgb[..., i] for i in range(3)] + [rgb[..., 0] * 0.6] * max(0, bands - 3)
                stack = np.stack(planes[:bands])
                values = stack * 8 + 100 if np.dtype(dtype) != np.uint8 else np.clip(stack, 1, 255)
                strip[:, :, c * block : (c + 1) * block] = values.astype(dtype)
            out.write(strip, window=Window(0, r * block, cols * block, block))
    return truth


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bimors.data.synthetic_scene scenes/demo.tif``: a demo scene for the nightly job
    and the endpoint, made of the quickstart's synthetic classes."""
    import argparse

    from bimors.config import SyntheticConfig

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("path", help="GeoTIFF to write")
    parser.add_argument("--tiles", type=int, default=32, help="tiles per side (default 32: 1,024 tiles)")
    parser.add_argument("--block", type=int, default=64, help="tile side in pixels (use the same scene.tile_size)")
    parser.add_argument("--bands", type=int, default=4)
    args = parser.parse_args(argv)
    Path(args.path).parent.mkdir(parents=True, exist_ok=True)
    write_synthetic_scene(args.path, SyntheticConfig().classes, (args.tiles, args.tiles), args.block, args.bands)
    side = args.tiles * args.block
    print(f"{args.path}: {side}x{side} px, {args.bands} bands uint16, {args.tiles * args.tiles:,} tiles of {args.block} px")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
