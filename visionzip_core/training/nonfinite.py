"""The NaN/inf policy: which steps count as non-finite, how many may be skipped
(``train.max_nonfinite_steps``), and the one-line message when the run must stop (exit 3)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from visionzip_core.training import checkpointing
from visionzip_core.training.checkpointing import TrainerState


class TrainingDiverged(RuntimeError):
    """The loss or grad norm became NaN/inf past what ``train.max_nonfinite_steps`` allows."""


def skips_left(state: TrainerState, max_nonfinite_steps: int) -> bool:
    return state.nonfinite_steps < max_nonfinite_steps


def step_is_finite(stats: dict, dtype: torch.dtype) -> bool:
    """False for a NaN/inf loss or grad norm. Under fp16 an inf grad norm with a finite loss is the
    dynamic loss scaler probing its scale (DeepSpeed skips the step and lowers it): not divergence."""
    norm = stats["grad_norm"]
    if not math.isfinite(stats["loss"]):
        return False
    if norm is None or math.isfinite(norm):
        return True
    return dtype == torch.float16 and not stats["updated"]


def count_nonfinite_step(
    stats: dict, state: TrainerState, max_nonfinite_steps: int, output_dir: Path, note: Callable[[str], None]
) -> None:
    """Count a skipped NaN/inf step (``note`` writes the line to the metrics log); raise
    :class:`TrainingDiverged` past train.max_nonfinite_steps, or at once if the update went through
    anyway (weights in memory can no longer be trusted)."""
    loss, norm = stats["loss"], stats["grad_norm"]
    what = f"loss is {loss}" if not math.isfinite(loss) else f"grad norm is {norm} (loss {loss:.4f})"
    if stats["updated"]:
        raise TrainingDiverged(
            diverged_message(
                state,
                output_dir,
                what,
                "DeepSpeed applied the update anyway (ZeRO stage 0, "
                "or bf16.check_grad_overflow off): stopped",
            )
        )
    if not math.isfinite(loss) and not skips_left(state, max_nonfinite_steps):
        raise TrainingDiverged(diverged_message(state, output_dir, what, "stopped before the update"))
    state.nonfinite_steps += 1
    if state.nonfinite_steps > max_nonfinite_steps:
        raise TrainingDiverged(
            diverged_message(
                state,
                output_dir,
                what,
                f"the update was skipped; {state.nonfinite_steps} NaN/inf steps exceed "
                f"train.max_nonfinite_steps={max_nonfinite_steps}",
            )
        )
    note(
        f"step {state.step + 1}: {what}; update skipped ({state.nonfinite_steps} of "
        f"train.max_nonfinite_steps={max_nonfinite_steps})"
    )


def diverged_message(state: TrainerState, output_dir: Path, what: str, how: str) -> str:
    latest = checkpointing.complete_checkpoints(output_dir)
    keep = f"last good checkpoint: {latest[-1]}" if latest else "no checkpoint was written yet"
    return (
        f"{what} at step {state.step + 1} (epoch {state.epoch}); {how}; "
        f"{keep}. Lower the learning rates (optim.lr_*) or check the data, then rerun (resume: auto)."
    )
