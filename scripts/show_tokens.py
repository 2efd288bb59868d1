"""Draw which patches VisionZip keeps for one image: dominant patches outlined, each contextual
group (its target and the patches merged into it) shaded in its own colour.

    python scripts/show_tokens.py --model outputs/demo/final --image data/demo/images/val_0000.png \\
        --out tokens.png --aspect-ratio pad          # a trained export: its recorded split
    python scripts/show_tokens.py --model /models/llava-1.5-7b-hf --image cat.jpg --out cat.png \\
        --dominant 54 --contextual 10                # a stock llava-hf folder

The picture is the image as the vision tower sees it (the model's own image processor, after the
``--aspect-ratio`` step the trainer applies: ``pad`` as ``data.image_aspect_ratio: pad`` trains,
``crop`` the processor alone as scripts/generate.py feeds it). The selection is the model's own:
the same capture and selection its forward runs. LLaVA-NeXT images are drawn per crop, the base
image beside the tile grid. A checkpoint that records VisionZip settings keeps them for any of
``--dominant/--contextual`` left out; any other checkpoint defaults to 54 + 10.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="llava-hf folder (e.g. a run's final/) or builtin:*")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument(
        "--dominant", type=int, default=None, help="tokens kept by CLS attention, CLS included"
    )
    parser.add_argument("--contextual", type=int, default=None, help="merged tokens built from the rest")
    parser.add_argument(
        "--aspect-ratio",
        choices=["crop", "pad", "resize", "anyres"],
        default=None,
        help="how the image reaches the processor, as data.image_aspect_ratio "
        "(default: crop, or anyres for a tiling model)",
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = parse_args(argv)
    if not Path(args.image).is_file():
        return _fail(f"--image not found: {args.image}")

    import torch
    from PIL import Image, UnidentifiedImageError
    from transformers import AutoConfig

    from visionzip_core import VisionZipConfig, read_visionzip_config, visionzip
    from visionzip_core.data.images import ImageTransform, tiles
    from visionzip_core.families import family_for
    from visionzip_core.model_folders import check_model_folder
    from visionzip_core.model_names import resolve_model_path
    from visionzip_core.token_overlay import (
        budget_line,
        crop_pictures,
        draw_token_map,
        select_image,
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

    # A flag left out keeps the checkpoint's recorded value, else the paper's 54 + 10.
    recorded = read_visionzip_config(config)
    base = recorded.model_dump() if recorded is not None else {"dominant": 54, "contextual": 10}
    chosen = {"dominant": args.dominant, "contextual": args.contextual}
    try:
        settings = VisionZipConfig(**(base | {k: v for k, v in chosen.items() if v is not None}))
    except ValueError as err:
        return _fail(" ".join(str(err).split()))

    processor = family.load_processor(path)
    image_processor = processor.image_processor
    aspect = args.aspect_ratio or ("anyres" if tiles(image_processor) else "crop")
    # Cheap checks before any weights load.
    try:
        ImageTransform(image_processor, aspect)
    except ValueError as err:
        return _fail(f"--aspect-ratio {aspect}: {' '.join(str(err).split())}")
    try:
        with Image.open(args.image) as img:
            img.verify()
    except (OSError, UnidentifiedImageError) as err:
        return _fail(f"--image {args.image}: cannot read it as an image ({type(err).__name__})")
    dtype = getattr(torch, args.dtype)
    try:
        model = family.load(path, dtype=dtype).to(args.device).eval()
        visionzip(model, config=settings)
    except (WeightsError, ValueError) as err:
        return _fail(" ".join(str(err).split()))
    try:
        image = select_image(model, image_processor, args.image, aspect)
    except ValueError as err:
        return _fail(f"--aspect-ratio {aspect}: {' '.join(str(err).split())}")
    except (OSError, UnidentifiedImageError) as err:
        return _fail(f"--image {args.image}: cannot read it as an image ({type(err).__name__})")
    tokens = token_map(image)
    pictures = crop_pictures(image.crops, image_processor.image_mean, image_processor.image_std)
    summary = budget_line(settings, family.tower_tokens(model.config), tokens.n_crops)
    title = [summary, f"{Path(args.image).name} ({aspect}), {family.name}: {path}"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    draw_token_map(pictures, tokens, title).save(out, optimize=True)
    print(f"{out}: {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
