"""Training-free VisionZip inference on a llava-hf checkpoint.

    python scripts/generate.py --model builtin:tiny-llava --prompt "What is in the picture?"
    python scripts/generate.py --model llava-hf/llava-1.5-7b-hf --image cat.jpg --dominant 54 --contextual 10
    python scripts/generate.py --model PATH --image a.png --image b.png --prompt "Compare them." --no-visionzip

Prints how many visual tokens each image kept and the generated text. Without ``--image`` a
small built-in picture (a red circle on white) is used. The prompt follows LLaVA-1.5's format,
``USER: <image>\\n<prompt> ASSISTANT:``, with one ``<image>`` per image.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="builtin:tiny-llava", help="llava-hf folder, hub id or builtin:tiny-llava"
    )
    parser.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    parser.add_argument("--prompt", default="What is in the picture?")
    parser.add_argument(
        "--dominant", type=int, default=54, help="tokens kept by CLS attention (CLS included)"
    )
    parser.add_argument("--contextual", type=int, default=10, help="merged tokens built from the rest")
    parser.add_argument("--no-visionzip", action="store_true", help="run the stock model (all patches)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def default_image():
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (336, 336), "white")
    ImageDraw.Draw(img).ellipse((84, 84, 252, 252), fill="red")
    return img


def main(argv=None) -> int:
    args = parse_args(argv)
    # Cheap checks before any weights load.
    missing = [p for p in args.image if not Path(p).is_file()]
    if missing:
        sys.exit(f"error: --image not found: {', '.join(missing)}")

    import torch
    from PIL import Image
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    from visionzip_core import (
        VisionZipConfig,
        num_image_tokens,
        remove_visionzip,
        visionzip,
        visionzip_processor,
    )
    from visionzip_core.checkpoints import resolve_model_path

    settings = None
    if not args.no_visionzip:
        try:
            settings = VisionZipConfig(dominant=args.dominant, contextual=args.contextual)
        except ValueError as err:
            sys.exit(f"error: {err}")

    path = resolve_model_path(args.model)
    dtype = getattr(torch, args.dtype)
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype).to(args.device).eval()
    processor = LlavaProcessor.from_pretrained(path)
    stock_tokens = num_image_tokens(remove_visionzip(model).config)
    if settings is not None:
        try:
            visionzip(model, config=settings)
        except ValueError as err:
            sys.exit(f"error: {err}")
        visionzip_processor(processor, model.config)

    images = [Image.open(p).convert("RGB") for p in args.image] or [default_image()]
    prompt = "USER: " + "<image>\n" * len(images) + f"{args.prompt} ASSISTANT:"
    inputs = processor(text=[prompt], images=images, return_tensors="pt").to(args.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    kept = int((inputs["input_ids"] == model.config.image_token_id).sum()) // len(images)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    how = (
        "stock"
        if settings is None
        else f"VisionZip dominant {settings.dominant} + contextual {settings.contextual}"
    )
    print(f"model: {path}")
    print(f"visual tokens per image: {kept} of {stock_tokens} ({how}), images: {len(images)}")
    print(f"generated: {text.strip()!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
