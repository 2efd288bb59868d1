"""Benchmark reports: where and when a run happened, and the JSON + Markdown files it writes."""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model_name = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model_name}, {os.cpu_count()} cores, {platform.system()}"


def run_context(device: torch.device) -> dict:
    """Where and when a benchmark ran: machine, threads, UTC time, load average, command line."""
    return {
        "threads": torch.get_num_threads(),
        "machine": machine_description(device),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_1min_at_end": os.getloadavg()[0],
        "command": "python " + " ".join(sys.argv),
    }


def write_report(out: Path, results: list[dict], title: str, table: str) -> list[Path]:
    """Write ``out`` (JSON list), ``out.md`` (title, shapes, table); return the paths written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    md = out.with_suffix(".md")
    md.write_text(f"{title}\n\n{results[0]['run']['shapes']}\n\n{table}")
    return [out, md]
