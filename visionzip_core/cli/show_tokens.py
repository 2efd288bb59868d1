"""Draw which patches VisionZip keeps for one image: dominant patches outlined, each contextual
group (its target and the patches merged into it) shaded in its own colour.

    visionzip-show-tokens --model outputs/demo/final --image data/demo/images/val_0000.png \\
        --out tokens.png --aspect-ratio pad          # a trained export: its recorded split
    visionzip-show-tokens --model /models/llava-1.5-7b-hf --image cat.jpg --out cat.png \\
        --dominant 54 --contextual 10                # a stock llava-hf folder
    visionzip-show-tokens --model /models/Qwen2.5-VL-7B-Instruct --image cat.jpg --out cat.png \\
        --dominant-ratio 0.45 --contextual-ratio 0.05   # per-image fractions (Qwen2-VL, Qwen2.5-VL)
    visionzip-show-tokens --model QWEN --video f0.png,f1.png,f2.png,f3.png --out video.png

``python scripts/show_tokens.py`` takes the same arguments. The picture is the image as the vision
tower sees it (the model's own image processor, after the ``--aspect-ratio`` step the trainer
applies: ``pad`` as ``data.image_aspect_ratio: pad`` trains; the default is the family's inference
setting, the processor alone as scripts/generate.py feeds it: ``crop`` for LLaVA-1.5, ``anyres`` for
LLaVA-NeXT, ``native`` for Qwen). The selection is the model's own: the same capture and selection
its forward runs. LLaVA-NeXT images are drawn per crop, the base image beside the tile grid; Qwen
images as merge units (2x2 patches) on the resized picture, and a ``--video`` as one frame group
(``--frame-group``, its first frame drawn; for LLaVA-OneVision a group is one frame, drawn as its
2x2-pooled tokens). A checkpoint that records VisionZip settings keeps them
for any budget flag left out; any other checkpoint takes the family's default (54 + 10 for LLaVA,
ratios 0.45 + 0.05 for Qwen).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from visionzip_core.adapt import visionzip
from visionzip_core.cli.inputs import check_images, video_frames
from visionzip_core.cli.open_model import CommandError, add_model_flags, budget_flags, fail, open_model_folder
from visionzip_core.config import add_budget_flags
from visionzip_core.data.images import ImageTransform
from visionzip_core.token_overlay import (
    crop_pictures,
    draw_token_map,
    select_image,
    select_video_group,
    selection_line,
    token_map,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_flags(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="image file")
    source.add_argument(
        "--video",
        help="a video as comma-separated frame files, all of one size (families that take video: "
        "the Qwen families, llava-onevision)",
    )
    parser.add_argument("--frame-group", type=int, default=0, help="with --video: the frame group drawn")
    parser.add_argument("--out", required=True, help="PNG to write")
    add_budget_flags(parser)
    parser.add_argument(
        "--aspect-ratio",
        choices=["crop", "pad", "resize", "anyres", "native"],
        default=None,
        help="how the image reaches the processor, as data.image_aspect_ratio (default: the family's: "
        "crop for llava-1.5, anyres for llava-next, native for qwen)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return show_tokens(args)
    except CommandError as err:
        return fail(err)


def show_tokens(args: argparse.Namespace) -> int:
    # Cheap checks before any weights load.
    if args.image is not None:
        check_images([args.image])
    frames = video_frames([args.video])[0] if args.video is not None else []
    folder = open_model_folder(args.model)
    folder.refuse_video(bool(frames))
    settings = folder.budget(budget_flags(args), doing="drawing")
    processor = folder.processor()
    image_processor = processor.image_processor
    aspect = args.aspect_ratio or folder.family.inference_aspect_ratio
    try:
        ImageTransform(image_processor, aspect, layout=folder.family.image_layout(image_processor))
    except ValueError as err:
        raise CommandError(f"--aspect-ratio {aspect}: {err}") from None

    model = folder.load(args.dtype, args.device)
    try:
        visionzip(model, config=settings)
    except ValueError as err:
        raise CommandError(str(err)) from None
    if frames:
        try:
            image = select_video_group(model, processor, frames, args.frame_group)
        except ValueError as err:
            raise CommandError(f"--video {args.video}: {err}") from None
        what = f"{Path(frames[0]).name}.. ({len(frames)} frames), frame group {args.frame_group}"
    else:
        try:
            image = select_image(model, image_processor, args.image, aspect)
        except ValueError as err:
            raise CommandError(f"--image {args.image} ({aspect}): {err}") from None
        what = f"{Path(args.image).name} ({aspect})"
    tokens = token_map(image)
    pictures = crop_pictures(image.crops, image_processor.image_mean, image_processor.image_std)
    family = folder.family
    unit = (family.selected_video_tokens or family.selected_tokens) if frames else family.selected_tokens
    summary = selection_line(settings, image, family.tower_tokens(model.config), unit)
    title = [summary, f"{what}, {folder.family.name}: {folder.path}"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    draw_token_map(pictures, tokens, title).save(out, optimize=True)
    print(f"{out}: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
