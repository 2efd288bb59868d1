"""AdamW over per-module parameter groups, and linear warmup + cosine decay as a torch scheduler.

Both are handed to ``deepspeed.initialize`` as objects: DeepSpeed then steps the scheduler at each
optimizer step and saves both in its checkpoints. A torch optimizer also avoids compiling
DeepSpeed's FusedAdam on first use. ZeRO-Offload refuses client torch optimizers, so under
``offload_optimizer`` / ``offload_param`` the same groups go to DeepSpeed's CPU Adam instead.
"""

from __future__ import annotations

import math

import torch

from visionzip_core.training.schema import OptimSettings


def build_optimizer(
    groups: list[dict], optim: OptimSettings, ds_config: dict | None = None, fused: bool = False
) -> torch.optim.Optimizer:
    """AdamW over ``groups`` (each with its own ``lr`` and ``weight_decay``).

    With ZeRO-Offload in ``ds_config`` this is ``DeepSpeedCPUAdam`` in AdamW mode (decoupled decay,
    as torch's): DeepSpeed accepts no other client optimizer there. Its C++ op compiles on first
    use (about a minute; cached under ``TORCH_EXTENSIONS_DIR``). ``fused`` (on CUDA): one kernel
    updates every tensor of a group, instead of several kernels per tensor; on CPU the plain
    per-tensor loop is kept (the CPU runs' reference numbers).
    """
    if uses_offload(ds_config or {}):
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # compiles an op: only when offloading

        return DeepSpeedCPUAdam(groups, betas=optim.betas, eps=optim.eps, adamw_mode=True)
    return torch.optim.AdamW(
        groups, betas=optim.betas, eps=optim.eps, foreach=False, fused=True if fused else None
    )


def uses_offload(ds_config: dict) -> bool:
    """Whether the DeepSpeed config offloads the optimizer state or the parameters to the CPU/NVMe."""
    zero = ds_config.get("zero_optimization", {})
    return any(
        (zero.get(key) or {}).get("device", "none") not in ("none", None)
        for key in ("offload_optimizer", "offload_param")
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
