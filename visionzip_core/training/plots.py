"""``metrics.png``: loss, validation loss and learning rate against step, from ``metrics.jsonl``.

The trainer writes it for its own run at the end (:func:`write_run_plot`, rank 0, after the final
export); ``scripts/plot_metrics.py`` draws several runs in one figure (:func:`plot_runs`).
matplotlib is an optional dependency (the ``bench`` extra): without it the trainer skips the plot
with a one-line note, and a plotting failure only warns, never fails a finished run.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"
PANELS = (("loss", "loss"), ("val_loss", "validation loss"), ("lr", "learning rate"))


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl``; a torn last line (a killed run) is skipped.

    Raises:
        FileNotFoundError: one line naming the folder when it holds no ``metrics.jsonl``.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        what = "no such folder" if not Path(run_dir).is_dir() else f"no {METRICS_FILE}"
        raise FileNotFoundError(f"{run_dir}: {what} (expected a train.output_dir)")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def series(records: list[dict], key: str) -> dict[str, tuple[list[int], list[float]]]:
    """``{name: (steps, values)}`` of ``key``: one series, or one per parameter group for ``lr``
    (recorded as ``{"projector": ..., "llm": ...}``). Non-finite values (stored as strings) are NaN."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        value = record.get(key)
        if value is None or "step" not in record:
            continue
        items = value.items() if isinstance(value, dict) else [("", value)]
        for name, v in items:
            steps, values = out.setdefault(name, ([], []))
            steps.append(int(record["step"]))
            values.append(_number(v))
    return out


def plot_runs(runs: dict[str, list[dict]], out: str | Path) -> Path:
    """One figure, three panels (loss, validation loss, learning rate), one line per run (and per
    parameter group for the learning rate). Needs matplotlib. Returns ``out``."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(13, 3.8), dpi=90, layout="constrained")
    axes = fig.subplots(1, len(PANELS))
    colours = [f"C{i % 10}" for i in range(len(runs))]
    styles = ["-", "--", ":", "-."]
    for ax, (key, label) in zip(axes, PANELS):
        drawn = False
        for (run, records), colour in zip(runs.items(), colours):
            for i, (group, (steps, values)) in enumerate(series(records, key).items()):
                name = run if not group else f"{run}: {group}"
                marker = "o" if len(steps) < 20 else None
                ax.plot(steps, values, styles[i % len(styles)], color=colour, label=name, marker=marker, ms=3)
                drawn = True
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f"no {key} records", ha="center", va="center", transform=ax.transAxes)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def run_names(run_dirs: list[str | Path]) -> list[str]:
    """Legend names: each folder's name, or its path as given where two names collide."""
    names = [Path(d).resolve().name for d in run_dirs]
    return [name if names.count(name) == 1 else str(d) for name, d in zip(names, run_dirs)]


def write_run_plot(output_dir: str | Path, note: Callable[[str], None] | None = None) -> Path | None:
    """``output_dir/metrics.png`` from its ``metrics.jsonl``; never raises.

    Returns the path, or None when matplotlib is missing (one note) or plotting failed (one warning).
    """
    note = note or (lambda line: print(line, file=sys.stderr, flush=True))
    output_dir = Path(output_dir)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        note(f"{PLOT_FILE} skipped: matplotlib is not installed (pip install 'visionzip-core[bench]')")
        return None
    try:
        return plot_runs({output_dir.name: read_metrics(output_dir)}, output_dir / PLOT_FILE)
    except Exception as err:  # a finished run must not fail over its picture
        note(f"warning: {PLOT_FILE} not written ({type(err).__name__}: {' '.join(str(err).split())[:200]})")
        return None


def _number(value) -> float:
    try:
        return float(value)  # "nan" / "inf" strings included
    except (TypeError, ValueError):
        return math.nan
