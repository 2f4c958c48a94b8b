"""Training augmentation for online features: random resized crop and horizontal flip (the paper's),
drawn from an explicit generator so a resumed or re-run epoch sees the same crops."""

from __future__ import annotations

import math

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF


def crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
             generator: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop covering ``scale`` of the area with aspect ``ratio`` (torchvision's
    rule: ten tries, then the largest centred crop within the ratio)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(3, generator=generator).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop_flip(
    image: np.ndarray,
    size: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    flip: bool = True,
) -> torch.Tensor:
    """uint8 HWC RGB -> uint8 [3, size, size]."""
    tensor = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
    top, left, h, w = crop_box(tensor.shape[1], tensor.shape[2], scale, (3 / 4, 4 / 3), generator)
    out = TF.resized_crop(tensor, top, left, h, w, [size, size], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    if flip and bool(torch.rand(1, generator=generator) < 0.5):
        out = TF.horizontal_flip(out)
    return out
