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


def peak_memory_record(per_rank=None) -> dict:
    """``peak_rss_mb``: the process's peak resident memory (everything: weights, activations,
    the allocator's cache, libraries). On a GPU also, over the logging window that ends now:
    ``peak_cuda_mb``, the most memory tensors held on this process's device, and
    ``peak_cuda_reserved_mb``, the most the allocator held (what out-of-memory is about); with
    ``per_rank`` (:func:`distributed.gather_per_rank`; ALL RANKS then call this) both as lists in
    rank order, ``peak_cuda_mb_per_rank`` and ``peak_cuda_reserved_mb_per_rank``: an uneven rank
    is the one that runs out first. The peaks are reset, so each window reports its own."""
    record = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # KiB
    if torch.cuda.is_available():
        mine = [torch.cuda.max_memory_allocated() / 2**20, torch.cuda.max_memory_reserved() / 2**20]
        torch.cuda.reset_peak_memory_stats()
        record["peak_cuda_mb"] = round(mine[0], 1)
        record["peak_cuda_reserved_mb"] = round(mine[1], 1)
        if per_rank is not None:
            ranks = per_rank(mine)
            record["peak_cuda_mb_per_rank"] = [round(r[0], 1) for r in ranks]
            record["peak_cuda_reserved_mb_per_rank"] = [round(r[1], 1) for r in ranks]
    return record


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def step_line(record: dict, total_steps: int) -> str:
    """One plain log line for a step record: what a progress bar shows, for logs and CI."""
    lrs = record.get("lr") or {}
    lr = max(lrs.values()) if isinstance(lrs, dict) and lrs else lrs
    parts = [f"step {record['step']}/{total_steps}", f"loss {record['loss']:.4f}"]
    if isinstance(lr, (int, float)):
        parts.append(f"lr {lr:.3g}")
    if "step_time_s" in record:
        parts.append(f"{record['step_time_s']:.2f} s/step")
    if "elapsed_s" in record and "step_time_s" in record:
        left = (total_steps - record["step"]) * record["step_time_s"]
        parts.append(f"elapsed {_clock(record['elapsed_s'])} eta {_clock(left)}")
    return "  ".join(parts)


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
    """Appends records to ``metrics.jsonl`` (rank 0 only) and shows progress: a tqdm bar with ETA
    on a terminal; elsewhere (a log file, CI) one plain line per logged step, since a bar that
    cannot redraw itself turns into one endless line."""

    def __init__(self, path: Path, total_steps: int, start_step: int, enabled: bool, interactive=None):
        self.path = path
        self.enabled = enabled
        self.total_steps = total_steps
        self.bar = None
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        truncate_jsonl(path, start_step)
        if not (sys.stderr.isatty() if interactive is None else interactive):
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
            mininterval=1.0,
        )

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: _finite_or_str(v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
            f.flush()
        if self.bar is None and "loss" in record:
            print(step_line(record, self.total_steps), file=sys.stderr, flush=True)

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
