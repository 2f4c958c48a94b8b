"""The learning-rate schedule of the paper (Dassl's): a constant warm-up, then cosine decay.

Set once per epoch, from the epoch number alone, so a resumed run picks up the exact rate."""

from __future__ import annotations

import math

import torch

from bimors.config import OptimConfig


def learning_rate(cfg: OptimConfig, epoch: int) -> float:
    """Rate for 0-based ``epoch``: ``warmup_lr`` during the warm-up epochs, then cosine from ``lr``
    to 0 over all ``epochs`` (the warm-up counts towards the cosine's period, as in Dassl)."""
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_lr
    if cfg.scheduler == "constant":
        return cfg.lr
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * epoch / cfg.epochs))


def build_optimizer(cfg: OptimConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
