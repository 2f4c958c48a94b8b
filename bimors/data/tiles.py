"""One way to turn a tile URI into pixels, shared by featurize, online training and inference,
so every path sees identical inputs."""

from __future__ import annotations

import numpy as np
from PIL import Image

from bimors import storage
from bimors.config import DecodeConfig, StorageConfig
from bimors.data.decode import decode_image


def fit_within(image: np.ndarray, max_side: int) -> np.ndarray:
    """Downscale (area filter, aspect kept) so the longer side is at most ``max_side``: both frozen
    models resize to ~224 px anyway, and a 10k-pixel aerial tile should not travel through the
    object store at full size."""
    height, width = image.shape[:2]
    longest = max(height, width)
    if longest <= max_side:
        return image
    scale = max_side / longest
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))


def read_tile(
    uri: str, decode_cfg: DecodeConfig, storage_cfg: StorageConfig | None, max_side: int
) -> np.ndarray:
    """uint8 RGB (H, W, 3) of the tile at ``uri``. Raises StorageError (read) or DecodeError (decode)."""
    return tile_from_bytes(storage.read_bytes(uri, storage_cfg), decode_cfg, max_side)


def tile_from_bytes(data: bytes, decode_cfg: DecodeConfig, max_side: int) -> np.ndarray:
    """The same for bytes already in hand (an upload to the endpoint)."""
    return fit_within(decode_image(data, decode_cfg), max_side)
