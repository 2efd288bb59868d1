"""Draw which patches VisionZip keeps for one image: dominant patches outlined, each contextual
group (its target and the patches merged into it) shaded in its own colour.

    python scripts/show_tokens.py --model outputs/demo/final --image data/demo/images/val_0000.png \\
        --out tokens.png --aspect-ratio pad          # a trained export: its recorded split
    python scripts/show_tokens.py --model /models/llava-1.5-7b-hf --image cat.jpg --out cat.png \\
        --dominant 54 --contextual 10                # a stock llava-hf folder
    python scripts/show_tokens.py --model /models/Qwen2.5-VL-7B-Instruct --image cat.jpg --out cat.png \\
        --dominant-ratio 0.45 --contextual-ratio 0.05   # per-image fractions (Qwen2-VL, Qwen2.5-VL)
    python scripts/show_tokens.py --model QWEN --video f0.png,f1.png,f2.png,f3.png --out video.png

The picture is the image as the vision tower sees it (the model's own image processor, after the
``--aspect-ratio`` step the trainer applies: ``pad`` as ``data.image_aspect_ratio: pad`` trains;
the default is the family's inference setting, the processor alone as scripts/generate.py feeds
it: ``crop`` for LLaVA-1.5, ``anyres`` for LLaVA-NeXT, ``native`` for Qwen). The selection is the
model's own: the same capture and selection its forward runs. LLaVA-NeXT images are drawn per
crop, the base image beside the tile grid; Qwen images as merge units (2x2 patches) on the resized
picture, and a ``--video`` as one frame group (``--frame-group``, its first frame drawn). A
checkpoint that records VisionZip settings keeps them for any budget flag left out; any other
checkpoint takes the family's default (54 + 10 for LLaVA, ratios 0.45 + 0.05 for Qwen).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        required=True,
        help="model folder of any supported family (e.g. a run's final/) or builtin:*",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="image file")
    source.add_argument("--video", help="a video as comma-separated frame files (families that take video)")
    parser.add_argument("--frame-group", type=int, default=0, help="with --video: the frame group drawn")
    parser.add_argument("--out", required=True, help="PNG to write")
    from visionzip_core.config import add_budget_flags  # the package imports torch: after --help's parse

    add_budget_flags(parser)
    parser.add_argument(
        "--aspect-ratio",
        choices=["crop", "pad", "resize", "anyres", "native"],
        default=None,
        help="how the image reaches the processor, as data.image_aspect_ratio (default: the family's: "
        "crop for llava-1.5, anyres for llava-next, native for qwen)",
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = parse_args(argv)
    frames = [f for f in (args.video or "").split(",") if f]
    if args.image is not None and not Path(args.image).is_file():
        return _fail(f"--image not found: {args.image}")
    if args.video is not None:
        missing = [f for f in frames if not Path(f).is_file()]
        if missing or not frames:
            return _fail(f"--video: frame files not found: {', '.join(missing) or 'an empty list'}")

    import torch
    from PIL import Image, UnidentifiedImageError
    from transformers import AutoConfig

    from visionzip_core import read_visionzip_config, visionzip
    from visionzip_core.config import one_line, settings_from_flags
    from visionzip_core.data.images import ImageTransform
    from visionzip_core.families import family_for, ratio_flags_refusal
    from visionzip_core.model_folders import check_model_folder
    from visionzip_core.model_names import resolve_model_path
    from visionzip_core.token_overlay import (
        crop_pictures,
        draw_token_map,
        select_image,
        select_video_group,
        selection_line,
        token_map,
    )
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
    if frames and not family.takes_video:
        return _fail(f"--video: {family.name} takes images only")
    ratios = {"dominant_ratio": args.dominant_ratio, "contextual_ratio": args.contextual_ratio}
    if any(v is not None for v in ratios.values()) and not family.takes_ratios:
        return _fail(ratio_flags_refusal(family))

    # A flag left out keeps the checkpoint's recorded value, else the family's default budget.
    try:
        settings = settings_from_flags(
            read_visionzip_config(config),
            family.default_budget,
            dominant=args.dominant,
            contextual=args.contextual,
            **ratios,
        )
    except ValueError as err:
        return _fail(one_line(err))

    processor = family.load_processor(path)
    image_processor = processor.image_processor
    aspect = args.aspect_ratio or family.inference_aspect_ratio
    # Cheap checks before any weights load.
    try:
        ImageTransform(image_processor, aspect, layout=family.image_layout(image_processor))
    except ValueError as err:
        return _fail(f"--aspect-ratio {aspect}: {' '.join(str(err).split())}")
    for name in [args.image] if args.image else frames:
        try:
            with Image.open(name) as img:
                img.verify()
        except (OSError, UnidentifiedImageError) as err:
            flag = "--image" if args.image else "--video"
            return _fail(f"{flag} {name}: cannot read it as an image ({type(err).__name__})")
    dtype = getattr(torch, args.dtype)
    try:
        model = family.load(path, dtype=dtype).to(args.device).eval()
        visionzip(model, config=settings)
    except (WeightsError, ValueError) as err:
        return _fail(" ".join(str(err).split()))
    if frames:
        try:
            image = select_video_group(model, processor, frames, args.frame_group)
        except ValueError as err:
            return _fail(f"--video {args.video}: {' '.join(str(err).split())}")
        what = f"{Path(frames[0]).name}.. ({len(frames)} frames), frame group {args.frame_group}"
    else:
        try:
            image = select_image(model, image_processor, args.image, aspect)
        except ValueError as err:
            return _fail(f"--image {args.image} ({aspect}): {' '.join(str(err).split())}")
        except (OSError, UnidentifiedImageError) as err:
            return _fail(f"--image {args.image}: cannot read it as an image ({type(err).__name__})")
        what = f"{Path(args.image).name} ({aspect})"
    tokens = token_map(image)
    pictures = crop_pictures(image.crops, image_processor.image_mean, image_processor.image_std)
    summary = selection_line(settings, image, family.tower_tokens(model.config))
    title = [summary, f"{what}, {family.name}: {path}"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    draw_token_map(pictures, tokens, title).save(out, optimize=True)
    print(f"{out}: {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
