"""Whole-scene inference, the parts: plan a scene, cut it into tiles, read a tile, write the outputs.

A scene is planned once (:func:`plan_scene`: size, bands, georeferencing and the stretch from one
decimated overview read), cut into :func:`tile_rows`, each tile read as a window
(:func:`read_tile_row`), classified, and the outputs written from the tile rows alone
(:func:`write_scene`): a row holds the tile's class and its owned-pixels mask, never pixels, so
memory stays bounded whatever the scene size. Every pixel belongs to exactly one tile (the one whose
centre is nearest), so overlapping tiles (``stride < tile_size``) never fight over a pixel.

:mod:`bimors.pipelines.scene_pipeline` runs these parts as a Ray Data pipeline (the nightly job and
the endpoint's scene jobs); :func:`classify_scene` runs them in one process.

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
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.windows import Window

from bimors import storage
from bimors.config import SceneConfig, StorageConfig
from bimors.data.decode import DecodeError, Limits, band_indexes, bands_to_rgb, stretch_limits
from bimors.data.manifest import tile_id
from bimors.data.tiles import fit_within
from bimors.errors import BimorsError

log = logging.getLogger(__name__)

#: Tiles -> ([N, C] probabilities, N captions), for :func:`classify_scene`: ``Predictor.predict_images``
#: or, in tests, an oracle.
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
# planning and reading


@dataclass(frozen=True)
class ScenePlan:
    """What every stage needs to know about a scene, found once on the driver: its size, the bands
    to read, the scene-wide stretch (from one overview read) and the georeferencing of the outputs.
    Small and picklable: tiles travel with a scene index into a table of plans, never with pixels."""

    uri: str
    height: int
    width: int
    indexes: tuple[int, ...]
    limits: Limits | None
    crs: str | None  # WKT; None: not georeferenced (pixel coordinates)
    transform: tuple[float, ...] | None  # affine (a, b, c, d, e, f); None: not georeferenced

    def grid(self, cfg: SceneConfig) -> list[GridTile]:
        return tile_grid(self.height, self.width, cfg)

    @property
    def affine(self) -> Affine:
        return Affine(*self.transform) if self.transform else Affine.identity()

    def bounds(self, window: Window) -> tuple[float, float, float, float]:
        """(minx, miny, maxx, maxy) of a window in the scene CRS (pixel coordinates if it has none)."""
        left, bottom, right, top = rasterio.windows.bounds(window, self.affine)
        return min(left, right), min(bottom, top), max(left, right), max(bottom, top)


class SceneReader:
    """A raster opened for windowed reads from a local path or any fsspec URL (rasterio/GDAL reads
    the byte ranges it needs through fsspec, so a COG on S3 is never downloaded whole).

    Opened without a ``plan`` it checks the scene and computes the stretch (planning); opened with
    one (a read actor) it reuses the plan's stretch, so every tile of a scene gets the same colours."""

    def __init__(
        self, uri: str, cfg: SceneConfig, storage_cfg: StorageConfig | None = None, max_pixels: int | None = None,
        plan: ScenePlan | None = None,
    ):
        self.uri = uri
        self.cfg = cfg
        try:
            if storage.is_remote(uri):
                fs, path = storage.filesystem(uri, storage_cfg)
                if plan is None and not fs.exists(path):
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
            raise storage.storage_error(uri, err, storage_cfg) from None
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
        self.limits = plan.limits if plan is not None else self._scene_limits()

    def __enter__(self) -> "SceneReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.dataset.close()

    @property
    def height(self) -> int:
        return self.dataset.height

    @property
    def width(self) -> int:
        return self.dataset.width

    def plan(self) -> ScenePlan:
        src = self.dataset
        georeferenced = src.crs is not None or not src.transform.is_identity
        return ScenePlan(
            self.uri, src.height, src.width, tuple(self.indexes), self.limits,
            src.crs.to_wkt() if src.crs else None, tuple(src.transform)[:6] if georeferenced else None,
        )

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
        """The stretch for the whole scene, from one decimated overview read (none needed for 8-bit
        data under the ``auto`` stretch). A scene with a few unreadable blocks (a torn upload, a bad
        sector) is not lost to them: the overview is then read in parts and the bad parts skipped;
        the tiles over them fail on their own later."""
        dtypes = {self.dataset.dtypes[i - 1] for i in self.indexes}
        if self._selected.stretch == "none" or (self._selected.stretch == "auto" and dtypes == {"uint8"}):
            return None
        scale = min(1.0, self.cfg.stats_max_side / max(self.height, self.width))
        shape = (max(1, round(self.height * scale)), max(1, round(self.width * scale)))
        try:
            values, valid = self.read(out_shape=shape)
        except RasterioError as err:
            values, valid = self._overview_in_parts(shape, err)
        return stretch_limits(values, self._selected, valid)

    def _overview_in_parts(self, shape: tuple[int, int], first: RasterioError, parts: int = 16) -> tuple[np.ndarray, np.ndarray]:
        step_r, step_c = -(-self.height // parts), -(-self.width // parts)
        values = np.zeros((len(self.indexes), *shape), self.dataset.dtypes[self.indexes[0] - 1])
        valid = np.zeros(shape, bool)
        sy, sx = shape[0] / self.height, shape[1] / self.width
        failed = 0
        for r0 in range(0, self.height, step_r):
            for c0 in range(0, self.width, step_c):
                h, w = min(step_r, self.height - r0), min(step_c, self.width - c0)
                y0, y1 = int(r0 * sy), max(int(r0 * sy) + 1, int((r0 + h) * sy))
                x0, x1 = int(c0 * sx), max(int(c0 * sx) + 1, int((c0 + w) * sx))
                try:
                    part, ok = self.read(Window(c0, r0, w, h), out_shape=(y1 - y0, x1 - x0))
                except RasterioError:
                    failed += 1
                    continue
                values[:, y0:y1, x0:x1], valid[y0:y1, x0:x1] = part, ok
        if not valid.any():
            raise SceneError(f"{self.uri}: not a readable raster image ({_first_line(first)})")
        log.warning("%s: %d of %d parts of the overview could not be read (%s); stretch from the rest", self.uri, failed, parts * parts, _first_line(first))
        return values, valid


def plan_scene(uri: str, cfg: SceneConfig, storage_cfg: StorageConfig | None = None, max_pixels: int | None = None) -> ScenePlan:
    """Open the scene, check it (readable, size, bands) and compute its stretch; raises
    :class:`SceneError` or ``StorageError`` for a scene that cannot be classified at all."""
    with gdal_env(cfg), SceneReader(uri, cfg, storage_cfg, max_pixels) as reader:
        return reader.plan()


def gdal_env(cfg: SceneConfig) -> rasterio.Env:
    """GDAL settings while scenes are read or written: a bounded block cache (see ``gdal_cache_mb``)."""
    return rasterio.Env(**({"GDAL_CACHEMAX": cfg.gdal_cache_mb * 2**20} if cfg.gdal_cache_mb else {}))


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


# --------------------------------------------------------------------------------------------
# tiles: what flows through the stages (one row per tile; pixels only between read and classify)


def tile_rows(plan: ScenePlan, cfg: SceneConfig, scene: int = 0) -> list[dict[str, Any]]:
    """One row per grid tile of a planned scene: where it is and which pixels it owns; ``scene`` is
    the plan's index in the run."""
    rows = []
    for tile in plan.grid(cfg):
        w = tile.window
        window = (int(w.col_off), int(w.row_off), int(w.width), int(w.height))
        rows.append({
            "scene": scene, "tile_id": tile_id(plan.uri, window),
            "row_off": window[1], "col_off": window[0], "height": window[3], "width": window[2],
            **dict(zip(("minx", "miny", "maxx", "maxy"), plan.bounds(w))),
            "owned": list(tile.owned),
        })
    return rows


def read_tile_row(reader: SceneReader, row: dict[str, Any], max_side: int) -> tuple[np.ndarray | None, bytes, str, str]:
    """Read one tile: (uint8 RGB or None, its owned-pixels mask, stage, error).

    ``stage`` is "" for a tile to classify, ``nodata`` for one without data, ``read`` when the
    window could not be read. The mask covers the pixels the tile owns, bit-packed, and is empty
    when they all hold data (the common case), so a row stays small after the pixels are dropped."""
    window = Window(row["col_off"], row["row_off"], row["width"], row["height"])
    try:
        values, valid = reader.read(window)
    except RasterioError as err:
        return None, b"", "read", _first_line(err)
    if not valid.any():
        return None, b"", "nodata", ""
    r0, r1, c0, c1 = (int(v) for v in row["owned"])
    owned = valid[r0 - row["row_off"] : r1 - row["row_off"], c0 - row["col_off"] : c1 - row["col_off"]]
    mask = b"" if owned.all() else np.packbits(owned).tobytes()
    return fit_within(reader.rgb(values, valid), max_side), mask, "", ""


def owned_mask(row: dict[str, Any]) -> np.ndarray:
    """The owned-pixels mask of a tile row, unpacked (all True when the row carries none)."""
    r0, r1, c0, c1 = (int(v) for v in row["owned"])
    shape = (r1 - r0, c1 - c0)
    if not row.get("mask"):
        return np.ones(shape, bool)
    return np.unpackbits(np.frombuffer(row["mask"], np.uint8), count=shape[0] * shape[1]).astype(bool).reshape(shape)


# --------------------------------------------------------------------------------------------
# classifying in this process (the nightly job and the endpoint use bimors.pipelines.scene_pipeline)


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
    """Classify every tile of a scene in this process, ``cfg.classify.batch_size`` tiles per
    ``classify`` call, and write the outputs under ``output_uri``.

    The same plan, window reads and output writer as the distributed path, for a single process
    (tests with an oracle classifier, the memory benchmark, a notebook). A tile that cannot be read
    or classified is recorded (status ``error``) and the rest go on; a scene that cannot be opened
    at all raises :class:`SceneError` or ``StorageError``."""
    check_classes(classnames)
    started = time.time()
    plan = plan_scene(scene_uri, cfg, storage_cfg, max_pixels)
    rows = tile_rows(plan, cfg)
    size = cfg.classify.batch_size
    with gdal_env(cfg), SceneReader(scene_uri, cfg, storage_cfg, max_pixels, plan=plan) as reader:
        for i in range(0, len(rows), size):
            batch = rows[i : i + size]
            images = []
            for row in batch:
                image, row["mask"], row["stage"], row["error"] = read_tile_row(reader, row, cfg.max_side)
                if image is not None:
                    images.append(image)
            pending = [row for row in batch if not row["stage"]]
            if pending:
                try:
                    probs, captions = classify(images)
                except Exception as err:  # noqa: BLE001 - one failing batch is recorded, the scene goes on
                    for row in pending:
                        row.update(stage="classify", error=f"{type(err).__name__}: {_first_line(err)}")
                else:
                    for row, p, caption in zip(pending, probs, captions, strict=True):
                        best = int(p.argmax())
                        row.update(class_index=best, probability=float(p[best]), caption=caption)
            if progress:
                progress(min(i + size, len(rows)), len(rows))
    return write_scene(plan, rows, output_uri, classnames, cfg, storage_cfg, model or {}, started=started)


def check_classes(classnames: Sequence[str]) -> None:
    if len(classnames) > MAX_CLASSES - 1:
        raise SceneError(f"at most {MAX_CLASSES - 1} classes fit a uint8 class map, got {len(classnames)}")


def write_scene(
    plan: ScenePlan,
    rows: Sequence[dict[str, Any]],
    output_uri: str,
    classnames: Sequence[str],
    cfg: SceneConfig,
    storage_cfg: StorageConfig | None = None,
    model: dict[str, Any] | None = None,
    started: float | None = None,
) -> SceneResult:
    """Every tile row of a scene (classified, nodata or failed) -> the outputs under
    ``output_uri``, ``summary.json`` last (its presence means the scene is finished); ``started``
    (wall clock) is when work on the scene began, for the summary's ``seconds``.

    Rows carry ``stage`` ("" classified, ``nodata``, else where it failed), ``error``, and for
    classified tiles ``class_index``, ``probability``, ``caption`` and ``mask``. Only rows are
    needed, never pixels: the class map is painted from each tile's class and owned mask."""
    started = time.time() if started is None else started
    model = model or {}
    rows = sorted(rows, key=lambda r: (r["row_off"], r["col_off"]))
    with gdal_env(cfg), tempfile.TemporaryDirectory(prefix="bimors-scene-") as tmp:
        work = Path(tmp)
        with _class_map(work / "raw.tif", plan, classnames) as class_map:
            for row in rows:
                if not row.get("stage"):
                    _paint(class_map, row)
        _to_cog(work / "raw.tif", work / "class_map.tif")
        records = [_tile_record(row, plan.uri, classnames) for row in rows]
        schema = TILE_SCHEMA.with_metadata({
            "crs": rasterio.crs.CRS.from_wkt(plan.crs).to_string() if plan.crs else "",
            "class_names": json.dumps(list(classnames)), "scene": plan.uri, "model": json.dumps(model),
        })
        pq.write_table(pa.Table.from_pylist(records, schema=schema), work / "tiles.parquet")
        _preview(work / "class_map.tif", work / "preview.png", classnames, cfg, plan.uri)

        statuses = [r["status"] for r in records]
        histogram: dict[str, int] = {}
        for r in records:
            if r["status"] == "ok":
                histogram[str(r["class_name"])] = histogram.get(str(r["class_name"]), 0) + 1
        result = SceneResult(
            scene=plan.uri, output=output_uri, width=plan.width, height=plan.height, tiles=len(records),
            classified=statuses.count("ok"), nodata=statuses.count("nodata"), errors=statuses.count("error"),
            classes=dict(sorted(histogram.items(), key=lambda kv: -kv[1])), model=model,
        )
        for name in ("class_map.tif", "tiles.parquet", "preview.png"):
            target = storage.join(output_uri, name)
            storage.put_file(work / name, target, storage_cfg)
            result.outputs[name.split(".")[0]] = target
        result.outputs["summary"] = storage.join(output_uri, "summary.json")
        result.seconds = round(time.time() - started, 3)
        storage.write_bytes(result.outputs["summary"], result.to_json().encode(), storage_cfg)
    return result


def _tile_record(row: dict[str, Any], scene_uri: str, classnames: Sequence[str]) -> dict[str, Any]:
    stage = row.get("stage") or ""
    record = {name: row[name] for name in ("tile_id", "row_off", "col_off", "height", "width", "minx", "miny", "maxx", "maxy")}
    record.update(scene=scene_uri, class_index=None, class_name=None, probability=None, caption=None, error=None)
    if not stage:
        index = int(row["class_index"])
        record.update(status="ok", class_index=index, class_name=classnames[index],
                      probability=float(row["probability"]), caption=str(row.get("caption") or ""))
    elif stage == "nodata":
        record["status"] = "nodata"
    else:
        record.update(status="error", error=f"{stage}: {row.get('error') or ''}")
    return record


def _paint(class_map: "rasterio.io.DatasetWriter", row: dict[str, Any]) -> None:
    """Fill the part of the scene a classified tile owns; pixels without data stay nodata."""
    r0, r1, c0, c1 = (int(v) for v in row["owned"])
    mask = owned_mask(row)
    confidence = np.uint8(min(100, round(float(row["probability"]) * 100)))
    bands = np.full((2, *mask.shape), NODATA, np.uint8)
    bands[0][mask] = int(row["class_index"])
    bands[1][mask] = confidence
    class_map.write(bands, window=Window(c0, r0, c1 - c0, r1 - r0))


# --------------------------------------------------------------------------------------------
# outputs


def _class_map(path: Path, plan: ScenePlan, classnames: Sequence[str]) -> "rasterio.io.DatasetWriter":
    out = rasterio.open(
        path, "w", driver="GTiff", width=plan.width, height=plan.height, count=2, dtype="uint8",
        nodata=NODATA, tiled=True, blockxsize=256, blockysize=256, compress="deflate", BIGTIFF="IF_SAFER",
        **({"crs": rasterio.crs.CRS.from_wkt(plan.crs) if plan.crs else None, "transform": plan.affine} if plan.transform else {}),
    )
    out.update_tags(class_names=json.dumps(list(classnames)), source=plan.uri, software="bimors")
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
