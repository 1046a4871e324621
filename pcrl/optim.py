"""The optimizer and its learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import torch

from pcrl.config import OptimConfig

__all__ = ["build_optimizer", "lr_schedule"]


def lr_schedule(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warm-up, then cosine to
    ``lr·min_lr_ratio`` at ``total_steps``. A pure function of the step, so resuming needs only the step."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(params: Any, cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD with momentum (the paper) or AdamW, as a torch optimizer handed to DeepSpeed (a DeepSpeed-config
    optimizer would JIT-compile fused CPU kernels for minutes)."""
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
