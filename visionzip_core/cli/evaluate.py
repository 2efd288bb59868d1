"""Score a model by generation: exact-match accuracy of its first reply, at several token budgets.

    visionzip-evaluate --model outputs/demo/final --data data/demo/instruct_val.json \\
        --image-folder data/demo/images --out results/eval_demo.json --budgets recorded,stock,6+2

For every sample with an image (or a video, for a family that takes video), the first user turn
is asked the way the model's family is trained (LLaVA: ``{system} USER: <image>\\n{question}
ASSISTANT:``; Qwen2-VL / Qwen2.5-VL: the processor's chat template) and the greedy reply is
compared with the first assistant turn, ignoring case, surrounding spaces and one trailing
period. Each budget (``stock``: no compression; ``recorded``: a trained export's own split;
``default``: the family's default budget; ``D+C``: dominant + contextual counts; ``R+R``: ratios
of each image's tokens, for Qwen2-VL / Qwen2.5-VL) runs over the same samples in one process, so
the rows compare side by side. ``python scripts/evaluate.py`` takes the same arguments.

``--out`` gets a JSON list, one row per budget: ``tokens`` (visual tokens per image), ``budget``
(its label), ``dominant`` / ``contextual`` or ``dominant_ratio`` / ``contextual_ratio``,
``accuracy``, ``correct``, ``samples``, ``ttft_s`` (median time to the first new token),
``samples_per_s``, ``peak_mem_mb`` (tensor memory of one sample's generate: CUDA's allocator peak,
or live tensor storage on CPU) and the first few ``mistakes``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from visionzip_core.adapt import remove_visionzip, visionzip, visionzip_processor
from visionzip_core.bench.live_memory import peak_memory_bytes
from visionzip_core.cli.inputs import add_system_flag
from visionzip_core.cli.open_model import CommandError, add_model_flags, fail, open_model_folder
from visionzip_core.evaluation import (
    FirstTokenTimer,
    eval_inputs,
    exact_match,
    load_eval_samples,
    parse_budgets,
    samples_for,
)
from visionzip_core.families import image_token_count


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    p.add_argument("--data", required=True, help="samples, .json/.jsonl in LLaVA or messages format")
    p.add_argument("--image-folder", required=True, help="folder the samples' image paths are relative to")
    p.add_argument("--out", type=Path, required=True, help="JSON file for the rows")
    p.add_argument(
        "--budgets",
        default=None,
        help="comma-separated: stock, recorded, default, D+C, R+R (default: recorded,stock for an export, "
        "else stock,default)",
    )
    p.add_argument("--max-new-tokens", type=int, default=16, help="reply length limit (default 16)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N samples with an image")
    add_system_flag(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return evaluate(args)
    except CommandError as err:
        return fail(err)


def evaluate(args: argparse.Namespace) -> int:
    # Cheap checks before any weights load: the samples, the folder, the budgets.
    for flag, value, kind in (
        ("--data", args.data, "file"),
        ("--image-folder", args.image_folder, "directory"),
    ):
        if not (Path(value).is_file() if kind == "file" else Path(value).is_dir()):
            raise CommandError(f"{flag}: no such {kind} {value}")
    try:
        samples = load_eval_samples(args.data, args.image_folder)
    except ValueError as err:
        raise CommandError(str(err)) from None
    folder = open_model_folder(args.model)
    family = folder.family
    samples, videos_left_out = samples_for(family, samples)
    if videos_left_out:
        note = f"note: {videos_left_out} samples with a video left out ({family.name} takes images only)"
        print(note, file=sys.stderr)
    samples = samples[: args.limit] if args.limit else samples
    if not samples:
        raise CommandError(f"--data: {args.data} has no sample with an image")
    default = "recorded,stock" if folder.recorded is not None else "stock,default"
    try:
        budgets = parse_budgets(args.budgets or default, family, folder.recorded)
    except ValueError as err:
        raise CommandError(str(err)) from None

    model = folder.load(args.dtype, args.device)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = []
    # A bar on a terminal; in a log file (disable=None) one line per budget instead.
    bar = tqdm(
        total=len(samples) * len(budgets), desc="evaluate", unit="sample", file=sys.stderr, disable=None
    )
    for label, settings in budgets:
        remove_visionzip(model)
        processor = folder.processor()
        if settings is not None:
            try:
                visionzip(model, config=settings)
            except ValueError as err:
                bar.close()
                raise CommandError(f"--budgets {label}: {err}") from None
            visionzip_processor(processor, model.config)
        row = _score(args, label, model, processor, family, samples, settings, device, dtype, bar)
        rows.append({"budget": label, **row})
    bar.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"model: {folder.path} ({family.name})")
    print(f"data: {args.data} ({len(samples)} samples with an image or video)")
    print("| budget | visual tokens/image | accuracy | time to first token (s) | peak mem (MB) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['budget']} | {r['tokens']} | {r['accuracy']:.3f} ({r['correct']}/{r['samples']}) "
            f"| {r['ttft_s']:.3f} | {r['peak_mem_mb']:.0f} |"
        )
    print(f"wrote {args.out}")
    return 0


def _score(args, label, model, processor, family, samples, settings, device, dtype, bar) -> dict:
    """One budget's row: every sample asked once, greedy, its reply matched to the reference."""
    count = image_token_count(model.config, settings)
    correct, ttfts, mistakes, tokens = 0, [], [], set()
    peak = None
    start = time.perf_counter()
    for sample in samples:
        inputs, images = eval_inputs(family, processor, sample, args.system, device, dtype)
        if images:
            tokens.update(map(count, family.counted_image_sizes(model.config, inputs, images)))
        timer = FirstTokenTimer()

        def run(inputs=inputs, timer=timer):
            with torch.inference_mode():
                return model.generate(
                    **inputs, max_new_tokens=args.max_new_tokens, do_sample=False, streamer=timer
                )

        if peak is None:  # one sample's generate under the memory tracker (slower; not timed)
            peak, _ = peak_memory_bytes(run, device, lambda: [*model.parameters(), *model.buffers()])
            timer = FirstTokenTimer()
        out = run(timer=timer)
        ttfts.append(timer.first)
        reply = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        if exact_match(reply, sample.reference):
            correct += 1
        elif len(mistakes) < 5:
            mistakes.append({"id": sample.sample_id, "reference": sample.reference, "reply": reply.strip()})
        bar.update(1)
    seconds = time.perf_counter() - start
    if bar.disable:
        print(f"{label}: {correct}/{len(samples)} correct in {seconds:.1f}s", file=sys.stderr, flush=True)
    ratios = settings is not None and settings.uses_ratios
    counts = settings is not None and not ratios
    return {
        "tokens": min(tokens) if len(tokens) == 1 else sorted(tokens),  # [] if videos only
        "dominant": settings.dominant if counts else None,
        "contextual": settings.contextual if counts else None,
        "dominant_ratio": settings.dominant_ratio if ratios else None,
        "contextual_ratio": settings.contextual_ratio if ratios else None,
        "accuracy": correct / len(samples),
        "correct": correct,
        "samples": len(samples),
        "ttft_s": statistics.median(ttfts),
        "samples_per_s": len(samples) / seconds,
        "peak_mem_mb": peak / 2**20,
        "mistakes": mistakes,
    }


if __name__ == "__main__":
    sys.exit(main())
