"""Opening images the way the vision tower expects them: RGB, upright, square, then CLIP-processed."""

from __future__ import annotations

import numpy as np
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


class ImageTransform:
    """Path list -> ``FloatTensor[n, 3, H, W]`` with the model's own processor.

    ``pad``: pad to square with the mean colour, then the processor (resize + centre crop is then
    lossless). ``resize``: stretch to the processor's square input size, so nothing is cropped.
    ``crop``: the processor alone (resize the short side, centre crop), LLaVA's default, which
    its stage-1 pretraining uses.
    """

    def __init__(self, image_processor, aspect_ratio: str):
        self.processor = image_processor
        self.aspect_ratio = aspect_ratio
        self.fill = mean_colour(image_processor)
        self.size = input_size(image_processor)

    def prepare(self, img: Image.Image) -> Image.Image:
        if self.aspect_ratio == "pad":
            return pad_to_square(img, self.fill)
        if self.aspect_ratio == "crop":
            return img
        h, w = self.size
        return img.resize((w, h), Image.Resampling.BICUBIC)

    def __call__(self, paths: list[str]):
        images = [self.prepare(open_rgb(p)) for p in paths]
        return self.processor(images=images, return_tensors="pt")["pixel_values"]
