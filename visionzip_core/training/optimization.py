"""AdamW over per-module parameter groups, and linear warmup + cosine decay as a torch scheduler.

Both are plain torch objects handed to ``deepspeed.initialize``: DeepSpeed then steps the
scheduler at each optimizer step and saves both in its checkpoints. A torch optimizer also
avoids compiling DeepSpeed's FusedAdam on first use.
"""

from __future__ import annotations

import math

import torch

from visionzip_core.training.settings import OptimSettings


def build_optimizer(groups: list[dict], optim: OptimSettings, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW; ``fused`` (on CUDA): one kernel updates every tensor of a group, instead of several
    kernels per tensor. On CPU the plain per-tensor loop is kept (the CPU runs' reference numbers)."""
    return torch.optim.AdamW(
        groups, betas=optim.betas, eps=optim.eps, foreach=False, fused=True if fused else None
    )


def lr_lambda(total_steps: int, warmup_steps: int, kind: str, min_ratio: float):
    """Multiplier of each group's base lr after ``step`` optimizer steps."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, optim: OptimSettings):
    warmup = math.ceil(optim.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, warmup, optim.scheduler, optim.min_lr_ratio)
    )


HYPERPARAMETERS = ("initial_lr", "weight_decay", "betas", "eps")


def group_hyperparameters(scheduler) -> list[dict]:
    """This run's per-group hyperparameters, taken before a checkpoint load overwrites them."""
    return [{k: g[k] for k in HYPERPARAMETERS if k in g} for g in scheduler.optimizer.param_groups]


def reapply_hyperparameters(scheduler, values: list[dict]) -> None:
    """Put back this run's hyperparameters after a checkpoint load.

    Loading restores the optimizer's param groups and the scheduler's base lrs as they were saved,
    so a learning rate changed on resume (``train.resume_allow_changes``) would silently keep its
    old value. Equal values (the usual resume) leave everything as loaded.
    """
    for group, saved in zip(scheduler.optimizer.param_groups, values):
        group.update(saved)
    scheduler.base_lrs = [v["initial_lr"] for v in values]
    scheduler.last_epoch -= 1  # recompute the current lr from the new base lrs at the same step
    scheduler.step()
