"""Training-step time and peak memory at visual-token budgets 576 (stock), 192, 128 and 64,
against the FLOP-ideal speed-up from the model's shapes and the real sequence lengths.

``--family llava-next``: LLaVA-NeXT with 672 px images (5 crops each); budgets are per crop, 576
(stock: every patch, unpadded, newlines) and 128, 64, 32 (the paper's 640 / 320 / 160 per image).

``--family qwen2.5-vl``: Qwen2.5-VL with 448 px images (256 merged tokens each); budgets are the
percent of each image's merged tokens kept: 100 (stock), 70 (0.65 + 0.05, the authors' default), 50
(0.45 + 0.05) and 25 (0.20 + 0.05). Trainable: the merger (projector mode), or LoRA on the LLM + the
merger. The FLOP figure is counted by ``torch.utils.flop_counter`` on the warm-up step (there is no
analytic FLOP model for this family). Sizes ``cpu`` and ``qwen2.5-vl-7b`` (the 7B's shapes; GPU only).

One process, one model, one batch of text per run; only the image-token count changes.
A step is forward + backward + ``torch.optim.AdamW.step`` on the trainable parameters
(projector, or projector + LoRA), which is what compression changes. Warm-up first (one step
per budget, then one memory-measuring step per budget), then the timed steps, interleaved.

    python scripts/bench_train.py --out results/bench_train_cpu.json            # CPU, < 10 min
    python scripts/bench_train.py --quick                                        # ~1 min smoke
    python scripts/bench_train.py --size llava-1.5-7b --mode lora --out results/bench_train_7b_lora.json
    python scripts/bench_train.py --family llava-next --batch-size 1 --out results/bench_train_cpu_next.json
    python scripts/bench_train.py --family qwen2.5-vl --steps 3 --out results/bench_train_cpu_qwen_projector.json
    python scripts/bench_train.py --family qwen2.5-vl --size qwen2.5-vl-7b --out results/bench_train_qwen_7b.json

Writes ``--out`` (JSON list, one object per budget), and beside it ``.md`` (table) and ``.png``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from visionzip_core.bench.budgets import (
    budget_label,
    budgets_for,
    budgets_help,
    image_plan,
    parse_budgets,
    set_budget,
    stock_budget,
)
from visionzip_core.bench.live_memory import model_tensors, peak_memory_bytes
from visionzip_core.bench.random_models import build_random_model
from visionzip_core.bench.report import run_context, write_report
from visionzip_core.bench.sizes import (
    benchmarked_families,
    size_error,
    size_names,
    sizes_for,
    sizes_help,
)
from visionzip_core.bench.synthetic import mix665k_like_text_lengths
from visionzip_core.bench.timing import interleaved_schedule, median
from visionzip_core.data import DataCollator, LengthGroupedSampler
from visionzip_core.data.collate import PackingCollator
from visionzip_core.data.sampler import FixedBatchSampler, TokenBudgetBatchSampler
from visionzip_core.families import FAMILIES, family_for
from visionzip_core.families.flops import TrainableParts, counted_flops

LORA_RANK, LORA_ALPHA = 128, 256  # LLaVA-1.5's LoRA recipe, as configs/ use


def _default_family() -> str:
    """The first benchmarked family of the registry (LLaVA-1.5)."""
    return benchmarked_families()[0]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=size_names(), default="cpu", metavar="SIZE", help=sizes_help())
    p.add_argument("--family", choices=benchmarked_families(), default=_default_family())
    p.add_argument("--mode", choices=("projector", "lora"), default="projector")
    p.add_argument("--quick", action="store_true", help="smoke run: fewer layers, batch 1, 2 timed steps")
    p.add_argument("--steps", type=int, default=None, help="timed steps per budget (default 5; quick 2)")
    p.add_argument("--batch-size", type=int, default=None, help="override the size's batch")
    p.add_argument(
        "--budgets",
        default=None,
        help=budgets_help(),
    )
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--out", type=Path, default=None, help="JSON path; .md and .png are written beside it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--compare-packing",
        action="store_true",
        help="packed rows + token-budget batches against fixed padded batches, on mix665k-like text lengths",
    )
    p.add_argument("--samples", type=int, default=32, help="--compare-packing: samples per pass")
    p.add_argument(
        "--row-tokens",
        type=int,
        default=2048,
        help="--compare-packing: tokens per packed row and micro-batch",
    )
    args = p.parse_args(argv)
    check_size(p, args)
    if args.compare_packing and family_for(args.family).count_depends_on_size:
        fixed = [f.name for f in FAMILIES if f.bench_sizes is not None and not f.count_depends_on_size]
        p.error(f"--compare-packing runs a family with one crop per image ({', '.join(fixed)})")
    try:
        allowed = budgets_for(args.family)
        default = "576,64" if args.compare_packing else ",".join(map(str, allowed))
        args.budgets = parse_budgets(args.budgets or default, allowed)
    except ValueError as err:
        p.error(str(err))
    return args


def check_size(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    error = size_error(
        args.family, args.size, args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    )
    if error:
        p.error(error)


def trainable_parts(mode: str, family: str) -> TrainableParts:
    if mode == "lora":
        targets = family_for(family).lora_targets
        return TrainableParts(projector=True, llm="lora", lora_rank=LORA_RANK, lora_targets=targets)
    return TrainableParts(projector=True)


def prepare_for_training(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """Freeze all but the projector; in lora mode wrap the LLM's linears with peft adapters."""
    family = family_for(model)
    for name, p in model.named_parameters():
        p.requires_grad_(family.module_group(name) == "projector")
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=LORA_RANK,
            lora_alpha=LORA_ALPHA,
            lora_dropout=0.05,
            target_modules=family.lora_target_regex(family.lora_targets),  # the LLM's layers only
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
        for name, p in model.named_parameters():
            if family.module_group(name) == "projector":
                p.requires_grad_(True)
    model.config.use_cache = False
    return model.train()


def ideal_flops(
    size, config, family: str, plan, tokens: int, seq_len: int, batch: int, parts: TrainableParts
) -> int:
    flops = family_for(family).step_flops(
        size, config, parts, plan, budgets_for(family)[tokens], samples=batch, seq_len=seq_len
    )
    return flops["total"].total


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = sizes_for(args.family)
    size = sizes[args.size].quick() if args.quick else sizes[args.size]
    if args.batch_size:
        from dataclasses import replace

        size = replace(size, batch_size=args.batch_size)
    steps = args.steps or (2 if args.quick else 5)
    parts = trainable_parts(args.mode, args.family)

    t0 = time.perf_counter()
    family = family_for(args.family)
    percent = family.takes_ratios  # budgets are percent of each image's tokens, not counts
    model = build_random_model(size, device, seed=args.seed, family=args.family)
    budgets = budgets_for(args.family)
    ref = stock_budget(budgets)
    plans = {k: image_plan(model.config, args.family, k) for k in args.budgets}
    model = prepare_for_training(model, args.mode)
    print(f"built {size.name} ({size.note}) on {device} in {time.perf_counter() - t0:.1f}s", flush=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    batches = {
        k: family.bench_batch(size, model.config, plans[k], device, seed=args.seed) for k in args.budgets
    }
    for k in args.budgets:  # the LLM sees each budget's real count of image tokens per image
        found = int((batches[k]["input_ids"] == model.config.image_token_id).sum()) // size.batch_size
        if found != plans[k].llm:
            raise RuntimeError(f"batch holds {found} image tokens per image at budget {k}")

    def step(tokens: int) -> None:
        set_budget(model, tokens, budgets)
        loss = model(**batches[tokens]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    counted = {}
    for tokens in args.budgets:  # warm-up: kernels, allocator, optimizer state
        if not size.flop_model:  # the FLOP figure: counted on this step
            counted[tokens] = counted_flops(lambda t=tokens: step(t))
        else:
            step(tokens)
    memory = {}
    for tokens in args.budgets:
        memory[tokens] = peak_memory_bytes(
            lambda t=tokens: step(t), device, lambda: model_tensors(model, optimizer)
        )
    times: dict[int, list[float]] = {k: [] for k in args.budgets}
    for tokens in interleaved_schedule(args.budgets, steps):
        set_budget(model, tokens, budgets)
        start = time.perf_counter()
        step(tokens)
        times[tokens].append(time.perf_counter() - start)
        unit = "% of tokens" if percent else " tokens"
        print(f"  {tokens:>3}{unit}: {times[tokens][-1]:.3f}s", flush=True)

    base = median(times[ref])
    base_flops = None
    rows = []
    for tokens in args.budgets:
        batch = batches[tokens]
        seq_len = batch["input_ids"].shape[1]
        if not size.flop_model:
            flops = counted[tokens]
        else:
            flops = ideal_flops(
                size,
                model.config,
                args.family,
                plans[tokens],
                tokens,
                seq_len,
                batch["input_ids"].shape[0],
                parts,
            )
        if tokens == ref:
            base_flops = flops
        rows.append({"tokens": tokens, "seq_len": seq_len, "flops": flops, "batch": batch})
    results = []
    for row in rows:
        tokens, batch = row["tokens"], row["batch"]
        t = median(times[tokens])
        peak, start = memory[tokens]
        measured, ideal = base / t, base_flops / row["flops"]
        results.append(
            {
                "tokens": tokens,
                "budget_kind": "percent" if percent else "tokens",
                "image_tokens": plans[tokens].llm,
                "stock_image_tokens": plans[ref].llm,
                "crops_per_image": plans[tokens].crops,
                "split": list(budgets[tokens]) if budgets[tokens] else None,
                "step_time_s": t,
                "step_times_s": times[tokens],
                "peak_mem_mb": peak / 2**20,
                "resident_mem_mb": start / 2**20,
                "peak_above_resident_mb": (peak - start) / 2**20,
                "tokens_per_s": int(batch["attention_mask"].sum()) / t,
                "samples_per_s": batch["input_ids"].shape[0] / t,
                "seq_len": row["seq_len"],
                "step_gflop": row["flops"] / 1e9,
                "achieved_gflop_per_s": row["flops"] / 1e9 / t,
                "measured_speedup": measured,
                "ideal_speedup": ideal,
                "measured_over_ideal": measured / ideal,
            }
        )
    meta = {
        "size": size.name,
        "family": args.family,
        "shapes": size.note,
        "mode": args.mode,
        "device": str(device),
        "dtype": size.dtype,
        "batch_size": size.batch_size,
        "text_tokens_range": list(size.text_tokens),
        "timed_steps_per_budget": steps,
        "flops_source": (
            "counted (torch.utils.flop_counter.FlopCounterMode, warm-up step)"
            if not size.flop_model
            else f"{type(family).__name__}.step_flops (visionzip_core/families/)"
        ),
        "memory_measure": (
            "torch.cuda.max_memory_allocated"
            if device.type == "cuda"
            else "peak live tensor storage (LiveTensorMemory dispatch tracker)"
        ),
        **run_context(device),
    }
    for r in results:
        r["run"] = meta
    return results


def compare_packing(args: argparse.Namespace) -> list[dict]:
    """Each budget, three passes over the same samples, through the trainer's own samplers and
    collators: fixed batches of ``--batch-size`` padded to their longest, in random order and
    length-grouped (the trainer's default), against rows packed to ``--row-tokens`` with a row's
    worth of tokens per micro-batch (``data.packing`` + ``data.batch_tokens``). The three passes'
    steps are interleaved; each step is timed on its own."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = sizes_for(args.family)
    size = sizes[args.size].quick() if args.quick else sizes[args.size]
    batch_size = args.batch_size or size.batch_size
    family = family_for(args.family)
    model = prepare_for_training(
        build_random_model(size, device, seed=args.seed, family=args.family), args.mode
    )
    pad_token_id = model.config.text_config.pad_token_id
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    budgets = budgets_for(args.family)
    text = mix665k_like_text_lengths(args.samples, seed=args.seed, cap=args.row_tokens - 577)

    def layouts(lengths: list[int]) -> dict:
        def fixed(grouped: bool):
            return FixedBatchSampler(
                LengthGroupedSampler(lengths, batch_size=batch_size, seed=args.seed, group_by_length=grouped)
            )

        padded = DataCollator(pad_token_id=pad_token_id)
        return {
            "padded, random order": (fixed(False), padded),
            "padded, length-grouped": (fixed(True), padded),
            "packed": (
                TokenBudgetBatchSampler(lengths, args.row_tokens, packed=True, seed=args.seed),
                PackingCollator(pad_token_id=pad_token_id, max_tokens_per_row=args.row_tokens),
            ),
        }

    def step(batch: dict) -> None:
        loss = model(**{k: v.to(device) for k, v in batch.items() if k != "num_tokens"}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    results = []
    for tokens in args.budgets:
        set_budget(model, tokens, budgets)
        items = family.bench_items(size, text, tokens, seed=args.seed)
        plans = layouts([len(item["input_ids"]) for item in items])
        batches = {
            name: [collate([items[i] for i in b]) for b in sampler]
            for name, (sampler, collate) in plans.items()
        }
        for micro in batches.values():  # warm-up: kernels, allocator, optimizer state
            step(micro[0])
        # Interleaved in proportion (each layout's k-th of n micro-batches at k/n of the way), so
        # that a change in the machine's load falls on every layout alike.
        seconds = dict.fromkeys(batches, 0.0)
        schedule = sorted((k / len(m), name, k) for name, m in batches.items() for k in range(len(m)))
        for _, name, k in schedule:
            start = time.perf_counter()
            step(batches[name][k])
            seconds[name] += time.perf_counter() - start
        row = {}
        for name, micro in batches.items():
            real = sum(
                int(b["num_tokens"]) if "num_tokens" in b else int(b["attention_mask"].sum()) for b in micro
            )
            slots = sum(b["input_ids"].numel() for b in micro)
            samples = sum(len(b) for b in plans[name][0])
            row[name] = {
                "micro_batches": len(micro),
                "samples": samples,
                "seconds": seconds[name],
                "tokens_per_s": real / seconds[name],
                "samples_per_s": samples / seconds[name],
                "padding_fraction": 1 - real / slots,
            }
            print(
                f"  {tokens:>3} tokens, {name}: {seconds[name]:.1f}s for {samples} samples, "
                f"{real / seconds[name]:.0f} tokens/s, padding {1 - real / slots:.0%}, {len(micro)} micro-batches",
                flush=True,
            )
        packed = row["packed"]["tokens_per_s"]
        results.append(
            {
                "tokens": tokens,
                "image_tokens": tokens,
                "split": list(budgets[tokens]) if budgets[tokens] else None,
                "layouts": row,
                "packed_over_random_tokens_per_s": packed / row["padded, random order"]["tokens_per_s"],
                "packed_over_grouped_tokens_per_s": packed / row["padded, length-grouped"]["tokens_per_s"],
            }
        )
    meta = {
        "size": size.name,
        "family": args.family,
        "shapes": size.note,
        "mode": args.mode,
        "device": str(device),
        "dtype": size.dtype,
        "batch_size": batch_size,
        "row_tokens": args.row_tokens,
        "samples": args.samples,
        "text_lengths": "mix665k_like_text_lengths (visionzip_core/bench/synthetic.py)",
        **run_context(device),
    }
    for r in results:
        r["run"] = meta
    return results


def packing_table(results: list[dict]) -> str:
    head = (
        "| visual tokens | layout | micro-batches | padding | samples/s | non-padding tokens/s "
        "| packed / this |\n|---:|---|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in results:
        packed = r["layouts"]["packed"]["tokens_per_s"]
        for name, x in r["layouts"].items():
            ratio = f"{packed / x['tokens_per_s']:.2f}x" if name != "packed" else ""
            lines.append(
                f"| {budget_label(r)} | {name} | {x['micro_batches']} | {x['padding_fraction']:.0%} "
                f"| {x['samples_per_s']:.2f} | {x['tokens_per_s']:.0f} | {ratio} |"
            )
    return head + "\n".join(lines) + "\n"


def markdown_table(results: list[dict]) -> str:
    head = (
        "| visual tokens | seq len | step time (s) | peak mem (MB) | above resident (MB) | tokens/s "
        "| measured speed-up | FLOP-ideal speed-up | measured / ideal |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| {budget_label(r)} | {r['seq_len']} | {r['step_time_s']:.3f} "
        f"| {r['peak_mem_mb']:.0f} | {r['peak_above_resident_mb']:.0f} | {r['tokens_per_s']:.0f} "
        f"| {r['measured_speedup']:.2f}x | {r['ideal_speedup']:.2f}x | {r['measured_over_ideal']:.0%} |"
        for r in results
    ]
    return head + "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [budget_label(r).replace(" (stock)", "") for r in results]
    base = next(r["step_time_s"] for r in results if r["split"] is None)
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    ax_t.bar(labels, [r["step_time_s"] for r in results], color="tab:blue", label="measured (median)")
    ax_t.plot(labels, [base / r["ideal_speedup"] for r in results], "k--o", label="FLOP-ideal")
    ax_t.set(xlabel="visual tokens per image", ylabel="step time (s)", title="training step time")
    ax_t.legend()
    ax_m.bar(
        labels, [r["resident_mem_mb"] for r in results], color="tab:gray", label="resident (weights, optim)"
    )
    ax_m.bar(
        labels,
        [r["peak_above_resident_mb"] for r in results],
        bottom=[r["resident_mem_mb"] for r in results],
        color="tab:orange",
        label="activations + transient",
    )
    ax_m.set(xlabel="visual tokens per image", ylabel="peak memory (MB)", title="peak memory")
    ax_m.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.compare_packing:
        results = compare_packing(args)
        meta = results[0]["run"]
        title = (
            f"{meta['size']} / {meta['mode']} / {meta['machine']} / padded batches of {meta['batch_size']} "
            f"vs packed rows of {meta['row_tokens']} tokens"
        )
        table = packing_table(results)
        print(f"\n{title}\n{meta['shapes']}\n\n{table}")
        if args.out:
            print("wrote", ", ".join(map(str, write_report(args.out, results, title, table))))
        return
    results = run(args)
    meta = results[0]["run"]
    title = f"{meta['size']} / {meta['mode']} / {meta['machine']} / batch {meta['batch_size']}"
    table = markdown_table(results)
    print(f"\n{title}\n{meta['shapes']}\n\n{table}")
    if args.out:
        written = write_report(args.out, results, title, table)
        plot(results, args.out.with_suffix(".png"), title)
        print("wrote", ", ".join(map(str, [*written, args.out.with_suffix(".png")])))


if __name__ == "__main__":
    main()
