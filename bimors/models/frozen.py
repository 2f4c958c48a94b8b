"""What every frozen model here shares: no gradients, eval mode for good, a dtype chosen per device."""

from __future__ import annotations

import torch
from torch import nn


class FrozenModule(nn.Module):
    """A module that stays in eval mode with no gradients, whatever its parent does.

    The prompt learner's ``.train()`` call propagates to children; without this, dropout in a
    frozen captioner or encoder would switch on during training and change the features.
    """

    def freeze(self) -> "FrozenModule":
        for param in self.parameters():
            param.requires_grad_(False)
        return self.train(False)

    def train(self, mode: bool = True) -> "FrozenModule":
        return super().train(False)


def resolve_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """``auto`` is fp32 on CPU (half precision is slow and lossy there) and bf16 or fp16 on GPU."""
    device = torch.device(device)
    if precision == "fp32":
        return torch.float32
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
