"""Training-free VisionZip inference on a checkpoint of any supported family (LLaVA-1.5, LLaVA-NeXT,
Qwen2-VL, Qwen2.5-VL).

    python scripts/generate.py --model builtin:tiny-llava --prompt "What is in the picture?"
    python scripts/generate.py --model /models/llava-1.5-7b-hf --image cat.jpg --dominant 54 --contextual 10
    python scripts/generate.py --model outputs/demo/final --image data/demo/images/val_0000.png \\
        --prompt "What colour is the shape?"     # a trained export: its recorded split is used
    python scripts/generate.py --model PATH --image a.png --image b.png --prompt "Compare them." --no-visionzip
    python scripts/generate.py --model /models/Qwen2.5-VL-7B-Instruct --image cat.jpg \
        --dominant-ratio 0.45 --contextual-ratio 0.05      # per-image fractions (Qwen families)
    python scripts/generate.py --model QWEN --video f0.png,f1.png,f2.png,f3.png --prompt "What happens?"

Prints how many visual tokens each image kept and the generated text. Without ``--image`` a
small built-in picture (a red circle on white) is used. ``--prompt`` is the question only; it is
wrapped the way the family trains: for a family prompted through its chat template (Qwen2-VL,
Qwen2.5-VL) one user turn of HF ``messages`` with the images (and ``--video`` frame lists) first;
for LLaVA the ``vicuna_v1`` template, ``{system} USER: <image>\\n{prompt} ASSISTANT:``, one
``<image>`` per image.
A checkpoint that records VisionZip settings (an export of ``train/finetune.py``) keeps them
for any budget flag left out; any other checkpoint takes the family's default budget (54 + 10
for LLaVA, ratios 0.45 + 0.05 of each image's tokens for Qwen).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default="builtin:tiny-llava",
        help="model folder of any supported family (a download or a run's final/), hub id or builtin:*",
    )
    parser.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    parser.add_argument(
        "--prompt",
        default="What is in the picture?",
        help="the question (wrapped in the family's prompt: its chat template, or vicuna_v1 for LLaVA)",
    )
    from visionzip_core.config import add_budget_flags  # the package imports torch: after --help's parse

    add_budget_flags(parser)
    parser.add_argument(
        "--video",
        action="append",
        default=[],
        help="a video as comma-separated frame files, all of one size (families that take video: "
        "qwen2-vl, qwen2.5-vl)",
    )
    parser.add_argument(
        "--system", default=None, help="system prompt (default: the model's own; '' for none)"
    )
    parser.add_argument("--no-visionzip", action="store_true", help="run the stock model (all patches)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="reply length limit (greedy decoding)")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="weights dtype"
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    return parser.parse_args(argv)


def default_image():
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (336, 336), "white")
    ImageDraw.Draw(img).ellipse((84, 84, 252, 252), fill="red")
    return img


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = parse_args(argv)
    # Cheap checks before any weights load.
    missing = [p for p in args.image if not Path(p).is_file()]
    if missing:
        return _fail(f"--image not found: {', '.join(missing)}")
    videos = [[f for f in v.split(",") if f] for v in args.video]
    missing = [f for v in videos for f in v if not Path(f).is_file()]
    if missing or any(not v for v in videos):
        return _fail(f"--video: frame files not found: {', '.join(missing) or 'an empty list'}")
    for number, frames in enumerate(videos, 1):
        problem = _frame_size_problem(frames)
        if problem:
            return _fail(f"--video {number} ({args.video[number - 1]}): {problem}")

    import torch
    from PIL import Image
    from transformers import AutoConfig

    from visionzip_core import (
        read_visionzip_config,
        remove_visionzip,
        visionzip,
        visionzip_processor,
    )
    from visionzip_core.config import one_line, settings_from_flags
    from visionzip_core.families import family_for, image_token_count, ratio_flags_refusal
    from visionzip_core.model_folders import check_model_folder
    from visionzip_core.model_names import resolve_model_path
    from visionzip_core.weight_checks import WeightsError

    try:
        path = resolve_model_path(args.model)
    except ValueError as err:
        return _fail(f"--model: {err}")
    try:
        config = AutoConfig.from_pretrained(path) if Path(path, "config.json").is_file() else None
    except (OSError, ValueError, KeyError) as err:
        return _fail(f"--model: cannot read {path}/config.json ({' '.join(str(err).split())[:200]})")
    problems = check_model_folder(path, "llava", "--model", config)
    if problems:
        return _fail("; ".join(problems))
    family = family_for(config)
    if videos and not family.takes_video:
        return _fail(f"--video: {family.name} takes images only")
    ratios = {"dominant_ratio": args.dominant_ratio, "contextual_ratio": args.contextual_ratio}
    if not args.no_visionzip and any(v is not None for v in ratios.values()) and not family.takes_ratios:
        return _fail(ratio_flags_refusal(family))
    dtype = getattr(torch, args.dtype)
    try:
        model = family.load(path, dtype=dtype).to(args.device).eval()
    except WeightsError as err:
        return _fail(str(err))
    processor = family.load_processor(path)
    recorded = read_visionzip_config(model.config)
    stock_count = image_token_count(remove_visionzip(model).config)  # (H, W) -> the stock count
    settings = None
    if not args.no_visionzip:
        # A flag left out keeps the checkpoint's recorded value, else the family's default budget.
        try:
            settings = settings_from_flags(
                recorded, family.default_budget, dominant=args.dominant, contextual=args.contextual, **ratios
            )
        except ValueError as err:
            return _fail(one_line(err))
        if recorded is not None and _split(settings) != _split(recorded):
            # A trained export learnt on its own split; another one is a different model input.
            print(
                f"note: this export was trained at {_split(recorded)}; generating at {_split(settings)} instead",
                file=sys.stderr,
            )
    if settings is not None:
        try:
            visionzip(model, config=settings)
        except ValueError as err:
            return _fail(str(err))
        visionzip_processor(processor, model.config)

    images = [Image.open(p).convert("RGB") for p in args.image]
    if not images and not videos:
        images = [default_image()]
    frames = [[Image.open(f).convert("RGB") for f in v] for v in videos]
    prompt = family.prompt(processor, args.prompt, len(images), len(frames), system=args.system)
    try:
        inputs = processor(
            text=[prompt],
            images=images or None,
            return_tensors="pt",
            **({"videos": frames} if frames else {}),
        ).to(args.device)
    except ValueError as err:  # e.g. an image too small for a fixed split
        return _fail(" ".join(str(err).split()))
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs:
            inputs[key] = inputs[key].to(dtype)
    kept_count = image_token_count(model.config, settings)
    sizes = family.counted_image_sizes(model.config, inputs, images) if images else []
    kept, stock = _per_image([kept_count(s) for s in sizes]), _per_image([stock_count(s) for s in sizes])
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == sum(map(kept_count, sizes))
    video_id = getattr(model.config, "video_token_id", None)
    video_tokens = 0 if video_id is None else int((inputs["input_ids"] == video_id).sum())
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    how = "stock" if settings is None else f"VisionZip {_split(settings)}"
    print(f"model: {path}")
    if images:
        print(f"visual tokens per image: {kept} of {stock} ({how}), images: {len(images)}")
    if frames:
        print(f"video tokens: {video_tokens} ({how}), videos: {len(frames)}")
    print(f"generated: {text.strip()!r}")
    return 0


def _frame_size_problem(frames: list[str]) -> str | None:
    """Why a video's frames cannot make one video (they differ in size, as training refuses), naming
    the first odd frame; None when they are one size. Reads image headers only."""
    from PIL import Image, UnidentifiedImageError

    sizes = []
    for frame in frames:
        try:
            with Image.open(frame) as img:
                sizes.append((img.height, img.width))
        except (OSError, UnidentifiedImageError) as err:
            return f"frame {len(sizes) + 1} ({frame}) cannot be read as an image ({type(err).__name__})"
    odd = next((k for k, size in enumerate(sizes) if size != sizes[0]), None)
    if odd is None:
        return None
    (h, w), (h0, w0) = sizes[odd], sizes[0]
    return (
        f"the frames differ in size: frame {odd + 1} ({frames[odd]}) is {h}x{w}, frame 1 ({frames[0]}) is "
        f"{h0}x{w0} (height x width)"
    )


def _split(vz) -> str:
    """``"dominant 54 + contextual 10"`` or ``"dominant 45% + contextual 5% of each image"``."""
    if vz.uses_ratios:
        return f"dominant {vz.dominant_ratio:.0%} + contextual {vz.contextual_ratio:.0%} of each image"
    return f"dominant {vz.dominant} + contextual {vz.contextual}"


def _per_image(counts: list[int]) -> str:
    """``"16"`` when every image gets the same count, else ``"40 + 50"`` (tiled images)."""
    return str(counts[0]) if len(set(counts)) == 1 else " + ".join(map(str, counts))


if __name__ == "__main__":
    raise SystemExit(main())
