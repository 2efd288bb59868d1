"""A picture of what VisionZip keeps: the image as the tower sees it, with the dominant patches
outlined and each contextual group (its target and the patches merged into it) shaded in its own
colour. ``scripts/show_tokens.py`` is the command line.

The map comes from the model's own selection (:meth:`ModelFamily.select_image_tokens`, the
capture and :func:`~visionzip_core.algorithm.select_visionzip_tokens` its forward runs), turned
into per-patch codes by :func:`~visionzip_core.algorithm.token_groups`; nothing is re-derived here.
Drawing needs only Pillow.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw, ImageFont

from visionzip_core.algorithm import DOMINANT, DROPPED, token_groups
from visionzip_core.config import VisionZipConfig
from visionzip_core.data.images import ImageTransform
from visionzip_core.families import family_for
from visionzip_core.families.base import ImageTokenSelection

# Display size of one crop's side, at least (a 112 px tiny crop is drawn 4x; a 336 px one 1x).
MIN_CROP_PX = 448
GAP = 6  # pixels between tiles and panels
MARGIN = 10


@dataclass(frozen=True)
class TokenMap:
    """Per-crop, per-patch codes for one image (crop 0 the base image, then the tiles row by row).

    Attributes:
        patches: ``(n_crops, rows, cols)`` int64 in raster order: :data:`~visionzip_core.algorithm.DOMINANT`,
            :data:`~visionzip_core.algorithm.DROPPED`, or ``k`` for a patch in contextual token ``k``.
            A patch is one tower token: a CLIP patch, or a native-resolution family's merge unit.
        cls: ``(n_crops,)`` the CLS token's code (dominant when kept, dropped otherwise); None for a
            tower without CLS.
        targets: ``(n_crops, K)`` int64 patch index (raster order, CLS not counted) of each
            contextual token's target; ``(n_crops, 0)`` when ``K == 0``.
        grid: ``(rows, cols)`` of tiles after the base crop; ``(0, 0)`` for one crop.
    """

    patches: torch.Tensor
    cls: torch.Tensor | None
    targets: torch.Tensor
    grid: tuple[int, int]

    @property
    def n_crops(self) -> int:
        return self.patches.shape[0]


@torch.no_grad()
def select_image(model, image_processor, image_path: str, aspect_ratio: str) -> ImageTokenSelection:
    """What the VisionZip-adapted ``model`` keeps of the image in ``image_path``.

    The image is prepared as the trainer prepares it (``aspect_ratio`` as ``data.image_aspect_ratio``,
    then the model's ``image_processor``) and goes through the model's own capture and selection
    (:meth:`~visionzip_core.families.base.ModelFamily.select_image_tokens`).

    Raises:
        ValueError: ``aspect_ratio`` does not suit the processor (``anyres`` without tiles).
        OSError: the file is not a readable image.
    """
    family = family_for(model)
    layout = family.image_layout(image_processor)
    inputs = ImageTransform(image_processor, aspect_ratio, layout=layout).load([image_path])
    weight = next(model.parameters())
    pixel_values = inputs["pixel_values"].to(weight.device, weight.dtype)
    [image] = family.select_image_tokens(model, pixel_values, inputs.get("image_sizes"))
    return image


@torch.no_grad()
def select_video_group(model, processor, frames: list[str], group: int = 0) -> ImageTokenSelection:
    """What the VisionZip-adapted ``model`` keeps of frame group ``group`` of the video whose frames
    are the files ``frames`` (prepared as the trainer prepares a video; the picture is the group's
    first frame).

    Raises:
        ValueError: the family takes no video, the frames differ in size, or ``group`` is past the
            video's last frame group.
    """
    family = family_for(model)
    if not family.takes_video:
        raise ValueError(f"{family.name} takes images only")
    transform = ImageTransform(
        processor.image_processor,
        family.inference_aspect_ratio,
        processor.video_processor,
        family.image_layout(processor.image_processor, processor.video_processor),
    )
    inputs = transform.load_videos([frames])
    inputs.pop("video_sizes")  # counting only
    weight = next(model.parameters())
    inputs = {k: v.to(weight.device) for k, v in inputs.items()}
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(weight.dtype)
    [groups] = family.select_video_tokens(model, **inputs)
    if not 0 <= group < len(groups):
        raise ValueError(f"frame group {group}: the video has {len(groups)} (0..{len(groups) - 1})")
    return groups[group]


def token_map(image: ImageTokenSelection) -> TokenMap:
    """The per-patch codes of one image's selection: what :func:`draw_token_map` colours."""
    selection = image.selection
    rows, cols = image.patch_shape
    n_crops = selection.dominant.shape[0]
    offset = int(image.cls)  # token p + 1 is patch p behind a CLS token
    groups = token_groups(selection, rows * cols + offset).cpu()
    targets = selection.target_tokens()
    targets = torch.zeros(n_crops, 0, dtype=torch.long) if targets is None else targets.cpu() - offset
    return TokenMap(
        patches=groups[:, offset:].reshape(n_crops, rows, cols),
        cls=groups[:, 0] if image.cls else None,
        targets=targets,
        grid=image.grid,
    )


def group_colour(k: int) -> tuple[int, int, int]:
    """A distinct colour for contextual group ``k`` (golden-ratio hue steps)."""
    r, g, b = colorsys.hsv_to_rgb((0.08 + k * 0.618034) % 1.0, 0.8, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def crop_pictures(crops: torch.Tensor, image_mean, image_std) -> list[Image.Image]:
    """``(n, 3, H, W)`` normalised pixel values back to RGB pictures: exactly what the tower saw."""
    mean = torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1)
    pixels = (crops.detach().float().cpu() * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).numpy(), "RGB") for p in pixels]


def budget_line(vz: VisionZipConfig, tower_tokens: int, n_crops: int) -> str:
    """E.g. ``12 dominant (CLS + 11 patches) + 4 contextual = 16 of 64+1``, per crop when tiled."""
    patches = tower_tokens - 1
    kept = f"CLS + {vz.dominant - 1} patches" if vz.keep_cls else f"{vz.dominant} patches, CLS dropped"
    line = (
        f"{vz.dominant} dominant ({kept}) + {vz.contextual} contextual = {vz.tokens_per_image} of {patches}+1"
    )
    if n_crops > 1:
        line = f"per crop: {line}; {n_crops} crops = {n_crops * vz.tokens_per_image} tokens"
    return line


def selection_line(
    vz: VisionZipConfig, image: ImageTokenSelection, tower_tokens: int, unit: str = "patches"
) -> str:
    """The budget of the drawn selection: :func:`budget_line` for a CLS tower, else e.g.
    ``9 dominant + 1 contextual = 10 of 24 merged tokens (4 x 6, rows x cols)``, ``unit`` the
    family's name for what it selects from (``ModelFamily.selected_tokens``), per crop when tiled."""
    crops = image.selection.dominant.shape[0]
    if image.cls:
        return budget_line(vz, tower_tokens, crops)
    rows, cols = image.patch_shape
    dominant = image.selection.dominant.shape[1]
    targets = image.selection.target_tokens()
    contextual = 0 if targets is None else targets.shape[1]
    kept = dominant + contextual
    line = f"{dominant} dominant + {contextual} contextual = {kept} of {rows * cols} {unit} ({rows} x {cols}, rows x cols)"
    if crops > 1:
        line = f"per crop: {line}; {crops} crops = {crops * kept} tokens"
    if vz.uses_ratios:
        line += f", ratios {vz.dominant_ratio:g} + {vz.contextual_ratio:g}"
    return line


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _draw_crop(picture: Image.Image, patches: torch.Tensor, targets: torch.Tensor, scale: int) -> Image.Image:
    rows, cols = patches.shape
    big = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    cell_w, cell_h = big.width / cols, big.height / rows
    shade = Image.new("RGBA", big.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(shade)

    def box(p: int, inset: float = 0.0):
        y, x = divmod(p, cols)
        return (
            x * cell_w + inset,
            y * cell_h + inset,
            (x + 1) * cell_w - 1 - inset,
            (y + 1) * cell_h - 1 - inset,
        )

    codes = patches.flatten().tolist()
    for p, code in enumerate(codes):
        if code >= 0:
            draw.rectangle(box(p), fill=(*group_colour(code), 130))
        elif code == DROPPED:
            draw.rectangle(box(p), fill=(0, 0, 0, 170))
    out = Image.alpha_composite(big.convert("RGBA"), shade)
    draw = ImageDraw.Draw(out)
    width = max(2, round(min(cell_w, cell_h) / 14))
    for p, code in enumerate(codes):
        if code == DOMINANT:  # white outside, black inside: visible on any background
            draw.rectangle(box(p), outline=(255, 255, 255, 255), width=width)
            draw.rectangle(box(p, width), outline=(0, 0, 0, 255), width=1)
    radius = max(3, min(cell_w, cell_h) / 4)
    for k, p in enumerate(targets.tolist()):
        y, x = divmod(p, cols)
        cx, cy = (x + 0.5) * cell_w, (y + 0.5) * cell_h
        draw.ellipse(
            (cx - radius, cy - radius, cx + radius, cy + radius),
            fill=(*group_colour(k), 255),
            outline=(0, 0, 0, 255),
            width=1,
        )
    return out.convert("RGB")


def draw_token_map(
    pictures: list[Image.Image], tokens: TokenMap, title: list[str], scale: int | None = None
) -> Image.Image:
    """The overlay: crops side by side (base crop, then the tile grid), a title above, a legend below.

    Args:
        pictures: one RGB picture per crop (:func:`crop_pictures`).
        tokens: the map (:func:`token_map`).
        title: lines printed above the picture.
        scale: integer zoom of every crop; by default enough for :data:`MIN_CROP_PX`.
    """
    if len(pictures) != tokens.n_crops:
        raise ValueError(f"{len(pictures)} pictures for {tokens.n_crops} crops")
    crop_px = pictures[0].width
    scale = scale or max(1, -(-MIN_CROP_PX // crop_px))
    drawn = [_draw_crop(pic, tokens.patches[i], tokens.targets[i], scale) for i, pic in enumerate(pictures)]
    font, small = _font(15), _font(13)
    line_h = 20

    panels: list[tuple[str, Image.Image]] = [("base image" if len(drawn) > 1 else "", drawn[0])]
    rows, cols = tokens.grid
    if rows * cols:
        w, h = drawn[1].size
        grid = Image.new("RGB", (cols * w + (cols - 1) * GAP, rows * h + (rows - 1) * GAP), "white")
        for i, tile in enumerate(drawn[1:]):
            r, c = divmod(i, cols)
            grid.paste(tile, (c * (w + GAP), r * (h + GAP)))
        panels.append((f"tiles ({rows} x {cols})", grid))

    legend = _legend_items(tokens)
    body_w = sum(p.width for _, p in panels) + GAP * 2 * (len(panels) - 1)
    text_w = max((_text_width(font, line) for line in title), default=0)
    width = max(body_w, text_w, 360) + 2 * MARGIN
    legend_rows = _wrap(legend, small, width - 2 * MARGIN)
    label_h = line_h if len(panels) > 1 else 0
    height = (
        MARGIN
        + line_h * len(title)
        + label_h
        + max(p.height for _, p in panels)
        + GAP
        + line_h * len(legend_rows)
        + MARGIN
    )
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = MARGIN
    for line in title:
        draw.text((MARGIN, y), line, fill="black", font=font)
        y += line_h
    x = MARGIN
    for label, panel in panels:
        if label:
            draw.text((x, y), label, fill="black", font=small)
        canvas.paste(panel, (x, y + label_h))
        x += panel.width + 2 * GAP
    y += label_h + max(p.height for _, p in panels) + GAP
    for row in legend_rows:
        x = MARGIN
        for kind, colour, text in row:
            _swatch(draw, x, y + 2, kind, colour)
            draw.text((x + 20, y), text, fill="black", font=small)
            x += 20 + _text_width(small, text) + 14
        y += line_h
    return canvas


def _legend_items(tokens: TokenMap) -> list[tuple[str, tuple[int, int, int], str]]:
    """``(swatch kind, colour, text)`` for the legend: dominant, dropped, then one per group."""
    patches = tokens.patches
    items = [("outline", (0, 0, 0), f"dominant patch ({int((patches == DOMINANT).sum())})")]
    if (patches == DROPPED).any():
        items.append(("fill", (60, 60, 60), f"dropped ({int((patches == DROPPED).sum())})"))
    contextual = tokens.targets.shape[1]
    per_crop = tokens.n_crops > 1
    for k in range(contextual):
        size = int((patches == k).sum())
        what = f"contextual {k + 1}" + (" (each crop)" if per_crop else "")
        items.append(("fill", group_colour(k), f"{what}: {size} patch{'es' if size != 1 else ''}"))
    if contextual:
        items.append(("dot", (255, 255, 255), "merge target"))
    return items


def _swatch(draw: ImageDraw.ImageDraw, x: int, y: int, kind: str, colour) -> None:
    if kind == "outline":
        draw.rectangle((x, y, x + 14, y + 14), outline=(0, 0, 0), width=2)
    elif kind == "dot":
        draw.ellipse((x + 2, y + 2, x + 12, y + 12), fill=colour, outline=(0, 0, 0))
    else:
        draw.rectangle((x, y, x + 14, y + 14), fill=colour, outline=(0, 0, 0))


def _text_width(font, text: str) -> int:
    left, _, right, _ = font.getbbox(text)
    return int(right - left)


def _wrap(items, font, width: int) -> list[list]:
    rows, row, used = [], [], 0
    for item in items:
        need = 20 + _text_width(font, item[2]) + 14
        if row and used + need > width:
            rows.append(row)
            row, used = [], 0
        row.append(item)
        used += need
    if row:
        rows.append(row)
    return rows
