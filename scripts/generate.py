"""Training-free VisionZip inference on a llava-hf checkpoint.

    python scripts/generate.py --model builtin:tiny-llava --prompt "What is in the picture?"
    python scripts/generate.py --model /models/llava-1.5-7b-hf --image cat.jpg --dominant 54 --contextual 10
    python scripts/generate.py --model outputs/demo/final --image data/demo/images/val_0000.png \\
        --prompt "What colour is the shape?"     # a trained export: its recorded split is used
    python scripts/generate.py --model PATH --image a.png --image b.png --prompt "Compare them." --no-visionzip

Prints how many visual tokens each image kept and the generated text. Without ``--image`` a
small built-in picture (a red circle on white) is used. ``--prompt`` is the question only; it is
wrapped the way LLaVA-1.5 trains (the ``vicuna_v1`` template):
``{system} USER: <image>\\n{prompt} ASSISTANT:``, one ``<image>`` per image.
A checkpoint that records VisionZip settings (an export of ``train/finetune.py``) keeps them
for any of ``--dominant/--contextual`` left out; any other checkpoint defaults to 54 + 10.
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
    parser.add_argument(
        "--prompt", default="What is in the picture?", help="the question (wrapped in the vicuna_v1 template)"
    )
    parser.add_argument(
        "--dominant", type=int, default=None, help="tokens kept by CLS attention, CLS included (default 54)"
    )
    parser.add_argument(
        "--contextual", type=int, default=None, help="merged tokens built from the rest (default 10)"
    )
    parser.add_argument("--system", default=None, help="system prompt (default: LLaVA-1.5's; '' for none)")
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

    import torch
    from PIL import Image
    from transformers import AutoConfig

    from visionzip_core import (
        VisionZipConfig,
        read_visionzip_config,
        remove_visionzip,
        visionzip,
        visionzip_processor,
    )
    from visionzip_core.data.settings import VICUNA_V1_SYSTEM
    from visionzip_core.families import family_for, image_token_count
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
        # A flag left out keeps the checkpoint's recorded value, else the paper's 54 + 10.
        base = recorded.model_dump() if recorded is not None else {"dominant": 54, "contextual": 10}
        chosen = {"dominant": args.dominant, "contextual": args.contextual}
        try:
            settings = VisionZipConfig(**(base | {k: v for k, v in chosen.items() if v is not None}))
        except ValueError as err:
            return _fail(str(err))
        if recorded is not None and (settings.dominant, settings.contextual) != (
            recorded.dominant,
            recorded.contextual,
        ):
            # A trained export learnt on its own split; another one is a different model input.
            print(
                f"note: this export was trained at dominant {recorded.dominant} + contextual "
                f"{recorded.contextual}; generating at {settings.dominant} + {settings.contextual} instead",
                file=sys.stderr,
            )
    if settings is not None:
        try:
            visionzip(model, config=settings)
        except ValueError as err:
            return _fail(str(err))
        visionzip_processor(processor, model.config)

    images = [Image.open(p).convert("RGB") for p in args.image] or [default_image()]
    system = VICUNA_V1_SYSTEM if args.system is None else args.system
    prompt = f"{system} USER: " + "<image>\n" * len(images) + f"{args.prompt} ASSISTANT:"
    inputs = processor(text=[prompt], images=images, return_tensors="pt").to(args.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    kept_count = image_token_count(model.config, settings)
    sizes = [(img.height, img.width) for img in images]
    kept, stock = _per_image([kept_count(s) for s in sizes]), _per_image([stock_count(s) for s in sizes])
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == sum(map(kept_count, sizes))
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    how = (
        "stock"
        if settings is None
        else f"VisionZip dominant {settings.dominant} + contextual {settings.contextual}"
    )
    print(f"model: {path}")
    print(f"visual tokens per image: {kept} of {stock} ({how}), images: {len(images)}")
    print(f"generated: {text.strip()!r}")
    return 0


def _per_image(counts: list[int]) -> str:
    """``"16"`` when every image gets the same count, else ``"40 + 50"`` (tiled images)."""
    return str(counts[0]) if len(set(counts)) == 1 else " + ".join(map(str, counts))


if __name__ == "__main__":
    raise SystemExit(main())
