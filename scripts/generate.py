"""Training-free VisionZip inference on a llava-hf checkpoint.

    python scripts/generate.py --model builtin:tiny-llava --prompt "What is in the picture?"
    python scripts/generate.py --model /models/llava-1.5-7b-hf --image cat.jpg --dominant 54 --contextual 10
    python scripts/generate.py --model outputs/demo/final --image data/demo/images/val_0000.png \\
        --prompt "What colour is the shape?"     # a trained export: its recorded split is used
    python scripts/generate.py --model PATH --image a.png --image b.png --prompt "Compare them." --no-visionzip
    python scripts/generate.py --model /models/Qwen2.5-VL-7B-Instruct --image cat.jpg \
        --dominant-ratio 0.45 --contextual-ratio 0.05      # per-image fractions (qwen2.5-vl)
    python scripts/generate.py --model QWEN --video f0.png,f1.png,f2.png,f3.png --prompt "What happens?"

Prints how many visual tokens each image kept and the generated text. Without ``--image`` a
small built-in picture (a red circle on white) is used. ``--prompt`` is the question only; it is
wrapped the way LLaVA-1.5 trains (the ``vicuna_v1`` template):
``{system} USER: <image>\\n{prompt} ASSISTANT:``, one ``<image>`` per image; for a family
prompted through its chat template (Qwen2.5-VL) it is one user turn of HF ``messages`` with the
images (and ``--video`` frame lists) first.
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
    parser.add_argument(
        "--dominant-ratio",
        type=float,
        default=None,
        help="qwen2.5-vl: dominant tokens per image, as a fraction",
    )
    parser.add_argument(
        "--contextual-ratio", type=float, default=None, help="qwen2.5-vl: contextual tokens, as a fraction"
    )
    parser.add_argument(
        "--video", action="append", default=[], help="a video as comma-separated frame files (qwen2.5-vl)"
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
    from visionzip_core.config import one_line
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
        default = (
            {"dominant_ratio": 0.45, "contextual_ratio": 0.05}  # the authors' 50 % setting
            if family.count_depends_on_size and family.uses_chat_template
            else {"dominant": 54, "contextual": 10}
        )
        base = recorded.model_dump() if recorded is not None else default
        base["feature_layer"] = base.get("feature_layer", family.default_feature_layer)
        chosen = {"dominant": args.dominant, "contextual": args.contextual}
        ratios = {"dominant_ratio": args.dominant_ratio, "contextual_ratio": args.contextual_ratio}
        if any(v is not None for v in ratios.values()):
            chosen |= ratios
        elif any(v is not None for v in chosen.values()):
            chosen |= {"dominant_ratio": None, "contextual_ratio": None}  # counts replace recorded ratios
        try:
            settings = VisionZipConfig(
                **(base | {k: v for k, v in chosen.items() if v is not None or "ratio" in k})
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

    if videos and not family.takes_video:
        return _fail(f"--video: {family.name} takes images only")
    images = [Image.open(p).convert("RGB") for p in args.image]
    if not images and not videos:
        images = [default_image()]
    frames = [[Image.open(f).convert("RGB") for f in v] for v in videos]
    if family.uses_chat_template:
        content = [{"type": "image"} for _ in images] + [{"type": "video"} for _ in frames]
        messages = [] if not args.system else [{"role": "system", "content": args.system}]
        messages.append({"role": "user", "content": [*content, {"type": "text", "text": args.prompt}]})
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        system = VICUNA_V1_SYSTEM if args.system is None else args.system
        prompt = f"{system} USER: " + "<image>\n" * len(images) + f"{args.prompt} ASSISTANT:"
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
