"""A procedural remote-sensing-like scene dataset, so the whole system runs offline on a laptop.

Each class name gets a texture that looks roughly like that scene from above (forest canopy,
a meandering river, a residential roof grid, dunes, piers and boats, ...); unknown class names get
a distinctive pattern derived from the name. Every image is a pure function of
(seed, class name, index, size), seeded through SHA-256 rather than ``hash()``, so the same config
produces the same pixels on every machine. The classes differ in colour and layout enough that a
linear probe on raw pixels beats chance, which is all a smoke test of the learning stack needs.

The dataset is written in the class-folder layout (``<root>/<class>/<class>_0000.png``) to any
fsspec URL. A marker file records the config's fingerprint; writing the same dataset again writes
nothing, and a different config replaces only the files this generator wrote before.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from fsspec import AbstractFileSystem
from PIL import Image

from bimors import storage
from bimors.config import StorageConfig, SyntheticConfig
from bimors.data.catalog import DatasetError

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
MARKER_NAME = ".bimors-synthetic.json"  # hidden, so dataset readers skip it
ImageFormat = Literal["png", "jpeg"]
_EXTENSIONS = {"png": "png", "jpeg": "jpg"}


@dataclass(frozen=True)
class SyntheticDataset:
    """What :func:`generate_synthetic` produced: ``written`` is 0 when the root was already complete."""

    root: str
    classes: tuple[str, ...]
    files: int
    written: int
    fingerprint: str


# --------------------------------------------------------------------------------------------
# drawing helpers: float32 images in [0, 1], coordinates in [0, 1)

RGB = tuple[float, float, float]
GRASS: RGB = (0.36, 0.52, 0.24)
DARK_GREEN: RGB = (0.10, 0.30, 0.12)
LIGHT_GREEN: RGB = (0.55, 0.70, 0.30)
WATER: RGB = (0.10, 0.28, 0.48)
SAND: RGB = (0.86, 0.77, 0.56)
SOIL: RGB = (0.55, 0.42, 0.28)
ASPHALT: RGB = (0.33, 0.33, 0.35)
CONCRETE: RGB = (0.72, 0.71, 0.68)
WHITE: RGB = (0.93, 0.93, 0.91)
ROOFS: tuple[RGB, ...] = ((0.66, 0.30, 0.24), (0.50, 0.50, 0.52), (0.45, 0.32, 0.24), (0.80, 0.55, 0.40))
CARS: tuple[RGB, ...] = (
    (0.85, 0.85, 0.85), (0.10, 0.10, 0.12), (0.70, 0.12, 0.10), (0.20, 0.30, 0.60), (0.60, 0.60, 0.62),
)


@dataclass(frozen=True)
class _Grid:
    size: int
    y: np.ndarray  # row coordinate, 0..1
    x: np.ndarray  # column coordinate, 0..1

    @classmethod
    def of(cls, size: int) -> _Grid:
        axis = (np.arange(size, dtype=np.float32) + 0.5) / size
        y, x = np.meshgrid(axis, axis, indexing="ij")
        return cls(size, y, x)

    def rotated(self, angle: float) -> tuple[np.ndarray, np.ndarray]:
        """Coordinates centred on the tile and rotated by ``angle`` (radians): (along, across)."""
        c, s = math.cos(angle), math.sin(angle)
        dx, dy = self.x - 0.5, self.y - 0.5
        return dx * c + dy * s, -dx * s + dy * c


def _noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth value noise in [0, 1]: a random lattice, bicubically eased between its points."""
    lattice = rng.random((cells + 1, cells + 1), dtype=np.float32)
    t = np.arange(size, dtype=np.float32) * (cells / size)
    i = np.minimum(t.astype(np.int64), cells - 1)
    f = t - i
    f = f * f * (3 - 2 * f)
    rows0, rows1 = lattice[i], lattice[i + 1]
    top = rows0[:, i] * (1 - f) + rows0[:, i + 1] * f
    bottom = rows1[:, i] * (1 - f) + rows1[:, i + 1] * f
    return top * (1 - f)[:, None] + bottom * f[:, None]


def _fbm(rng: np.random.Generator, size: int, cells: tuple[int, ...] = (3, 7, 15)) -> np.ndarray:
    total = sum(_noise(rng, size, c) / (k + 1) for k, c in enumerate(cells))
    return total / sum(1 / (k + 1) for k in range(len(cells)))


def _fill(size: int, color: RGB | np.ndarray) -> np.ndarray:
    return np.broadcast_to(np.asarray(color, np.float32), (size, size, 3)).copy()


def _paint(image: np.ndarray, mask: np.ndarray, color: RGB | np.ndarray) -> None:
    """Blend ``color`` where ``mask`` (bool or 0..1 coverage) is set, in place."""
    cover = mask.astype(np.float32)[..., None]
    image *= 1 - cover
    image += cover * np.asarray(color, np.float32)


def _jitter(rng: np.random.Generator, color: RGB, amount: float = 0.06) -> np.ndarray:
    return np.clip(np.asarray(color, np.float32) * (1 + rng.normal(0, amount, 3)), 0, 1).astype(np.float32)


def _shade(image: np.ndarray, field: np.ndarray, strength: float) -> None:
    image *= (1 - strength / 2 + strength * field)[..., None]


def _ground(rng: np.random.Generator, g: _Grid, a: RGB, b: RGB) -> np.ndarray:
    """Mottled ground mixing two colours."""
    mix = _fbm(rng, g.size)[..., None]
    return _jitter(rng, a) * (1 - mix) + _jitter(rng, b) * mix


# --------------------------------------------------------------------------------------------
# one painter per scene type


def _forest(rng: np.random.Generator, g: _Grid) -> np.ndarray:
    image = _fill(g.size, _jitter(rng, DARK_GREEN))
    _shade(image, _fbm(rng, g.size), 0.6)
    crowns = _noise(rng, g.size, max(4, g.size // 5)) > 0.55
    _paint(image, crowns * 0.6, _jitter(rng, (0.20, 0.45, 0.18)))
    return image


def _meadow(rng: np.random.Generator, g: _Grid) -> np.ndarray:
    image = _fill(g.size, _jitter(rng, LIGHT_GREEN))
    along, _ = g.rotated(rng.uniform(0, math.pi))
    _shade(image, 0.5 + 0.5 * np.sin(along * 2 * math.pi * rng.uniform(5, 9)), 0.12)
    _shade(image, _noise(rng, g.size, 3), 0.25)
    return image


def _river(rng: np.random.Generator, g: _Grid) -> np.ndarray:
    image = _ground(rng, g, GRASS, SOIL)
    along, across = g.rotated(rng.uniform(0, math.pi))
    centre = rng.uniform(0.05, 0.15) * np.sin(2 * math.pi * rng.uniform(0.8, 1.6) * along + rng.uniform(0, 2 * math.pi))
    distance = np.abs(across - centre)
    width = rng.uniform(0.07, 0.12)
    _paint(image, distance < width + 0.02, _jitter(rng, SAND))
    _paint(image, distance < width, _jitter(rng, WATER))
    return image


def _beach(rng: np.random.Generator, g: _Grid) -> np.ndarray:
    along, across = g.rotated(rng.uniform(0, 2 * math.pi))
    shore = across - 0.04 * np.sin(2 * math.pi * 3 * along + rng.uniform(0, 6)) - rng.uniform(-0.15, 0.15)
    image = _fill(g.size, _jitter(rng, SAND))
    _shade(image, _noise(rng, g.size, 6), 0.15)
    water = _jitter(rng, (0.15, 0.45, 0.60))
    _paint(image, np.clip(shore * 12, 0, 1), water)
    _paint(image, np.abs(shore) < 0.015, WHITE)
    return image


def _desert(rng: np.random.Generator, g: _Grid) -> np.ndarray:
    image = _fill(g.size, _jitter(rng, (0.88, 0.70, 0.45)))
    along, _ = g.rotated(rng.uniform(0, math.pi))
    warp = _noise(rng, g.size, 3)
    dunes = 0.5 + 0.5 * np.sin(2 * math.pi * (rng.uniform(4, 7) * along + 1.5 * warp))
    _shade(image, dunes, 0.35)
    return image


def _dense_residential(rng: np.random.Generator, g: _Grid) -> np.ndarray:
    image = _fill(g.size, _jitter(rng, ASPHALT))
    along, across = g.rotated(rng.choice([0.0, rng.uniform(0, math.pi / 2)]))
    period = rng.uniform(0.11, 0.16)
    u, v = (along + 1) / period, (across + 1) / period
    fu, fv = u - np.floor(u), v - np.floor(v)
    roof = (fu > 0.12) & (fu < 0.88) & (fv > 0.15) & (fv < 0.85)
    palette = np.stack([_jitter(rng, c) for c in ROOFS])
    which = rng.integers(0, len(ROOFS), (64, 64))[np.floor(u).astype(int) % 64, np.floor(v).astype(int) % 64]
    _paint(image, roof, palette[which])
    return image


def _sparse_residential(rng: np.random.Generator, g: _Grid) -> np.ndarray:
    image = _ground(rng, g, GRASS, DARK_GREEN)
    along, across = g.rotated(rng.uniform(0, math.pi))
    _paint(image, np.abs(across) < 0.03, _jitter(rng, ASPHALT))
    for _ in range(rng.integers(4, 8)):
        cx, cy, half = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.04, 0.07)
        house = (np.abs(g.x - cx) < half) & (np.abs(g.y - cy) < half * 0.7)
        _paint(image, house, _jitter(rng, ROOFS[int(rng.integers(len(ROOFS)))]))
    return image


def _harbor(rng: np.random.Generator, g: _Grid) -> np.ndarray:
    image = _fill(g.size, _jitter(rng, WATER))
    _shade(image, _noise(rng, g.size, 4), 0.15)
    along, across = g.rotated(rng.choice([0.0, math.pi / 2, math.pi, 3 * math.pi / 2]))
    quay = -0.5 + rng.uniform(0.15, 0.3)
    _paint(image, across < quay, _jitter(rng, CONCRETE))
    period, length = rng.uniform(0.15, 0.22), rng.uniform(0.25, 0.45)
    phase = ((along + 1) / period) % 1
    _paint(image, (across >= quay) & (across < quay + length) & (phase < 0.18), _jitter(rng, CONCRETE))
    for _ in range(rng.integers(4, 9)):  # boats moored between the piers
        bx, by = rng.uniform(-0.45, 0.45), rng.uniform(quay + 0.05, quay + length + 0.1)
        boat = (np.abs(along - bx) < 0.015) & (np.abs(across - by) < 0.045)
        _paint(image, boat, WHITE)
    return image


def _bridge(rng: np.random.Generator, g: _Grid) -> np.ndarray:
    image = _ground(rng, g, GRASS, SOIL)
    along, across = g.rotated(rng.uniform(0, math.pi))
    _paint(image, np.abs(across) < rng.uniform(0.15, 0.25), _jitter(rng, WATER))
    centre = rng.uniform(-0.15, 0.15)
    deck = np.abs(along - centre) < 0.045
    _paint(image, deck, _jitter(rng, CONCRETE))
    _paint(image, (np.abs(along - centre) < 0.004) & (np.abs(across) < 0.3), WHITE)
    return image


def _roads(rng: np.random.Generator, g: _Grid, ground: np.ndarray, angle: float, offsets: tuple[float, ...]) -> None:
    along, across = g.rotated(angle)
    for offset in offsets:
        road = np.abs(across - offset) < 0.06
        _paint(ground, road, _jitter(rng, ASPHALT, 0.03))
        dashes = (np.abs(across - offset) < 0.006) & (((along + 1) * 12) % 1 < 0.5)
        _paint(ground, dashes, WHITE)


def _intersection(rng: np.random.Generator, g: _Grid) -> np.ndarray:
    image = _ground(rng, g, GRASS, CONCRETE)
    angle = rng.uniform(0, math.pi)
    _roads(rng, g, image, angle, (rng.uniform(-0.1, 0.1),))
    _roads(rng, g, image, angle + math.pi / 2, (rng.uniform(-0.1, 0.1),))
    return image


def _overpass(rng: np.random.Generator, g: _Grid) -> np.ndarray:
    image = _ground(rng, g, GRASS, SOIL)
    angle = rng.uniform(0, math.pi)
    _roads(rng, g, image, angle, (-0.08, 0.08))
    along, across = g.rotated(angle + math.pi / 2 + rng.uniform(-0.4, 0.4))
    _paint(image, np.abs(across - 0.03) < 0.06, 0.25 * np.ones(3, np.float32))  # shadow of the deck
    _paint(image, np.abs(across) < 0.06, _jitter(rng, CONCRETE))
    ring = np.abs(np.hypot(g.x - 0.5, g.y - 0.5) - rng.uniform(0.3, 0.4)) < 0.03
    _paint(image, ring, _jitter(rng, ASPHALT))
    return image


def _parking(rng: np.random.Generator, g: _Grid) -> np.ndarray:
    image = _fill(g.size, _jitter(rng, ASPHALT))
    along, across = g.rotated(rng.choice([0.0, math.pi / 2]))
    slot_w, row_h = rng.uniform(0.05, 0.07), rng.uniform(0.16, 0.2)
    u, v = (along + 1) / slot_w, (across + 1) / row_h
    fu, fv = u - np.floor(u), v - np.floor(v)
    _paint(image, (fu < 0.08) & (fv < 0.7), WHITE)
    car = (fu > 0.2) & (fu < 0.8) & (fv > 0.1) & (fv < 0.6)
    occupied = rng.random((64, 64)) < 0.75
    colour = rng.integers(0, len(CARS), (64, 64))
    cu, cv = np.floor(u).astype(int) % 64, np.floor(v).astype(int) % 64
    _paint(image, car & occupied[cu, cv], np.asarray(CARS, np.float32)[colour[cu, cv]])
    return image


def _storage_tank(rng: np.random.Generator, g: _Grid) -> np.ndarray:
    image = _ground(rng, g, SOIL, CONCRETE)
    for _ in range(rng.integers(3, 7)):
        cx, cy, r = rng.uniform(0.15, 0.85), rng.uniform(0.15, 0.85), rng.uniform(0.07, 0.14)
        _paint(image, np.hypot(g.x - cx - 0.02, g.y - cy - 0.02) < r, 0.2 * np.ones(3, np.float32))
        distance = np.hypot(g.x - cx, g.y - cy)
        _paint(image, distance < r, _jitter(rng, WHITE, 0.03))
        _paint(image, np.abs(distance - r * 0.6) < 0.01, _jitter(rng, CONCRETE))
    return image


def _baseball_field(rng: np.random.Generator, g: _Grid) -> np.ndarray:
    image = _fill(g.size, _jitter(rng, (0.30, 0.58, 0.25)))
    _shade(image, _noise(rng, g.size, 4), 0.15)
    corner = rng.integers(4)
    hx, hy = (0.15 if corner % 2 == 0 else 0.85), (0.15 if corner < 2 else 0.85)
    sx, sy = (1 if hx < 0.5 else -1), (1 if hy < 0.5 else -1)
    dx, dy = (g.x - hx) * sx, (g.y - hy) * sy
    radius = np.hypot(dx, dy)
    in_fan = (dx > 0) & (dy > 0)
    _paint(image, in_fan & (radius < rng.uniform(0.35, 0.45)), _jitter(rng, (0.72, 0.50, 0.32)))
    _paint(image, in_fan & (np.maximum(dx, dy) < 0.22) & (radius > 0.04), _jitter(rng, (0.30, 0.58, 0.25)))
    _paint(image, ((np.abs(dx) < 0.008) | (np.abs(dy) < 0.008)) & (radius < 0.7), WHITE)
    return image


def _railway(rng: np.random.Generator, g: _Grid) -> np.ndarray:
    image = _ground(rng, g, GRASS, SOIL)
    _, across = g.rotated(rng.uniform(0, math.pi))
    tracks = int(rng.integers(2, 5))
    spacing = 0.07
    first = -spacing * (tracks - 1) / 2
    _paint(image, np.abs(across) < spacing * tracks / 2 + 0.02, _jitter(rng, (0.45, 0.42, 0.40)))
    for k in range(tracks):
        centre = first + k * spacing
        _paint(image, np.abs(np.abs(across - centre) - 0.015) < 0.004, 0.12 * np.ones(3, np.float32))
    return image


def _stadium(rng: np.random.Generator, g: _Grid) -> np.ndarray:
    image = _fill(g.size, _jitter(rng, CONCRETE))
    along, across = g.rotated(rng.uniform(0, math.pi))
    ellipse = np.hypot(along / 0.42, across / 0.30)
    _paint(image, ellipse < 1.15, _jitter(rng, (0.45, 0.45, 0.48)))
    _paint(image, ellipse < 1.0, _jitter(rng, (0.70, 0.28, 0.22)))
    _paint(image, ellipse < 0.78, _jitter(rng, (0.25, 0.60, 0.25)))
    _paint(image, (ellipse < 0.78) & (np.abs(along) < 0.004), WHITE)
    return image


def _named_pattern(classname: str) -> Callable[[np.random.Generator, _Grid], np.ndarray]:
    """A pattern fixed by the class name (colours, kind, scale, angle), varied per image only a
    little, so every unknown class is consistent with itself and distinct from the others."""
    identity = np.random.default_rng(_seed_int("class", classname))
    colours = identity.random((2, 3)).astype(np.float32) * 0.8 + 0.1
    kind = int(identity.integers(4))
    frequency = float(identity.uniform(3, 9))
    angle = float(identity.uniform(0, math.pi))

    def paint(rng: np.random.Generator, g: _Grid) -> np.ndarray:
        along, across = g.rotated(angle + rng.normal(0, 0.1))
        phase = rng.uniform(0, 2 * math.pi)
        if kind == 0:  # stripes
            field = np.sin(2 * math.pi * frequency * along + phase) > 0
        elif kind == 1:  # checkerboard
            field = (np.sin(2 * math.pi * frequency * along + phase) * np.sin(2 * math.pi * frequency * across)) > 0
        elif kind == 2:  # dots
            field = (np.sin(2 * math.pi * frequency * along + phase) + np.sin(2 * math.pi * frequency * across)) > 1.2
        else:  # rings
            field = np.sin(2 * math.pi * frequency * np.hypot(along, across) + phase) > 0
        image = _fill(g.size, _jitter(rng, tuple(colours[0]), 0.04))
        _paint(image, field, _jitter(rng, tuple(colours[1]), 0.04))
        return image

    return paint


_PAINTERS: dict[str, Callable[[np.random.Generator, _Grid], np.ndarray]] = {
    "forest": _forest,
    "meadow": _meadow,
    "river": _river,
    "beach": _beach,
    "desert": _desert,
    "denseresidential": _dense_residential,
    "sparseresidential": _sparse_residential,
    "harbor": _harbor,
    "bridge": _bridge,
    "intersection": _intersection,
    "overpass": _overpass,
    "parking": _parking,
    "storagetank": _storage_tank,
    "baseballfield": _baseball_field,
    "railway": _railway,
    "stadium": _stadium,
}
#: Other spellings of the same scenes across the catalog's datasets.
_ALIASES = {
    "denseresidentialarea": "denseresidential", "sparseresidentialarea": "sparseresidential",
    "harborport": "harbor", "port": "harbor", "parkinglot": "parking", "storagetanks": "storagetank",
    "baseballdiamond": "baseballfield", "woods": "forest", "grassland": "meadow",
}


def _painter_for(classname: str) -> Callable[[np.random.Generator, _Grid], np.ndarray]:
    key = re.sub(r"[^a-z]", "", classname.lower())
    key = _ALIASES.get(key, key)
    return _PAINTERS.get(key) or _named_pattern(classname)


def has_texture(classname: str) -> bool:
    """Whether ``classname`` has a hand-made scene texture (otherwise it gets a named pattern)."""
    key = re.sub(r"[^a-z]", "", classname.lower())
    return _ALIASES.get(key, key) in _PAINTERS


def _seed_int(*parts: object) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def render_tile(classname: str, index: int, size: int, seed: int = 0) -> np.ndarray:
    """Image ``index`` of ``classname``: ``uint8 (size, size, 3)``, a pure function of its arguments."""
    rng = np.random.default_rng(_seed_int("tile", seed, classname, index))
    image = _painter_for(classname)(rng, _Grid.of(size))
    image *= rng.uniform(0.85, 1.15)  # illumination
    image += rng.normal(0, 0.02, image.shape).astype(np.float32)  # sensor noise
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# writing a dataset


def image_relpath(classname: str, index: int, image_format: ImageFormat = "png") -> str:
    return f"{classname}/{classname}_{index:04d}.{_EXTENSIONS[image_format]}"


def _expected_files(config: dict, image_format: ImageFormat) -> list[str]:
    return [
        image_relpath(c, i, image_format) for c in config["classes"] for i in range(config["images_per_class"])
    ]


def fingerprint(cfg: SyntheticConfig, image_format: ImageFormat = "png") -> str:
    """Hash of everything that determines the files (config, format, generator version)."""
    payload = json.dumps(
        {"version": GENERATOR_VERSION, "format": image_format, "config": cfg.model_dump(mode="json")},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _encode(image: np.ndarray, image_format: ImageFormat) -> bytes:
    buffer = io.BytesIO()
    if image_format == "png":
        Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    else:
        Image.fromarray(image).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def generate_synthetic(
    root: str,
    cfg: SyntheticConfig | None = None,
    storage_cfg: StorageConfig | None = None,
    image_format: ImageFormat = "png",
) -> SyntheticDataset:
    """Write the synthetic dataset under ``root`` (path or fsspec URL) unless it is already there.

    Refuses to write into a folder holding anything this generator did not make, so pointing it at
    a real dataset by mistake cannot damage it.
    """
    cfg = cfg or SyntheticConfig()
    if image_format not in _EXTENSIONS:
        raise ValueError(f"image_format must be png or jpeg, got {image_format!r}")
    if len(set(cfg.classes)) != len(cfg.classes) or not cfg.classes:
        raise DatasetError(f"synthetic.classes must be distinct and non-empty, got {cfg.classes}")
    bad = [c for c in cfg.classes if not c or "/" in c or c.startswith(".")]
    if bad:
        raise DatasetError(f"synthetic class names cannot be folder names: {bad}")

    root = root.rstrip("/")
    marker_uri = storage.join(root, MARKER_NAME)
    fs, base = storage.filesystem(root, storage_cfg)
    stamp = fingerprint(cfg, image_format)
    previous = _read_marker(marker_uri, storage_cfg)
    expected = _expected_files(cfg.model_dump(mode="json"), image_format)
    if previous is not None and previous.get("fingerprint") == stamp:
        log.info("%s already holds synthetic dataset %s", root, stamp)
        return SyntheticDataset(root, tuple(cfg.classes), len(expected), 0, stamp)

    previous_classes = (previous or {}).get("config", {}).get("classes", [])
    _refuse_foreign_content(fs, base, root, set(cfg.classes) | set(previous_classes))
    if previous is not None:
        _remove_stale(fs, base, root, previous, set(expected))

    blobs = {
        image_relpath(classname, index, image_format): _encode(
            render_tile(classname, index, cfg.image_size, cfg.seed), image_format
        )
        for classname in cfg.classes
        for index in range(cfg.images_per_class)
    }
    _write_all(root, fs, base, blobs, storage_cfg)
    marker = {
        "generator": "bimors.data.synthetic",
        "version": GENERATOR_VERSION,
        "fingerprint": stamp,
        "format": image_format,
        "config": cfg.model_dump(mode="json"),
        "files": len(blobs),
    }
    storage.write_bytes(marker_uri, json.dumps(marker, indent=2, sort_keys=True).encode(), storage_cfg)
    log.info("wrote synthetic dataset %s (%d images) to %s", stamp, len(blobs), root)
    return SyntheticDataset(root, tuple(cfg.classes), len(blobs), len(blobs), stamp)


def _read_marker(uri: str, storage_cfg: StorageConfig | None) -> dict | None:
    if not storage.exists(uri, storage_cfg):
        return None
    try:
        marker = json.loads(storage.read_bytes(uri, storage_cfg))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None  # a damaged marker is the same as none: the data is rewritten
    return marker if isinstance(marker, dict) else None


def _refuse_foreign_content(fs: AbstractFileSystem, base: str, root: str, ours: set[str]) -> None:
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(base, detail=False)] if fs.isdir(base) else []
    except FileNotFoundError:
        names = []
    except Exception as err:  # noqa: BLE001
        raise storage.storage_error(root, err) from err
    foreign = sorted(n for n in names if n not in ours and not n.startswith("."))
    if foreign:
        raise DatasetError(
            f"{root} already holds files the synthetic generator did not write ({', '.join(foreign[:5])}); "
            "choose an empty or new folder"
        )


def _remove_stale(fs: AbstractFileSystem, base: str, root: str, previous: dict, keep: set[str]) -> None:
    config = previous.get("config") or {}
    image_format = previous.get("format", "png")
    if image_format not in _EXTENSIONS or not {"classes", "images_per_class"} <= set(config):
        return
    stale = [p for p in _expected_files(config, image_format) if p not in keep]
    paths = [f"{base.rstrip('/')}/{p}" for p in stale]
    existing = [p for p in paths if fs.exists(p)]
    if existing:
        with storage.translated_errors(root):
            fs.rm(existing)
        log.info("removed %d images of the previous synthetic dataset under %s", len(existing), root)
    if not storage.is_remote(root):
        for classname in set(config["classes"]):
            folder = storage.local_path(storage.join(root, classname))
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def _write_all(
    root: str, fs: AbstractFileSystem, base: str, blobs: dict[str, bytes], storage_cfg: StorageConfig | None
) -> None:
    if storage.is_remote(root):
        with storage.translated_errors(root, storage_cfg):  # one concurrent batch upload, not a round trip per file
            fs.pipe({f"{base.rstrip('/')}/{relpath}": data for relpath, data in blobs.items()})
            fs.invalidate_cache(base)
        return
    for relpath, data in blobs.items():
        storage.write_bytes(storage.join(root, relpath), data, storage_cfg)
