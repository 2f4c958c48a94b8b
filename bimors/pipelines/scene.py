"""Whole-scene inference: a scene of any size -> tiles -> the shared inference path -> outputs.

Memory stays bounded whatever the scene size: tiles are read as windows (a batch at a time), the
stretch statistics come from one decimated overview read, and the class map is written into a
tiled GeoTIFF as tiles are classified. Every pixel belongs to exactly one tile (the one whose
centre is nearest), so overlapping tiles (``stride < tile_size``) never fight over a pixel.

Outputs, in ``<output>/``:

* ``class_map.tif``: Cloud-Optimised GeoTIFF in the scene's CRS and transform; band 1 the class
  index (colour table, class names in the metadata), band 2 the confidence in percent;
  255 marks nodata in both.
* ``tiles.parquet``: one row per tile: window, bounds in the scene CRS, class, probability, caption,
  status (``ok``, ``nodata`` or ``error`` with the reason); the CRS and class names are in the
  schema metadata.
* ``preview.png``: the class map in colour with a legend.
* ``summary.json``: counts, class histogram, timings.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import rasterio
import rasterio.shutil
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.windows import Window

from bimors import storage
from bimors.config import SceneConfig, StorageConfig
from bimors.data.decode import DecodeError, Limits, band_indexes, bands_to_rgb, stretch_limits
from bimors.data.manifest import tile_id
from bimors.data.tiles import fit_within
from bimors.errors import BimorsError

#: Tiles -> ([N, C] probabilities, N captions). ``Predictor.predict_images`` locally; the endpoint
#: passes a function that calls its captioner and classifier deployments.
ClassifyFn = Callable[[list[np.ndarray]], tuple[np.ndarray, list[str]]]

NODATA = 255  # class and confidence value of pixels with no data (class indices are < 255)
MAX_CLASSES = 255

TILE_SCHEMA = pa.schema(
    [
        ("tile_id", pa.string()),
        ("scene", pa.string()),
        ("row_off", pa.int64()),
        ("col_off", pa.int64()),
        ("height", pa.int64()),
        ("width", pa.int64()),
        ("minx", pa.float64()),
        ("miny", pa.float64()),
        ("maxx", pa.float64()),
        ("maxy", pa.float64()),
        ("status", pa.string()),
        ("class_index", pa.int16()),
        ("class_name", pa.string()),
        ("probability", pa.float32()),
        ("caption", pa.string()),
        ("error", pa.string()),
    ]
)


class SceneError(BimorsError, ValueError):
    """The scene cannot be classified at all (unreadable, too large, bad band selection)."""


class SceneTooLargeError(SceneError):
    """The scene has more pixels than allowed."""


# --------------------------------------------------------------------------------------------
# the tile grid


@dataclass(frozen=True)
class GridTile:
    """A window read for the models and the part of the scene it is responsible for."""

    row: int
    col: int
    window: Window
    owned: tuple[int, int, int, int]  # row_start, row_stop, col_start, col_stop


def axis_starts(size: int, tile: int, stride: int) -> list[int]:
    """Window starts along one axis: every ``stride``, plus one flush with the far edge so the
    edge is covered by a full-size tile rather than a sliver."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return starts


def owned_spans(starts: Sequence[int], extent: int, size: int) -> list[tuple[int, int]]:
    """Split ``[0, size)`` between windows: each pixel goes to the window whose centre is nearest."""
    cuts = [0] + [math.floor((a + b + extent) / 2) for a, b in zip(starts, starts[1:])] + [size]
    return list(zip(cuts, cuts[1:]))


def tile_grid(height: int, width: int, cfg: SceneConfig) -> list[GridTile]:
    """Row-major tiles covering a ``height`` x ``width`` scene, edges included."""
    tile_h, tile_w = min(cfg.tile_size, height), min(cfg.tile_size, width)
    rows = axis_starts(height, cfg.tile_size, cfg.step)
    cols = axis_starts(width, cfg.tile_size, cfg.step)
    row_spans, col_spans = owned_spans(rows, tile_h, height), owned_spans(cols, tile_w, width)
    return [
        GridTile(r, c, Window(col, row, tile_w, tile_h), (*row_spans[r], *col_spans[c]))
        for r, row in enumerate(rows)
        for c, col in enumerate(cols)
    ]


# --------------------------------------------------------------------------------------------
# reading


class SceneReader:
    """A raster opened for windowed reads from a local path or any fsspec URL (rasterio/GDAL reads
    the byte ranges it needs through fsspec, so a COG on S3 is never downloaded whole)."""

    def __init__(self, uri: str, cfg: SceneConfig, storage_cfg: StorageConfig | None = None, max_pixels: int | None = None):
        self.uri = uri
        self.cfg = cfg
        try:
            if storage.is_remote(uri):
                fs, path = storage.filesystem(uri, storage_cfg)
                if not fs.exists(path):
                    raise FileNotFoundError(path)
                self.dataset = rasterio.open(path, opener=fs)
            else:
                local = storage.local_path(uri)
                if not local.is_file():
                    raise FileNotFoundError(str(local))
                self.dataset = rasterio.open(local)
        except storage.StorageError:
            raise
        except RasterioError as err:  # before OSError: GDAL's I/O errors are both
            raise SceneError(f"{uri}: not a readable raster image ({_first_line(err)})") from None
        except OSError as err:
            raise storage.explain(uri, err) from None
        ds = self.dataset
        limit = max_pixels or cfg.max_pixels
        if ds.width * ds.height > limit:
            ds.close()
            raise SceneTooLargeError(f"{uri}: scene is {ds.width}x{ds.height} = {ds.width * ds.height:,} pixels, over the limit of {limit:,}")
        try:
            self.indexes = band_indexes(ds.count, cfg.decode.bands)
        except DecodeError as err:
            ds.close()
            raise SceneError(f"{uri}: {err}") from None
        self._selected = cfg.decode.model_copy(update={"bands": None})  # read() already picked the bands
        self.limits = self._scene_limits()

    def __enter__(self) -> "SceneReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.dataset.close()

    @property
    def height(self) -> int:
        return self.dataset.height

    @property
    def width(self) -> int:
        return self.dataset.width

    def read(self, window: Window | None = None, out_shape: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Selected bands ``(3, h, w)`` and the mask of pixels holding data ``(h, w)``."""
        shape = None if out_shape is None else (len(self.indexes), *out_shape)
        data = self.dataset.read(self.indexes, window=window, out_shape=shape, masked=True, resampling=Resampling.nearest)
        values = np.ma.getdata(data)
        invalid = np.ma.getmaskarray(data).any(axis=0)
        if self.dataset.nodata is None and self.cfg.nodata is not None:
            invalid |= (values == self.cfg.nodata).all(axis=0)
        if np.issubdtype(values.dtype, np.floating):
            invalid |= ~np.isfinite(values).all(axis=0)
        return values, ~invalid

    def rgb(self, values: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Bands of a window -> uint8 RGB, stretched with the scene's limits."""
        return bands_to_rgb(values, self._selected, valid, limits=self.limits)

    def _scene_limits(self) -> Limits | None:
        scale = min(1.0, self.cfg.stats_max_side / max(self.height, self.width))
        shape = (max(1, round(self.height * scale)), max(1, round(self.width * scale)))
        values, valid = self.read(out_shape=shape)
        return stretch_limits(values, self._selected, valid)

    def bounds(self, window: Window) -> tuple[float, float, float, float]:
        """(minx, miny, maxx, maxy) of a window in the scene CRS (pixel coordinates if it has none)."""
        left, bottom, right, top = rasterio.windows.bounds(window, self.dataset.transform)
        return min(left, right), min(bottom, top), max(left, right), max(bottom, top)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


# --------------------------------------------------------------------------------------------
# classifying


@dataclass
class SceneResult:
    scene: str
    output: str
    width: int
    height: int
    tiles: int
    classified: int
    nodata: int
    errors: int
    classes: dict[str, int] = field(default_factory=dict)  # tiles per predicted class
    model: dict[str, Any] = field(default_factory=dict)  # the pinned model that classified it
    seconds: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def classify_scene(
    scene_uri: str,
    output_uri: str,
    classify: ClassifyFn,
    classnames: Sequence[str],
    cfg: SceneConfig,
    storage_cfg: StorageConfig | None = None,
    max_pixels: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    model: dict[str, Any] | None = None,
) -> SceneResult:
    """Classify every tile of a scene and write the outputs under ``output_uri``; ``model`` (the
    run's :meth:`~bimors.pinned_model.PinnedModel.record`) goes into summary.json and the Parquet.

    A tile that cannot be read or classified is recorded (status ``error``) and the rest go on;
    a scene that cannot be opened at all raises :class:`SceneError` or ``StorageError``."""
    if len(classnames) > MAX_CLASSES - 1:
        raise SceneError(f"at most {MAX_CLASSES - 1} classes fit a uint8 class map, got {len(classnames)}")
    cache = {"GDAL_CACHEMAX": cfg.gdal_cache_mb * 2**20} if cfg.gdal_cache_mb else {}
    with rasterio.Env(**cache):
        return _classify_scene(scene_uri, output_uri, classify, classnames, cfg, storage_cfg, max_pixels, progress, model or {})


def _classify_scene(
    scene_uri: str,
    output_uri: str,
    classify: ClassifyFn,
    classnames: Sequence[str],
    cfg: SceneConfig,
    storage_cfg: StorageConfig | None,
    max_pixels: int | None,
    progress: Callable[[int, int], None] | None,
    model: dict[str, Any],
) -> SceneResult:
    started = time.perf_counter()
    with SceneReader(scene_uri, cfg, storage_cfg, max_pixels) as reader, tempfile.TemporaryDirectory(prefix="bimors-scene-") as tmp:
        work = Path(tmp)
        grid = tile_grid(reader.height, reader.width, cfg)
        rows: list[dict[str, object]] = []
        with _class_map(work / "raw.tif", reader, classnames) as class_map:
            for batch in _batches(grid, cfg.batch_size):
                rows.extend(_classify_batch(batch, reader, classify, classnames, cfg, class_map))
                if progress:
                    progress(len(rows), len(grid))
        _to_cog(work / "raw.tif", work / "class_map.tif")
        crs = reader.dataset.crs
        schema = TILE_SCHEMA.with_metadata({
            "crs": crs.to_string() if crs else "", "class_names": json.dumps(list(classnames)), "scene": scene_uri,
            "model": json.dumps(model),
        })
        pq.write_table(pa.Table.from_pylist([{**r, "scene": scene_uri} for r in rows], schema=schema), work / "tiles.parquet")
        _preview(work / "class_map.tif", work / "preview.png", classnames, cfg, scene_uri)

        statuses = [r["status"] for r in rows]
        histogram: dict[str, int] = {}
        for r in rows:
            if r["status"] == "ok":
                histogram[str(r["class_name"])] = histogram.get(str(r["class_name"]), 0) + 1
        result = SceneResult(
            scene=scene_uri,
            output=output_uri,
            width=reader.width,
            height=reader.height,
            tiles=len(rows),
            classified=statuses.count("ok"),
            nodata=statuses.count("nodata"),
            errors=statuses.count("error"),
            classes=dict(sorted(histogram.items(), key=lambda kv: -kv[1])),
            model=model,
        )
        for name in ("class_map.tif", "tiles.parquet", "preview.png"):
            target = storage.join(output_uri, name)
            storage.put_file(work / name, target, storage_cfg)
            result.outputs[name.split(".")[0]] = target
        result.outputs["summary"] = storage.join(output_uri, "summary.json")
        result.seconds = round(time.perf_counter() - started, 3)
        storage.write_bytes(result.outputs["summary"], result.to_json().encode(), storage_cfg)
    return result


def _batches(items: Sequence[GridTile], size: int) -> Iterator[Sequence[GridTile]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _classify_batch(
    batch: Sequence[GridTile],
    reader: SceneReader,
    classify: ClassifyFn,
    classnames: Sequence[str],
    cfg: SceneConfig,
    class_map: "rasterio.io.DatasetWriter",
) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    images: list[np.ndarray] = []
    pending: list[tuple[dict[str, object], GridTile, np.ndarray]] = []
    for tile in batch:
        w = tile.window
        row: dict[str, object] = {
            "tile_id": tile_id(reader.uri, (int(w.col_off), int(w.row_off), int(w.width), int(w.height))),
            "row_off": int(w.row_off), "col_off": int(w.col_off), "height": int(w.height), "width": int(w.width),
            **dict(zip(("minx", "miny", "maxx", "maxy"), reader.bounds(w))),
            "status": "ok", "class_index": None, "class_name": None, "probability": None, "caption": None, "error": None,
        }
        rows.append(row)
        try:
            values, valid = reader.read(w)
        except RasterioError as err:
            row.update(status="error", error=f"read: {_first_line(err)}")
            continue
        if not valid.any():
            row["status"] = "nodata"
            continue
        images.append(fit_within(reader.rgb(values, valid), cfg.max_side))
        pending.append((row, tile, valid))
    if pending:
        try:
            probs, captions = classify(images)
        except Exception as err:  # noqa: BLE001 - one failing batch is recorded, the scene goes on
            for row, _, _ in pending:
                row.update(status="error", error=f"classify: {type(err).__name__}: {_first_line(err)}")
            return rows
        for (row, tile, valid), p, caption in zip(pending, probs, captions, strict=True):
            best = int(p.argmax())
            row.update(class_index=best, class_name=classnames[best], probability=float(p[best]), caption=caption)
            _write_owned(class_map, tile, valid, best, float(p[best]))
    return rows


def _write_owned(class_map: "rasterio.io.DatasetWriter", tile: GridTile, valid: np.ndarray, index: int, probability: float) -> None:
    """Fill the part of the scene this tile owns; pixels without data stay nodata."""
    r0, r1, c0, c1 = tile.owned
    w = tile.window
    mask = valid[r0 - int(w.row_off) : r1 - int(w.row_off), c0 - int(w.col_off) : c1 - int(w.col_off)]
    confidence = np.uint8(min(100, round(probability * 100)))
    bands = np.full((2, *mask.shape), NODATA, np.uint8)
    bands[0][mask] = index
    bands[1][mask] = confidence
    class_map.write(bands, window=Window(c0, r0, c1 - c0, r1 - r0))


# --------------------------------------------------------------------------------------------
# outputs


def _class_map(path: Path, reader: SceneReader, classnames: Sequence[str]) -> "rasterio.io.DatasetWriter":
    src = reader.dataset
    georeferenced = src.crs is not None or not src.transform.is_identity
    out = rasterio.open(
        path, "w", driver="GTiff", width=src.width, height=src.height, count=2, dtype="uint8",
        nodata=NODATA, tiled=True, blockxsize=256, blockysize=256, compress="deflate", BIGTIFF="IF_SAFER",
        **({"crs": src.crs, "transform": src.transform} if georeferenced else {}),
    )
    out.update_tags(class_names=json.dumps(list(classnames)), source=reader.uri, software="bimors")
    out.update_tags(1, **{f"CLASS_{i}": name for i, name in enumerate(classnames)})
    out.set_band_description(1, "class")
    out.set_band_description(2, "confidence_percent")
    out.write_colormap(1, class_colormap(len(classnames)))
    return out


def class_colormap(n: int) -> dict[int, tuple[int, int, int, int]]:
    """The preview's colours as a GeoTIFF colour table (QGIS and GDAL show the map the same way)."""
    from bimors.plots import class_palette

    table = {i: (*(int(round(255 * c)) for c in rgb[:3]), 255) for i, rgb in enumerate(class_palette(n))}
    table[NODATA] = (0, 0, 0, 0)
    return table


def _to_cog(raw: Path, target: Path) -> None:
    """Rewrite the tiled GeoTIFF as a COG (overviews by nearest neighbour: class indices must not
    be averaged)."""
    rasterio.shutil.copy(
        raw, target, driver="COG", compress="DEFLATE", overview_resampling="NEAREST", blocksize=512, BIGTIFF="IF_SAFER"
    )


def _preview(class_map_path: Path, target: Path, classnames: Sequence[str], cfg: SceneConfig, title: str) -> None:
    from bimors.plots import class_map_preview

    with rasterio.open(class_map_path) as ds:
        scale = min(1.0, cfg.preview_max_side / max(ds.height, ds.width))
        shape = (max(1, round(ds.height * scale)), max(1, round(ds.width * scale)))
        classes = ds.read(1, out_shape=shape, resampling=Resampling.nearest)
    fig = class_map_preview(classes.astype(np.int16), classnames, nodata_value=NODATA, title=title.rsplit("/", 1)[-1])
    fig.savefig(target, dpi=100)
