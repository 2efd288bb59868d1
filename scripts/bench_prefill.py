"""Prefill latency (time to first token) and generation throughput at visual-token budgets
576 (stock), 192, 128 and 64, through transformers' ``generate`` and the VisionZip processor.

Per budget the prompt goes through ``LlavaProcessor`` adapted by ``visionzip_processor`` (so
``<image>`` expands to the budget's token count), then ``model.generate``:
  - time to first token: ``generate(max_new_tokens=1)`` (vision tower, compression, projector,
    LLM prefill, one LM-head position);
  - generation: ``generate(max_new_tokens=N, min_new_tokens=N)``; decode tokens/s is
    ``batch * (N - 1) / (t_N - t_1)``, and end-to-end new tokens/s is ``batch * N / t_N``.
Greedy decoding, random weights; budgets interleaved after a warm-up; medians.

    python scripts/bench_prefill.py --out results/bench_prefill_cpu.json
    python scripts/bench_prefill.py --quick
    python scripts/bench_prefill.py --size llava-1.5-7b --out results/bench_prefill_7b.json
    python scripts/bench_prefill.py --family llava-next --out results/bench_prefill_cpu_next.json

``--family llava-next``: LLaVA-NeXT's ``LlavaNextProcessor`` on 672 px images (5 crops each);
budgets are per crop: 576 (stock) and 128, 64, 32 (the paper's 640 / 320 / 160 per image).

``--family qwen2.5-vl``: Qwen2.5-VL's processor (``load_qwen_processor`` on a folder holding the tiny
Qwen tokenizer and Qwen2.5-VL-7B-Instruct's image settings) on 448 px images (256 merged tokens);
budgets are the percent of each image's merged tokens kept: 100 (stock), 70 (0.65 + 0.05), 50
(0.45 + 0.05), 25 (0.20 + 0.05). The FLOP figure is counted by ``torch.utils.flop_counter`` on one
1-token ``generate`` per budget. Sizes ``cpu`` and ``qwen2.5-vl-7b`` (GPU only).

    python scripts/bench_prefill.py --family qwen2.5-vl --batch-size 2 --out results/bench_prefill_cpu_qwen.json
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from visionzip_core import visionzip_processor
from visionzip_core.bench.budgets import (
    budget_label,
    budgets_for,
    budgets_help,
    image_plan,
    parse_budgets,
    set_budget,
    stock_budget,
)
from visionzip_core.bench.random_models import build_random_model, random_model_processor
from visionzip_core.bench.report import run_context, write_report
from visionzip_core.bench.sizes import (
    benchmarked_families,
    size_error,
    size_names,
    sizes_for,
    sizes_help,
)
from visionzip_core.bench.timing import interleaved_schedule, median
from visionzip_core.families import family_for
from visionzip_core.families.flops import TrainableParts, counted_flops

# A LLaVA-bench-like request: one image and a one-sentence question.
QUESTION = (
    "What objects can you see in this picture, where are they located, and which colour and shape "
    "is each one? Please describe the background too, and answer briefly."
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=size_names(), default="cpu", metavar="SIZE", help=sizes_help())
    p.add_argument("--family", choices=benchmarked_families(), default=benchmarked_families()[0])
    p.add_argument(
        "--quick", action="store_true", help="smoke run: fewer layers, 1 timed round, 8 new tokens"
    )
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per budget (default 3; quick 1)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated (default 32; quick 8)")
    p.add_argument("--batch-size", type=int, default=1, help="prompts per generate call")
    p.add_argument(
        "--budgets",
        default=None,
        help=budgets_help(),
    )
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="JSON path; .md is written beside it")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    error = size_error(
        args.family, args.size, args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    )
    if error:
        p.error(error)
    try:
        allowed = budgets_for(args.family)
        args.budgets = parse_budgets(args.budgets or ",".join(map(str, allowed)), allowed)
    except ValueError as err:
        p.error(str(err))
    return args


def prompt_inputs(size, model, batch_size: int, device, seed: int):
    """Processor outputs for the current budget of ``model`` (the processor expands ``<image>``)."""
    processor = visionzip_processor(random_model_processor(size, model), model.config)
    rng = np.random.default_rng(seed)
    family = family_for(model)
    side = model.config.vision_config.image_size if family.bench_image is None else None
    h, w = family.bench_image or (side, side)
    messages = family.bench_messages(QUESTION)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(batch_size)]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=images, text=[text] * batch_size, return_tensors="pt", padding=True)
    inputs["pixel_values"] = inputs["pixel_values"].to(getattr(torch, size.dtype))
    return {k: v.to(device) for k, v in inputs.items()}


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = sizes_for(args.family)
    size = sizes[args.size].quick() if args.quick else sizes[args.size]
    size = replace(size, batch_size=args.batch_size)
    percent = family_for(args.family).takes_ratios  # budgets are percent of each image's tokens
    rounds = args.rounds or (1 if args.quick else 3)
    new_tokens = args.new_tokens or (8 if args.quick else 32)

    model = build_random_model(size, device, seed=args.seed, family=args.family).eval()
    random_model_processor(size, model)  # points the model's special ids at the tokenizer's
    budgets = budgets_for(args.family)
    ref = stock_budget(budgets)
    plans = {k: image_plan(model.config, args.family, k) for k in args.budgets}
    inputs = {}
    for tokens in args.budgets:
        set_budget(model, tokens, budgets)
        inputs[tokens] = prompt_inputs(size, model, size.batch_size, device, args.seed)
        found = int((inputs[tokens]["input_ids"] == model.config.image_token_id).sum()) // size.batch_size
        if found != plans[tokens].llm:
            raise RuntimeError(f"processor inserted {found} image tokens for budget {tokens}")

    def generate(tokens: int, n: int) -> float:
        set_budget(model, tokens, budgets)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs[tokens], max_new_tokens=n, min_new_tokens=n, do_sample=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        if out.shape[1] - inputs[tokens]["input_ids"].shape[1] != n:
            raise RuntimeError(
                f"generate returned {out.shape[1] - inputs[tokens]['input_ids'].shape[1]} != {n} tokens"
            )
        return elapsed

    counted = {}
    for tokens in args.budgets:  # warm-up
        generate(tokens, 2)
        if (
            not size.flop_model
        ):  # the FLOP figure: counted on a 1-token generate (prefill + one LM-head position)
            counted[tokens] = counted_flops(lambda t=tokens: generate(t, 1))
    first: dict[int, list[float]] = {k: [] for k in args.budgets}
    full: dict[int, list[float]] = {k: [] for k in args.budgets}
    for tokens in interleaved_schedule(args.budgets, rounds):
        first[tokens].append(generate(tokens, 1))
        full[tokens].append(generate(tokens, new_tokens))
        unit = "% of tokens" if percent else " tokens"
        print(
            f"  {tokens:>3}{unit}: first {first[tokens][-1]:.3f}s, {new_tokens} new {full[tokens][-1]:.3f}s",
            flush=True,
        )

    def prefill_flops(tokens: int) -> int:
        if not size.flop_model:
            return counted[tokens]
        return (
            family_for(args.family)
            .step_flops(
                size,
                model.config,
                TrainableParts(projector=False),
                plans[tokens],
                budgets[tokens],
                samples=size.batch_size,
                seq_len=inputs[tokens]["input_ids"].shape[1],
                logits_positions=1,
            )["total"]
            .forward
        )

    base_ttft, base_flops = median(first[ref]), prefill_flops(ref)
    base_e2e = median(full[ref])
    results = []
    for tokens in args.budgets:
        ttft, t_n = median(first[tokens]), median(full[tokens])
        b = size.batch_size
        results.append(
            {
                "tokens": tokens,
                "budget_kind": "percent" if percent else "tokens",
                "image_tokens": plans[tokens].llm,
                "stock_image_tokens": plans[ref].llm,
                "crops_per_image": plans[tokens].crops,
                "split": list(budgets[tokens]) if budgets[tokens] else None,
                "prompt_len": inputs[tokens]["input_ids"].shape[1],
                "ttft_s": ttft,
                "prefill_speedup": base_ttft / ttft,
                "ideal_prefill_speedup": base_flops / prefill_flops(tokens),
                "generate_s": t_n,
                "new_tokens": new_tokens,
                "new_tokens_per_s": b * new_tokens / t_n,
                # Paired per round (same machine state), then the median; None when noise makes
                # the N-token call no slower than the 1-token one (too few tokens to tell).
                "decode_tokens_per_s": _decode_rate(b * (new_tokens - 1), full[tokens], first[tokens]),
                "generate_speedup": base_e2e / t_n,
            }
        )
    meta = {
        "size": size.name,
        "family": args.family,
        "shapes": size.note,
        "device": str(device),
        "dtype": size.dtype,
        "batch_size": size.batch_size,
        "rounds": rounds,
        "flops_source": (
            "counted (torch.utils.flop_counter.FlopCounterMode, 1-token generate)"
            if not size.flop_model
            else f"{type(family_for(args.family)).__name__}.step_flops (visionzip_core/families/)"
        ),
        **run_context(device),
    }
    for r in results:
        r["run"] = meta
    return results


def _decode_rate(tokens: int, full: list[float], first: list[float]) -> float | None:
    gap = median(f - s for f, s in zip(full, first))
    return tokens / gap if gap > 0 else None


def markdown_table(results: list[dict]) -> str:
    n = results[0]["new_tokens"]
    head = (
        f"| visual tokens | prompt len | time to first token (s) | prefill speed-up | FLOP-ideal | "
        f"measured / ideal | generate {n} (s) | new tokens/s | decode tokens/s |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| {budget_label(r)} | {r['prompt_len']} | {r['ttft_s']:.3f} "
        f"| {r['prefill_speedup']:.2f}x | {r['ideal_prefill_speedup']:.2f}x "
        f"| {r['prefill_speedup'] / r['ideal_prefill_speedup']:.0%} | {r['generate_s']:.3f} "
        f"| {r['new_tokens_per_s']:.1f} | "
        + ("n/a" if r["decode_tokens_per_s"] is None else f"{r['decode_tokens_per_s']:.1f}")
        + " |"
        for r in results
    ]
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    results = run(args)
    meta = results[0]["run"]
    title = f"{meta['size']} / generate / {meta['machine']} / batch {meta['batch_size']}"
    table = markdown_table(results)
    print(f"\n{title}\n{meta['shapes']}\n\n{table}")
    if args.out:
        print("wrote", ", ".join(map(str, write_report(args.out, results, title, table))))


if __name__ == "__main__":
    main()
