"""Per-GPU memory of one 7B training step (forward + backward + AdamW step) at each visual-token
budget, under DeepSpeed ZeRO-2 and ZeRO-3 on 8 GPUs, simulated on the meta device: no GPU needed
and nothing of the model's size is allocated.

Activations and temporaries come from running the step on meta tensors under a live-storage
tracker; parameters, gradients and optimizer states are computed per GPU as ZeRO shards them.
How, and what it leaves out: ``visionzip_core/bench/memory_sim.py`` and BENCHMARKS.md.

    python scripts/simulate_memory.py --out results/simulate_memory.json        # every simulated family's 7B, ~1 min
    python scripts/simulate_memory.py --quick --out /tmp/sim.json               # 2 LLM layers, seconds
    python scripts/simulate_memory.py --calibrate --out results/simulate_memory_calibration.json
    python scripts/simulate_memory.py --families llava-next --modes finetune --whole-model-ckpt
    python scripts/simulate_memory.py --configs configs/llava-1.5-7b configs/llava-next-7b configs/qwen2.5-vl-7b   # shipped configs, long samples

Per-GPU micro-batches: LLaVA-1.5 16 (LLaVA's scripts/v1_5/finetune.sh: 16 x 8 GPUs = 128, ZeRO-3,
gradient checkpointing, bf16); LLaVA-NeXT 4 (LLaVA-NeXT's scripts/train/finetune_clip.sh:
per-device batch 4, ZeRO-3, gradient checkpointing, bf16, CLIP trained; the ``finetune_vision``
mode); Qwen2.5-VL 4 (configs/qwen2.5-vl-7b/lora.yaml), its frozen tower stood in by its measured
working set; Qwen3-VL 4 and Qwen3.5 2 (their configs' lora.yaml), towers stood in likewise (Qwen3-VL's
DeepStack levels included); LLaVA-OneVision 1 (LLaVA-NeXT's finetune_ov.sh), the whole step on meta.
The families and their workloads are the registry's (``ModelFamily.simulation``).
Text: the benchmarks' 100-150 tokens per sample (LLaVA-665k-like), one image per sample.
``--calibrate`` runs the same step for real on a small CPU model and on meta and prints the
difference.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from visionzip_core.bench.budgets import budget_label
from visionzip_core.bench.memory_sim import (
    MODES,
    TINY_BUDGETS,
    TINY_SIZE,
    Workload,
    calibrate,
    simulate,
    workload,
)
from visionzip_core.bench.report import run_context
from visionzip_core.bench.sizes import sizes_for
from visionzip_core.families import FAMILIES
from visionzip_core.training.config_memory import markdown_table, simulate_config

# Every registered family the simulation runs, with its default workload (ModelFamily.simulation).
SIMULATED = {f.name: f.simulation for f in FAMILIES if f.simulation is not None}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--families",
        default=None,
        help=f"comma-separated: {', '.join(SIMULATED)} (default: all; calibrated ones)",
    )
    p.add_argument("--modes", default=None, help=f"comma-separated from {MODES}; default per family")
    p.add_argument(
        "--quick", action="store_true", help="2 LLM layers, 6 tower layers, micro-batch 1: seconds"
    )
    p.add_argument("--calibrate", action="store_true", help="real CPU step against its meta simulation")
    p.add_argument("--tiny", action="store_true", help="--calibrate on the tiny test model (seconds)")
    p.add_argument("--gpus", type=int, default=8, help="data-parallel GPUs ZeRO shards over")
    p.add_argument(
        "--quantization",
        default="none",
        choices=("none", "nf4", "fp4", "int8"),
        help="count the frozen LLM linears as model.quantization stores them (ZeRO-2 rows only)",
    )
    p.add_argument("--micro-batch", type=int, default=None, help="per-GPU samples (default: each family's)")
    p.add_argument("--text-tokens", default=None, help="LO,HI text tokens per sample (default 100,150)")
    p.add_argument(
        "--whole-model-ckpt",
        action="store_true",
        help="checkpointing on the whole model with its input-grad hooks kept (a frozen tower records its graph)",
    )
    p.add_argument(
        "--configs",
        nargs="+",
        type=Path,
        default=None,
        help="training YAMLs or folders of them: each at its own settings, samples at model_max_length",
    )
    p.add_argument("--out", type=Path, default=None, help="JSON path; .md is written beside it")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    calibrated = [f for f in SIMULATED if SIMULATED[f]["calibrate"] is not None]
    args.families = (
        args.families.split(",") if args.families else list(calibrated if args.calibrate else SIMULATED)
    )
    bad = [f for f in args.families if f not in SIMULATED]
    if bad:
        p.error(f"--families: unknown {bad}; allowed {list(SIMULATED)}")
    if args.calibrate:
        bad = [f for f in args.families if SIMULATED[f]["calibrate"] is None]
        if bad:
            p.error(
                f"--calibrate: {bad} not calibrated (the real step runs the tower the meta step stands in for)"
            )
    if args.modes is not None:
        args.modes = args.modes.split(",")
        bad = [m for m in args.modes if m not in MODES]
        if bad:
            p.error(f"--modes: unknown {bad}; allowed {list(MODES)}")
    if args.text_tokens is not None:
        try:
            lo, hi = (int(v) for v in args.text_tokens.split(","))
        except ValueError:
            p.error(f"--text-tokens: {args.text_tokens!r} is not LO,HI")
        args.text_tokens = (lo, hi)
    return args


def workloads(args: argparse.Namespace) -> list[Workload]:
    out = []
    for family in args.families:
        recipe = SIMULATED[family]
        size = sizes_for(family)[recipe["size"]]
        if args.quick:
            size = size.quick()
        if args.text_tokens:
            size = replace(size, text_tokens=args.text_tokens)
        batch = args.micro_batch or (1 if args.quick else recipe["micro_batch"])
        note = (
            recipe["batch_source"] if batch == recipe["micro_batch"] else f"{batch} per GPU (--micro-batch)"
        )
        out.append(workload(size, family, batch, note))
    return out


def summary_table(rows: list[dict]) -> str:
    """Total per-GPU GiB, one line per (mode, checkpointing, ZeRO stage), budgets across."""
    budgets = list(dict.fromkeys(budget_label(r) for r in rows))
    head = "| mode | grad ckpt | ZeRO | " + " | ".join(budgets) + " |\n"
    head += "|---|---|---:|" + "---:|" * len(budgets) + "\n"
    lines = []
    keys = list(dict.fromkeys((r["mode"], r["grad_ckpt"], r["zero_stage"]) for r in rows))
    for mode, ckpt, stage in keys:
        cells = []
        for r in rows:
            if (r["mode"], r["grad_ckpt"], r["zero_stage"]) == (mode, ckpt, stage):
                ratio = "" if r["split"] is None else f" ({r['stock_over_this']:.2f}x)"
                cells.append(f"{r['total_gib']:.1f}{ratio}")
        lines.append(f"| {mode} | {'on' if ckpt else 'off'} | {stage} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def detail_table(rows: list[dict]) -> str:
    head = (
        "| mode | grad ckpt | ZeRO | visual tokens | seq len | params | grads | optimizer "
        "| activations | optim. step transient | total | stock / this |\n"
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| {r['mode']} | {'on' if r['grad_ckpt'] else 'off'} | {r['zero_stage']} | {budget_label(r)} "
        f"| {r['seq_len']} | {r['params_gib']:.2f} | {r['grads_gib']:.2f} | {r['optimizer_gib']:.2f} "
        f"| {r['activations_gib']:.2f} | {r['optimizer_step_transient_gib']:.2f} | {r['total_gib']:.2f} "
        f"| {r['stock_over_this']:.2f}x |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def run_simulation(args: argparse.Namespace) -> tuple[list[dict], str]:
    start = time.perf_counter()
    results, sections = [], []
    for work in workloads(args):
        modes = args.modes or SIMULATED[work.family]["modes"]
        rows = simulate(
            work,
            modes,
            gpus=args.gpus,
            seed=args.seed,
            whole_model_ckpt=args.whole_model_ckpt,
            stages=(2, 3) if args.quantization == "none" else (2,),  # bitsandbytes weights: no ZeRO-3
            quantization=args.quantization,
        )
        s = work.size
        run = {
            "size": s.name,
            "family": work.family,
            "shapes": s.note,
            "dtype": s.dtype,
            "micro_batch": s.batch_size,
            "micro_batch_source": work.batch_note,
            "text_tokens_range": list(s.text_tokens),
            "gpus": args.gpus,
            "checkpointing": "whole model (trainer)" if args.whole_model_ckpt else "LLM and tower separately",
            "memory_measure": "MetaTensorMemory: live meta-tensor storage over one forward + backward",
            "units": "GiB (2**30 bytes) per GPU",
            **run_context(torch.device("cpu")),
        }
        for r in rows:
            r["run"] = run
        results += rows
        title = f"### {work.family}: {s.name}, micro-batch {s.batch_size} per GPU, {args.gpus} GPUs"
        sections.append(
            f"{title}\n\n{s.note}. Micro-batch: {work.batch_note}. Text {s.text_tokens[0]}-{s.text_tokens[1]} "
            f"tokens per sample.\n\nTotal per GPU, GiB (stock / this):\n\n{summary_table(rows)}\n"
            f"Parts, GiB per GPU:\n\n{detail_table(rows)}"
        )
    elapsed = time.perf_counter() - start
    for r in results:
        r["run"]["elapsed_s"] = elapsed
    print(f"simulated {len(results)} rows in {elapsed:.1f}s")
    return results, "\n".join(sections)


def run_calibration(args: argparse.Namespace) -> tuple[list[dict], str]:
    results = []
    for family in args.families:
        size = TINY_SIZE if args.tiny else sizes_for(family)["cpu"].quick()
        budgets = TINY_BUDGETS if args.tiny else None
        tokens = tuple(TINY_BUDGETS) if args.tiny else SIMULATED[family]["calibrate"]
        for ckpt in (False, True):
            for k in tokens:
                start = time.perf_counter()
                row = calibrate(size, family, k, budgets, mode="finetune", grad_ckpt=ckpt, seed=args.seed)
                row["elapsed_s"] = time.perf_counter() - start
                print(
                    f"  {family} {k} tokens, grad ckpt {'on' if ckpt else 'off'}: "
                    f"full step peak {row['full']['diff_pct']['peak']:+.4f}%, "
                    f"activations {row['zero']['diff_pct']['activations']:+.4f}% ({row['elapsed_s']:.0f}s)",
                    flush=True,
                )
                row["run"] = {"shapes": size.note, **run_context(torch.device("cpu"))}
                results.append(row)
    head = (
        "| family | visual tokens | grad ckpt | seq len | full step: peak, real (MiB) | meta - real "
        "| full step: fwd/bwd above resident, real (MiB) | meta - real "
        "| ZeRO setting: activations, real (MiB) | meta - real |\n"
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|\n"
    )

    def diff(part: dict, key: str) -> str:
        real, meta = part["real"][key], part["meta"][key]
        return f"{meta - real:+d} B ({100 * (meta - real) / real:+.4f}%)"

    lines = [
        f"| {r['family']} | {r['tokens']} | {'on' if r['grad_ckpt'] else 'off'} | {r['seq_len']} "
        f"| {r['full']['real']['peak'] / 2**20:.1f} | {diff(r['full'], 'peak')} "
        f"| {r['full']['real']['activations'] / 2**20:.1f} | {diff(r['full'], 'activations')} "
        f"| {r['zero']['real']['activations'] / 2**20:.1f} | {diff(r['zero'], 'activations')} |"
        for r in results
    ]
    return results, head + "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.configs:
        paths = [q for p in args.configs for q in (sorted(p.glob("*.yaml")) if p.is_dir() else [p])]
        results = [simulate_config(p, gpus=args.gpus) for p in paths]
        table = markdown_table(results)
        print(
            f"\nShipped configs, one step with every sample at model_max_length, {args.gpus} GPUs\n\n{table}"
        )
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2) + "\n")
        return
    if args.calibrate:
        results, table = run_calibration(args)
        title = "Calibration: one training step, real CPU tensors against the meta simulation"
    else:
        results, table = run_simulation(args)
        title = f"Simulated per-GPU training memory ({'QUICK shapes, smoke only' if args.quick else '7B'})"
    print(f"\n{title}\n\n{table}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        md = args.out.with_suffix(".md")
        md.write_text(f"# {title}\n\nCommand: `{results[0]['run']['command']}`\n\n{table}")
        print("wrote", args.out, md)


if __name__ == "__main__":
    main()
