"""The fastest training setting that fits your GPUs, for each visual-token budget: ZeRO stage,
gradient checkpointing and micro-batch x accumulation, from the meta-device memory simulation
and the FLOP model (``visionzip_core/bench/planner.py``; assumptions in BENCHMARKS.md).

    visionzip-plan --model llava-1.5-7b --gpus 8 --gpu-memory-gib 80 --mode finetune \\
        --budgets stock,64 --global-batch 128 --out plan.json
    visionzip-plan --model llava-1.5-7b --gpus 1 --gpu-memory-gib 24 --mode lora \\
        --budgets stock,64 --global-batch 16
    visionzip-plan --model qwen2.5-vl-7b --gpus 8 --gpu-memory-gib 80 --mode finetune \\
        --budgets stock,0.5,0.25 --global-batch 128        # or 0.45+0.05: dominant+contextual
    visionzip-plan --model path/to/llava-folder --gpus 4 --gpu-memory-gib 40 --mode lora \\
        --find-budget --micro-batch 4 --global-batch 64
    visionzip-plan --calibrate        # the planner's memory against a real CPU step (seconds)

``python scripts/plan.py`` takes the same arguments. Memory is simulated with every sample of a
micro-batch at the longest text length of ``--text-tokens`` (default: the benchmarks'
LLaVA-665k-like mix); time uses the mean length.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from visionzip_core.bench import planner

MODES = tuple(planner.PLAN_MODES)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        default="llava-1.5-7b",
        help=f"a size name ({', '.join(planner.known_models())}) or a model folder (config.json only)",
    )
    p.add_argument("--gpus", type=int, default=8, help="data-parallel GPUs")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of each GPU, GiB")
    p.add_argument("--mode", default="finetune", choices=MODES)
    p.add_argument(
        "--budgets",
        default=None,
        help="'stock' and visual tokens per image (per crop for LLaVA-NeXT), or for Qwen2.5-VL kept "
        "fractions of each image's merged tokens (0.5, or dominant+contextual 0.45+0.05); "
        "default stock,192,128,64 (Qwen2.5-VL: stock,0.7,0.5,0.25)",
    )
    p.add_argument("--global-batch", type=int, default=128, help="samples per optimizer step, all GPUs")
    p.add_argument(
        "--text-tokens",
        default="665k",
        help="text tokens per sample: 665k (LLaVA-665k-like mix), LO,HI, N, or a .json list",
    )
    p.add_argument(
        "--gpu",
        default=planner.DEFAULT_GPU,
        choices=sorted(planner.GPUS),
        help="named GPU: its bf16 peak (see --tflops)",
    )
    p.add_argument("--tflops", type=float, default=None, help="bf16 peak TFLOPS per GPU (overrides --gpu)")
    p.add_argument(
        "--utilisation",
        type=float,
        default=planner.DEFAULT_UTILISATION,
        help="assumed fraction of the peak a step achieves",
    )
    p.add_argument(
        "--interconnect-gbps",
        type=float,
        default=planner.DEFAULT_INTERCONNECT_GBPS,
        help="collective bus bandwidth, gigabits per second (default: a conservative NVLink node)",
    )
    p.add_argument(
        "--headroom",
        type=float,
        default=planner.DEFAULT_FRAGMENTATION,
        help="fraction of GPU memory kept free for the allocator's fragmentation",
    )
    p.add_argument(
        "--reserve-gib",
        type=float,
        default=planner.DEFAULT_RESERVE_GIB,
        help="GiB kept free for the CUDA context and workspaces",
    )
    p.add_argument(
        "--find-budget", action="store_true", help="the largest budget whose plan fits at --micro-batch"
    )
    p.add_argument(
        "--micro-batch", type=int, default=None, help="fix the micro-batch (with --find-budget: required)"
    )
    p.add_argument(
        "--calibrate", action="store_true", help="planner memory vs a real CPU step on a tiny model"
    )
    p.add_argument(
        "--quantization",
        default="none",
        choices=planner.QUANTIZATIONS,
        help="the LLM's frozen linears in 4/8 bits, as model.quantization (QLoRA: --mode lora --quantization nf4)",
    )
    p.add_argument("--out", type=Path, default=None, help="plan.json (a list of rows, one per budget)")
    args = p.parse_args(argv)
    for flag, value in (("--gpus", args.gpus), ("--global-batch", args.global_batch)):
        if value < 1:
            p.error(f"{flag}: must be >= 1 (got {value})")
    if args.gpu_memory_gib <= 0:
        p.error(f"--gpu-memory-gib: must be > 0 (got {args.gpu_memory_gib})")
    if not 0 < args.utilisation <= 1:
        p.error(f"--utilisation: a fraction in (0, 1] (got {args.utilisation})")
    if args.global_batch % args.gpus:
        p.error(f"--global-batch {args.global_batch}: not a multiple of --gpus {args.gpus}")
    if args.micro_batch is not None and (args.global_batch // args.gpus) % args.micro_batch:
        p.error(
            f"--micro-batch {args.micro_batch}: does not divide {args.global_batch // args.gpus} samples per GPU"
        )
    if args.find_budget and args.micro_batch is None:
        p.error("--find-budget: give --micro-batch")
    try:
        args.text = planner.TextLengths.parse(args.text_tokens)
    except ValueError as e:
        p.error(str(e))
    return args


def hardware(args) -> planner.Hardware:
    spec = planner.GPUS[args.gpu]
    return planner.Hardware(
        gpus=args.gpus,
        memory_gib=args.gpu_memory_gib,
        tflops=args.tflops or spec.bf16_tflops,
        utilisation=args.utilisation,
        interconnect_gbps=args.interconnect_gbps,
        reserve_gib=args.reserve_gib,
        fragmentation=args.headroom,
        gpu_name="--tflops" if args.tflops else spec.name,
    )


def run_calibration() -> list[dict]:
    rows = planner.calibrate_planner()
    print("| visual tokens | grad ckpt | real step, MiB above resident | planner | planner - real |")
    print("|---:|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['tokens']} | {'on' if r['grad_ckpt'] else 'off'} | {r['real_bytes'] / 2**20:.2f} "
            f"| {r['planner_bytes'] / 2**20:.2f} | {r['diff_pct']:+.4f}% |"
        )
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.calibrate:
        rows = run_calibration()
    else:
        try:
            model = planner.resolve_model(args.model)
            if args.budgets is None:
                args.budgets = planner.default_budgets(model)
            budgets = planner.parse_budgets(args.budgets, model)
            planner.check_mode(model, args.mode)
            planner.check_quantization(args.mode, args.quantization)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        hw = hardware(args)
        start = time.perf_counter()
        print(
            f"{model.name} ({model.family}), {args.mode}, global batch {args.global_batch}: {hw.describe()}; "
            f"text {args.text.source} (memory at the longest, {args.text.longest}; time at the mean, "
            f"{args.text.mean:.0f})",
            flush=True,
        )
        if args.find_budget:
            found = planner.find_budget(model, hw, args.mode, args.global_batch, args.text, args.micro_batch)
            rows = found["rows"]
            print(planner.table(rows))
            best = found["largest_fitting_budget"]
            print(
                f"largest budget that fits at micro-batch {args.micro_batch}: "
                f"{best if best is not None else 'none (not even the smallest)'}"
            )
        else:
            rows = planner.plan(
                model,
                hw,
                args.mode,
                budgets,
                args.global_batch,
                args.text,
                micro_batch=args.micro_batch,
                log=print,
                quantization=args.quantization,
            )
            print(planner.table(rows))
        print(f"planned in {time.perf_counter() - start:.0f}s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
        print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
