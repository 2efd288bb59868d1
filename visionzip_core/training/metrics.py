"""Per-step metrics: ``metrics.jsonl`` (one JSON object per logged step), a progress bar, and memory.

Only rank 0 writes. On resume the file is cut back to the checkpoint's step, so steps that were
logged after the last checkpoint and then lost to a kill appear once, from the resumed run.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path

import torch


def peak_memory_mb() -> float:
    """Peak accelerator memory allocated by tensors, or the process's peak RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop records with ``step > last_step`` (and a torn last line from a kill)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= last_step:
            kept.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    os.replace(tmp, path)


class MetricsLog:
    """Appends records to ``metrics.jsonl`` and drives a tqdm bar with ETA (rank 0 only)."""

    def __init__(self, path: Path, total_steps: int, start_step: int, enabled: bool):
        self.path = path
        self.enabled = enabled
        self.bar = None
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        truncate_jsonl(path, start_step)
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
            disable=None if sys.stderr.isatty() else False,
            mininterval=1.0,
        )

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: _finite_or_str(v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
            f.flush()

    def advance(self, loss: float | None = None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def note(self, text: str) -> None:
        """A line printed above the bar (rank 0)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _finite_or_str(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite_or_str(v) for k, v in value.items()}
    return value
