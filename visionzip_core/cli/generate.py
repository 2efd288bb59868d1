"""Training-free VisionZip inference on a checkpoint of any supported family (LLaVA-1.5, LLaVA-NeXT,
Qwen2-VL, Qwen2.5-VL).

    visionzip-generate --model builtin:tiny-llava --prompt "What is in the picture?"
    visionzip-generate --model /models/llava-1.5-7b-hf --image cat.jpg --dominant 54 --contextual 10
    visionzip-generate --model outputs/demo/final --image data/demo/images/val_0000.png \\
        --prompt "What colour is the shape?"     # a trained export: its recorded split is used
    visionzip-generate --model PATH --image a.png --image b.png --prompt "Compare them." --no-visionzip
    visionzip-generate --model /models/Qwen2.5-VL-7B-Instruct --image cat.jpg \\
        --dominant-ratio 0.45 --contextual-ratio 0.05      # per-image fractions (Qwen families)
    visionzip-generate --model QWEN --video f0.png,f1.png,f2.png,f3.png --prompt "What happens?"

``python scripts/generate.py`` takes the same arguments. Prints how many visual tokens each image
kept and the generated text. Without ``--image`` a small built-in picture (a red circle on white)
is used. ``--prompt`` is the question only; it is
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

import torch
from PIL import Image, ImageDraw

from visionzip_core.adapt import remove_visionzip, visionzip, visionzip_processor
from visionzip_core.cli.inputs import add_system_flag, check_images, video_frames
from visionzip_core.cli.open_model import (
    CommandError,
    add_model_flags,
    budget_flags,
    fail,
    open_model_folder,
    split_text,
)
from visionzip_core.config import add_budget_flags
from visionzip_core.families import image_token_count


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_flags(parser, default="builtin:tiny-llava")
    parser.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    parser.add_argument(
        "--video",
        action="append",
        default=[],
        help="a video as comma-separated frame files, all of one size (repeat for several; families "
        "that take video: the Qwen families, llava-onevision)",
    )
    parser.add_argument(
        "--prompt",
        default="What is in the picture?",
        help="the question (wrapped in the family's prompt: its chat template, or vicuna_v1 for LLaVA)",
    )
    add_system_flag(parser)
    add_budget_flags(parser)
    parser.add_argument("--no-visionzip", action="store_true", help="run the stock model (all patches)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="reply length limit (greedy decoding)")
    return parser.parse_args(argv)


def default_image() -> Image.Image:
    """The picture shown without ``--image``: a red circle on white, 336 px."""
    img = Image.new("RGB", (336, 336), "white")
    ImageDraw.Draw(img).ellipse((84, 84, 252, 252), fill="red")
    return img


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return generate(args)
    except CommandError as err:
        return fail(err)


def generate(args: argparse.Namespace) -> int:
    # Cheap checks before any weights load.
    check_images(args.image)
    videos = video_frames(args.video)
    folder = open_model_folder(args.model)
    folder.refuse_video(bool(videos))
    settings = None if args.no_visionzip else folder.budget(budget_flags(args), doing="generating")

    model = folder.load(args.dtype, args.device)
    processor = folder.processor()
    stock_count = image_token_count(remove_visionzip(model).config)  # (H, W) -> the stock count
    if settings is not None:
        try:
            visionzip(model, config=settings)
        except ValueError as err:
            raise CommandError(str(err)) from None
        visionzip_processor(processor, model.config)

    images = [Image.open(p).convert("RGB") for p in args.image] or ([] if videos else [default_image()])
    frames = [[Image.open(f).convert("RGB") for f in v] for v in videos]
    family, dtype = folder.family, getattr(torch, args.dtype)
    prompt = family.prompt(processor, args.prompt, len(images), len(frames), system=args.system)
    try:
        inputs = processor(
            text=[prompt],
            images=images or None,
            return_tensors="pt",
            **({"videos": frames} if frames else {}),
        ).to(args.device)
    except ValueError as err:  # e.g. an image too small for a fixed split
        raise CommandError(str(err)) from None
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

    how = "stock" if settings is None else f"VisionZip {split_text(settings)}"
    print(f"model: {folder.path}")
    if images:
        print(f"visual tokens per image: {kept} of {stock} ({how}), images: {len(images)}")
    if frames:
        print(f"video tokens: {video_tokens} ({how}), videos: {len(frames)}")
    print(f"generated: {text.strip()!r}")
    return 0


def _per_image(counts: list[int]) -> str:
    """``"16"`` when every image gets the same count, else ``"40 + 50"`` (tiled images)."""
    return str(counts[0]) if len(set(counts)) == 1 else " + ".join(map(str, counts))


if __name__ == "__main__":
    sys.exit(main())
