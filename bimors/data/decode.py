"""Image bytes -> ``uint8`` RGB ``(H, W, 3)`` array, for whatever a satellite archive holds.

Rules (the same for every caller, so training, the nightly job and the endpoint see identical pixels):

* TIFF/GeoTIFF goes through rasterio first (any band count, 8/16/32-bit, float, nodata honoured);
  Pillow reads everything else (JPEG, PNG, BMP, WebP) and is the fallback for TIFFs GDAL rejects.
* Bands: ``DecodeConfig.bands`` (1-based) picks R, G, B (one index means grayscale); by default the
  first three bands, and a one- or two-band image (gray, gray+alpha) is replicated to RGB.
* Alpha is dropped, not composited: the stored colour values are kept as they are.
  Palette images are expanded to their colours first.
* Stretch: ``auto`` keeps 8-bit data as is and percentile-stretches anything else per band;
  ``percentile``/``minmax`` stretch per band whatever the bit depth; ``none`` clips to 0..255.
  A constant band (nothing to stretch) becomes 0. Nodata and non-finite pixels are left out of the
  statistics and written as 0.
* Size is checked against ``DecodeConfig.max_pixels`` from the header, before pixels are decoded.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.io import MemoryFile

from bimors.config import DecodeConfig
from bimors.errors import BimorsError

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_STATS_SAMPLE = 1_000_000  # percentiles of more pixels than this use a strided sample

#: Pillow modes whose pixels are used as they are (8-bit gray/colour, 16/32-bit integer, float);
#: palette, bilevel and other colour spaces are converted first.
_DIRECT_MODES = {"L", "LA", "La", "RGB", "RGBA", "RGBa", "RGBX", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"}


# Process-wide rather than per call, because ``warnings.catch_warnings`` is not thread-safe and
# decoding runs in threads (Serve replicas, Ray Data): max_pixels is this module's bomb check, and
# plain (non-geo) TIFF tiles such as UC Merced's would otherwise warn once per tile.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)


class DecodeError(BimorsError, ValueError):
    """The bytes are not an image this module can turn into RGB; the message says what was wrong."""


class ImageTooLargeError(DecodeError):
    """The image has more pixels than ``DecodeConfig.max_pixels`` (checked from the header)."""


def decode_image(data: bytes, cfg: DecodeConfig | None = None) -> np.ndarray:
    """Decode one encoded image to ``uint8`` RGB ``(H, W, 3)``."""
    cfg = cfg or DecodeConfig()
    if not data:
        raise DecodeError("empty file (0 bytes)")
    if data[:4] in _TIFF_MAGIC:
        try:
            selected, valid = _read_with_rasterio(data, cfg)
            return _to_rgb8(selected, valid, cfg)
        except _NotForRasterio as err:
            gdal_reason = str(err)
        try:
            bands = _read_with_pillow(data, cfg)
        except DecodeError as err:
            raise DecodeError(f"unreadable TIFF (GDAL: {gdal_reason}; Pillow: {err})") from None
    else:
        bands = _read_with_pillow(data, cfg)
    return bands_to_rgb(bands, cfg)


# --------------------------------------------------------------------------------------------
# readers: bytes -> (bands, H, W) array in the file's dtype


class _NotForRasterio(Exception):
    pass


def _check_size(width: int, height: int, cfg: DecodeConfig) -> None:
    if width <= 0 or height <= 0:
        raise DecodeError(f"image has no pixels ({width}x{height})")
    if width * height > cfg.max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height:,} pixels, over decode.max_pixels={cfg.max_pixels:,}"
        )


def _read_with_pillow(data: bytes, cfg: DecodeConfig) -> np.ndarray:
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise DecodeError(f"not an image (unrecognised format, starts with {data[:8]!r})") from None
    except Image.DecompressionBombError as err:
        raise DecodeError(f"image refused as a decompression bomb ({err})") from None
    except Exception as err:  # noqa: BLE001 - Pillow plugins raise anything on malformed headers
        raise DecodeError(f"corrupt image header ({type(err).__name__}: {err})") from None
    with image:
        fmt = image.format or "image"
        _check_size(image.width, image.height, cfg)
        try:
            image.seek(0)  # first frame / page of animations and multi-page TIFFs
            image.load()
            return _pillow_bands(image)
        except DecodeError:
            raise
        except Exception as err:  # noqa: BLE001
            raise DecodeError(f"truncated or corrupt {fmt} ({type(err).__name__}: {err})") from None


def _pillow_bands(image: Image.Image) -> np.ndarray:
    """``(bands, H, W)`` from a loaded Pillow image, normalising the odd modes."""
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode == "PA":
        image = image.convert("RGBA")
    elif mode == "1":
        image = image.convert("L")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGB")
    elif mode not in _DIRECT_MODES:
        raise DecodeError(f"unsupported pixel mode {mode!r} in {image.format or 'image'}")
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[None]
    else:
        array = np.moveaxis(array, -1, 0)
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return array


def _read_with_rasterio(data: bytes, cfg: DecodeConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """The selected bands ``(3, H, W)`` and a validity mask (``None`` when every pixel holds data).
    Only the bands asked for are read, which matters for 13-band Sentinel-2 stacks."""
    try:
        with MemoryFile(data) as memfile, memfile.open() as dataset:
            _check_size(dataset.width, dataset.height, cfg)
            indexes = band_indexes(dataset.count, cfg.bands)
            masked = dataset.read(indexes, masked=True)
    except RasterioError as err:
        raise _NotForRasterio(_gdal_reason(err)) from None
    mask = np.ma.getmaskarray(masked)
    return np.ma.getdata(masked), (~mask if mask.any() else None)


def _gdal_reason(err: BaseException) -> str:
    """GDAL's first line, without the in-memory file's random name and pointing past wrappers."""
    cause = err.__cause__ or err.__context__
    if "previous exception" in str(err) and cause is not None:
        err = cause
    text = (str(err).splitlines() or [type(err).__name__])[0]
    text = re.sub(r"\S*[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\.\w+", "", text)
    return text.lstrip(" ,:")


def band_indexes(count: int, bands: Sequence[int] | None) -> list[int]:
    if bands is None:
        return [1, 1, 1] if count < 3 else [1, 2, 3]
    if len(bands) not in (1, 3):
        raise DecodeError(f"decode.bands must list 1 (gray) or 3 (R, G, B) band indices, got {list(bands)}")
    bad = [b for b in bands if not 1 <= b <= count]
    if bad:
        raise DecodeError(
            f"decode.bands {list(bands)} asks for band {bad[0]} but the image has {count} band(s) (1-based)"
        )
    return list(bands) * 3 if len(bands) == 1 else list(bands)


# --------------------------------------------------------------------------------------------
# bands -> 8-bit RGB


Limits = list[tuple[float, float]]


def bands_to_rgb(
    bands: np.ndarray,
    cfg: DecodeConfig | None = None,
    valid: np.ndarray | None = None,
    limits: Limits | None = None,
) -> np.ndarray:
    """``(bands, H, W)`` raster in any dtype -> ``uint8 (H, W, 3)`` following the module's rules.

    Public so the scene tiler can push windows it read itself through the very same rules;
    ``valid`` is a boolean mask (same shape as ``bands``, or ``(H, W)``) of pixels that hold data;
    ``limits`` (per selected band, from :func:`stretch_limits` over the whole scene) replaces the
    per-image statistics, so that neighbouring tiles of one scene get the same colours.
    """
    cfg = cfg or DecodeConfig()
    selected, valid = _select(bands, cfg, valid)
    return _to_rgb8(selected, valid, cfg, limits)


def stretch_limits(bands: np.ndarray, cfg: DecodeConfig | None = None, valid: np.ndarray | None = None) -> Limits | None:
    """Per-band ``(low, high)`` the stretch would use for this raster (typically a scene overview);
    ``None`` when the configured stretch keeps values as they are."""
    cfg = cfg or DecodeConfig()
    selected, valid = _select(bands, cfg, valid)
    valid = _valid_mask(selected, valid)
    if _stretch_kind(selected, cfg) == "none":
        return None
    return [
        _band_limits(selected[i], None if valid is None else valid[i], cfg.stretch if cfg.stretch != "auto" else "percentile", cfg.percentiles)
        for i in range(selected.shape[0])
    ]


def _select(bands: np.ndarray, cfg: DecodeConfig, valid: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    if bands.ndim != 3:
        raise DecodeError(f"expected a (bands, height, width) array, got shape {bands.shape}")
    picks = [i - 1 for i in band_indexes(bands.shape[0], cfg.bands)]
    if valid is not None and valid.ndim == 3:
        valid = valid[picks]
    return np.asarray(bands)[picks], valid


def _valid_mask(selected: np.ndarray, valid: np.ndarray | None) -> np.ndarray | None:
    if valid is not None:
        valid = np.broadcast_to(valid, selected.shape)
    if np.issubdtype(selected.dtype, np.floating):
        finite = np.isfinite(selected)
        if not finite.all():
            valid = finite if valid is None else (valid & finite)
    return valid


def _stretch_kind(selected: np.ndarray, cfg: DecodeConfig) -> str:
    if cfg.stretch == "auto":
        return "none" if selected.dtype == np.uint8 else "percentile"
    return cfg.stretch


def _to_rgb8(selected: np.ndarray, valid: np.ndarray | None, cfg: DecodeConfig, limits: Limits | None = None) -> np.ndarray:
    """Stretch three already-selected bands to ``uint8`` and put channels last."""
    valid = _valid_mask(selected, valid)
    stretch = _stretch_kind(selected, cfg)
    if stretch == "none":
        is_8bit = selected.dtype == np.uint8
        out = selected if is_8bit else np.clip(np.nan_to_num(selected.astype(np.float64)), 0, 255).astype(np.uint8)
    else:
        out = np.empty(selected.shape, np.uint8)
        for i in range(selected.shape[0]):
            band_valid = None if valid is None else valid[i]
            low_high = limits[i] if limits is not None else _band_limits(selected[i], band_valid, stretch, cfg.percentiles)
            out[i] = _scale(selected[i], low_high)
    if valid is not None:
        out = np.where(valid, out, 0).astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(out, 0, -1))


def _band_limits(
    band: np.ndarray, valid: np.ndarray | None, how: str, percentiles: Sequence[float]
) -> tuple[float, float]:
    values = band[valid] if valid is not None else band.reshape(-1)
    if values.size == 0:
        return (0.0, 0.0)
    if values.size > _STATS_SAMPLE:
        values = values[:: values.size // _STATS_SAMPLE + 1]
    values = values.astype(np.float64)
    if how == "minmax":
        return float(values.min()), float(values.max())
    low, high = (float(v) for v in np.percentile(values, list(percentiles)))
    return low, high


def _scale(band: np.ndarray, low_high: tuple[float, float]) -> np.ndarray:
    low, high = low_high
    if not high > low:  # constant band (or no data): there is no contrast to stretch
        return np.zeros(band.shape, np.uint8)
    scaled = (np.nan_to_num(band.astype(np.float64), nan=low) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
