"""Score a model by generation: exact-match accuracy of its first reply, at several token budgets.

    python scripts/evaluate.py --model outputs/demo/final --data data/demo/instruct_val.json \\
        --image-folder data/demo/images --out results/eval_demo.json --budgets recorded,stock,6+2

For every sample with an image (or a video, for a family that takes video), the first user turn
is asked the way the model's family is trained (LLaVA: ``{system} USER: <image>\\n{question}
ASSISTANT:``; Qwen2-VL / Qwen2.5-VL: the processor's chat template) and the greedy reply is
compared with the first assistant turn, ignoring case, surrounding spaces and one trailing
period. Each budget (``stock``: no compression; ``recorded``: a trained export's own split;
``D+C``: dominant + contextual) runs over the same samples in one process, so the rows compare
side by side.

``--out`` gets a JSON list, one row per budget: ``tokens`` (visual tokens per image), ``budget``,
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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a trained export (final/) or a downloaded model folder")
    p.add_argument("--data", required=True, help="samples, .json/.jsonl in LLaVA or messages format")
    p.add_argument("--image-folder", required=True, help="folder the samples' image paths are relative to")
    p.add_argument("--out", type=Path, required=True, help="JSON file for the rows")
    p.add_argument(
        "--budgets",
        default=None,
        help="comma-separated: stock, recorded, D+C (default: recorded,stock for an export, else stock,54+10)",
    )
    p.add_argument("--max-new-tokens", type=int, default=16, help="reply length limit (default 16)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N samples with an image")
    p.add_argument(
        "--system",
        default=None,
        help="system prompt (default: the family's own, e.g. vicuna's for LLaVA; '' for none)",
    )
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="weights dtype"
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    return p.parse_args(argv)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = parse_args(argv)
    from visionzip_core.evaluation import load_eval_samples

    for flag, value, kind in (("--data", args.data, "file"), ("--image-folder", args.image_folder, "dir")):
        ok = Path(value).is_file() if kind == "file" else Path(value).is_dir()
        if not ok:
            return _fail(f"{flag}: no such {'file' if kind == 'file' else 'directory'} {value}")
    try:
        samples = load_eval_samples(args.data, args.image_folder)
    except ValueError as err:
        return _fail(str(err))

    import torch
    from tqdm.auto import tqdm
    from transformers import AutoConfig

    from visionzip_core import (
        VisionZipConfig,
        read_visionzip_config,
        remove_visionzip,
        visionzip,
        visionzip_processor,
    )
    from visionzip_core.bench.live_memory import peak_memory_bytes
    from visionzip_core.evaluation import (
        FirstTokenTimer,
        eval_inputs,
        exact_match,
        parse_budgets,
        samples_for,
    )
    from visionzip_core.families import family_for, image_token_count
    from visionzip_core.model_folders import check_model_folder
    from visionzip_core.model_names import resolve_model_path
    from visionzip_core.weight_checks import WeightsError

    try:
        path = resolve_model_path(args.model)
        config = AutoConfig.from_pretrained(path) if Path(path, "config.json").is_file() else None
    except (OSError, ValueError, KeyError) as err:
        return _fail(f"--model: {' '.join(str(err).split())[:200]}")
    problems = check_model_folder(path, "llava", "--model", config)
    if problems:
        return _fail("; ".join(problems))
    family, device, dtype = family_for(config), torch.device(args.device), getattr(torch, args.dtype)
    samples, videos_left_out = samples_for(family, samples)
    if videos_left_out:
        note = f"note: {videos_left_out} samples with a video left out ({family.name} takes images only)"
        print(note, file=sys.stderr)
    samples = samples[: args.limit] if args.limit else samples
    if not samples:
        return _fail(f"--data: {args.data} has no sample with an image")
    try:
        model = family.load(path, dtype=dtype).to(device).eval()
    except WeightsError as err:
        return _fail(str(err))
    processor = family.load_processor(path)
    recorded = read_visionzip_config(model.config)
    split = (recorded.dominant, recorded.contextual) if recorded is not None else None
    default = "recorded,stock" if recorded is not None else "stock,54+10"
    try:
        budgets = parse_budgets(args.budgets or default, split)
    except ValueError as err:
        return _fail(str(err))
    base = recorded.model_dump() if recorded is not None else {}

    rows = []
    # A bar on a terminal; in a log file (disable=None) one line per budget instead.
    bar = tqdm(
        total=len(samples) * len(budgets), desc="evaluate", unit="sample", file=sys.stderr, disable=None
    )
    for label, chosen in budgets:
        remove_visionzip(model)
        processor = family.load_processor(path)
        settings = None
        if chosen is not None:
            try:
                settings = VisionZipConfig(**(base | {"dominant": chosen[0], "contextual": chosen[1]}))
                visionzip(model, config=settings)
            except ValueError as err:
                bar.close()
                return _fail(f"--budgets {label}: {err}")
            visionzip_processor(processor, model.config)
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
            reply = processor.tokenizer.decode(
                out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
            )
            if exact_match(reply, sample.reference):
                correct += 1
            elif len(mistakes) < 5:
                mistakes.append(
                    {"id": sample.sample_id, "reference": sample.reference, "reply": reply.strip()}
                )
            bar.update(1)
        seconds = time.perf_counter() - start
        if bar.disable:
            print(f"{label}: {correct}/{len(samples)} correct in {seconds:.1f}s", file=sys.stderr, flush=True)
        rows.append(
            {
                "budget": label,
                "tokens": min(tokens) if len(tokens) == 1 else sorted(tokens),  # [] if videos only
                "dominant": chosen[0] if chosen else None,
                "contextual": chosen[1] if chosen else None,
                "accuracy": correct / len(samples),
                "correct": correct,
                "samples": len(samples),
                "ttft_s": statistics.median(ttfts),
                "samples_per_s": len(samples) / seconds,
                "peak_mem_mb": peak / 2**20,
                "mistakes": mistakes,
            }
        )
    bar.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"model: {path} ({family.name})\ndata: {args.data} ({len(samples)} samples with an image or video)")
    print("| budget | visual tokens/image | accuracy | time to first token (s) | peak mem (MB) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['budget']} | {r['tokens']} | {r['accuracy']:.3f} ({r['correct']}/{r['samples']}) "
            f"| {r['ttft_s']:.3f} | {r['peak_mem_mb']:.0f} |"
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
