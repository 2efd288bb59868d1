"""Opening images the way the vision tower expects them: RGB, upright, square (or tiled), then
processed by the model's own image processor."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps


def open_rgb(path: str) -> Image.Image:
    """Decode ``path`` fully into an upright RGB image.

    EXIF orientation is applied. Transparent images (RGBA, LA, palette with transparency) are
    composited onto white, since their hidden RGB values are often garbage; 16-bit and float
    grayscale is rescaled to 8 bits rather than clipped to white; CMYK goes through PIL's conversion.
    """
    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.astype(np.uint8), mode="L").convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def tiles(image_processor) -> bool:
    """Whether the processor cuts an image into a grid of crops (LLaVA-NeXT's anyres)."""
    return bool(getattr(image_processor, "image_grid_pinpoints", None))


def mean_colour(image_processor) -> tuple[int, int, int]:
    """The processor's normalisation mean as 0-255 RGB: padding this colour normalises to zero."""
    mean = getattr(image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
    return tuple(int(round(m * 255)) for m in mean)


def input_size(image_processor) -> tuple[int, int]:
    """(height, width) of the tower's input, from the processor's crop size (or size)."""
    for attr in ("crop_size", "size"):
        size = getattr(image_processor, attr, None)
        if size is None:
            continue
        get = size.get if isinstance(size, dict) else (lambda k, s=size: getattr(s, k, None))
        h, w = get("height"), get("width")
        if h and w:
            return int(h), int(w)
        edge = get("shortest_edge")
        if edge:
            return int(edge), int(edge)
    raise ValueError("image processor has no crop_size/size to take the input size from")


def pad_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Centre ``img`` on a square canvas of its longer side, filled with ``fill``."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


@dataclass(frozen=True)
class SizeRule:
    """An upright image's ``(H, W)`` -> what the processor sees (what :meth:`ImageTransform.prepare` does to it);
    picklable, for the preflight's worker processes."""

    aspect_ratio: str
    input_size: tuple[int, int]

    def __call__(self, size: tuple[int, int]) -> tuple[int, int]:
        if self.aspect_ratio == "pad":
            return max(size), max(size)
        if self.aspect_ratio == "resize":
            return self.input_size
        return tuple(size)


class ImageTransform:
    """Path list -> ``FloatTensor[crops, 3, H, W]`` with the model's own processor.

    ``pad``: pad to square with the mean colour, then the processor (resize + centre crop is then
    lossless). ``resize``: stretch to the processor's square input size, so nothing is cropped.
    ``crop``: the processor alone (resize the short side, centre crop), LLaVA's default, which
    its stage-1 pretraining uses. ``anyres``: the image as it is, for a tiling processor.

    A tiling processor (LLaVA-NeXT) gives each image its base crop and tiles: the crops of all
    images are concatenated and ``image_sizes`` holds each image's ``(H, W)`` as the processor
    saw it, from which the model counts its crops.
    """

    def __init__(self, image_processor, aspect_ratio: str):
        self.processor = image_processor
        self.aspect_ratio = aspect_ratio
        self.tiles = tiles(image_processor)
        if aspect_ratio == "anyres" and not self.tiles:
            raise ValueError(
                "data.image_aspect_ratio: 'anyres' needs a tiling image processor (LLaVA-NeXT's); "
                f"{type(image_processor).__name__} makes one crop per image: use pad, resize or crop"
            )
        self.fill = mean_colour(image_processor)
        self.size = input_size(image_processor)

    def prepare(self, img: Image.Image) -> Image.Image:
        if self.aspect_ratio == "pad":
            return pad_to_square(img, self.fill)
        if self.aspect_ratio in ("crop", "anyres"):
            return img
        h, w = self.size
        return img.resize((w, h), Image.Resampling.BICUBIC)

    @property
    def size_rule(self) -> SizeRule:
        """What :meth:`prepare` does to an image's size."""
        return SizeRule(self.aspect_ratio, self.size)

    def __call__(self, paths: list[str]) -> torch.Tensor:
        """``FloatTensor[crops, 3, H, W]``: every image's crops, in order."""
        return self.load(paths)["pixel_values"]

    def load(self, paths: list[str]) -> dict[str, torch.Tensor]:
        """``{"pixel_values": [crops, 3, H, W], "image_sizes"?: [n, 2]}`` (sizes for a tiling processor)."""
        images = [self.prepare(open_rgb(p)) for p in paths]
        if not self.tiles:
            return {"pixel_values": self.processor(images=images, return_tensors="pt")["pixel_values"]}
        # One image at a time: a batch is padded to its largest crop count.
        crops, sizes = [], []
        for img in images:
            out = self.processor(images=[img], return_tensors="pt")
            crops.append(out["pixel_values"][0])
            sizes.append(torch.as_tensor(out["image_sizes"][0]))
        return {"pixel_values": torch.cat(crops, dim=0), "image_sizes": torch.stack(sizes).long()}
