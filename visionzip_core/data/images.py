"""Opening images the way the vision tower expects them: RGB, upright, square (or tiled), then
processed by the model's own image processor."""

from __future__ import annotations

from collections.abc import Callable
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


@dataclass(frozen=True)
class ImageLayout:
    """How a model's processor lays out an image, as its family tells it
    (:meth:`~visionzip_core.families.base.ModelFamily.image_layout`).

    ``tiles``: each image becomes a base crop and a grid of tiles. ``native``: the processor keeps
    each image's aspect ratio and resizes it itself, ``(H, W) -> (H, W)`` (picklable), giving patch
    rows and a ``grid_thw`` instead of ``(3, H, W)`` crops. ``video``: the resize of video frames
    (None: the model takes no video). ``video_temporal_patch``: frames per temporal patch, the multiple
    a video's frame count is padded to (Qwen's video processors: 2; a model that reads every frame on
    its own: 1). ``several_one_crop``: an image that shares its sample with other images is one
    padded-to-square crop, not tiled (LLaVA-OneVision's processor): a sample's images go through the
    processor together, and the sample tells the model how many it holds (``batch_num_images``).
    The default: one crop of a fixed input size per image.
    """

    tiles: bool = False
    native: Callable[[tuple[int, int]], tuple[int, int]] | None = None
    video: Callable[[tuple[int, int]], tuple[int, int]] | None = None
    video_temporal_patch: int = 2
    several_one_crop: bool = False


def tiles(image_processor) -> bool:
    """Whether the processor cuts an image into a grid of crops (an ``image_grid_pinpoints`` list)."""
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
    #: a native-resolution processor's resize (the size the count needs is the resized one)
    native: Callable[[tuple[int, int]], tuple[int, int]] | None = None
    #: the video processor's resize, for video frames (never padded)
    video: Callable[[tuple[int, int]], tuple[int, int]] | None = None
    #: frames per temporal patch (:attr:`ImageLayout.video_temporal_patch`)
    video_temporal_patch: int = 2

    def __call__(self, size: tuple[int, int]) -> tuple[int, int]:
        if self.aspect_ratio == "pad":
            size = max(size), max(size)
        elif self.aspect_ratio == "resize":
            return self.input_size
        return self.native(size) if self.native is not None else tuple(size)

    def video_size(self, n_frames: int, frame_size: tuple[int, int]) -> tuple[int, int, int]:
        """``(T, H, W)`` of a video of ``n_frames`` frames of ``frame_size``: frames padded to a
        multiple of the temporal patch, the frame size as the video processor resizes it."""
        if self.video is None:
            raise ValueError("data: this model's processor takes no video")
        step = self.video_temporal_patch
        t = -(-n_frames // step) * step
        return (t, *self.video(frame_size))


class ImageTransform:
    """Path list -> ``FloatTensor[crops, 3, H, W]`` with the model's own processor.

    ``pad``: pad to square with the mean colour, then the processor (resize + centre crop is then
    lossless). ``resize``: stretch to the processor's square input size, so nothing is cropped.
    ``crop``: the processor alone (resize the short side, centre crop), LLaVA's default, which
    its stage-1 pretraining uses. ``anyres``: the image as it is, for a tiling processor.

    A tiling processor gives each image its base crop and tiles: the crops of all
    images are concatenated and ``image_sizes`` holds each image's ``(H, W)`` as the processor
    saw it, from which the model counts its crops.

    A native-resolution processor takes ``native`` (the image as it is) or ``pad``;
    it gives patch rows, ``pixel_values: [sum of patches, C * 2 * 14 * 14]`` and
    ``image_grid_thw: [n, 3]``, and ``image_sizes`` is each image's resized ``(H, W)``
    (``grid * patch_size``). Videos (lists of frame files) go through ``video_processor``.
    """

    def __init__(
        self, image_processor, aspect_ratio: str, video_processor=None, layout: ImageLayout | None = None
    ):
        layout = layout or ImageLayout()
        self.processor = image_processor
        self.video_processor = video_processor
        self.aspect_ratio = aspect_ratio
        self.tiles = layout.tiles
        self.native = layout.native
        self.video = layout.video
        self.video_temporal_patch = layout.video_temporal_patch
        self.several_one_crop = layout.several_one_crop
        name = type(image_processor).__name__
        if self.native is not None and aspect_ratio not in ("native", "pad"):
            raise ValueError(
                f"data.image_aspect_ratio: {aspect_ratio!r} does not apply to {name}, which keeps each "
                "image's aspect ratio; use native or pad"
            )
        if self.native is None and aspect_ratio == "native":
            raise ValueError(
                "data.image_aspect_ratio: 'native' needs a native-resolution image processor; "
                f"{name} has a fixed input size: use pad, resize or crop"
            )
        if aspect_ratio == "anyres" and not self.tiles:
            raise ValueError(
                f"data.image_aspect_ratio: 'anyres' needs a tiling image processor; {name} makes one crop "
                "per image: use pad, resize or crop"
            )
        self.fill = mean_colour(image_processor)
        # A native-resolution processor has no fixed input size: every image keeps its own.
        self.size = (0, 0) if self.native is not None else input_size(image_processor)

    def prepare(self, img: Image.Image) -> Image.Image:
        if self.aspect_ratio == "pad":
            return pad_to_square(img, self.fill)
        if self.aspect_ratio in ("crop", "anyres", "native"):
            return img
        h, w = self.size
        return img.resize((w, h), Image.Resampling.BICUBIC)

    @property
    def size_rule(self) -> SizeRule:
        """What :meth:`prepare` does to an image's size."""
        return SizeRule(self.aspect_ratio, self.size, self.native, self.video, self.video_temporal_patch)

    def __call__(self, paths: list[str]) -> torch.Tensor:
        """``FloatTensor[crops, 3, H, W]``: every image's crops, in order."""
        return self.load(paths)["pixel_values"]

    def load(self, paths: list[str]) -> dict[str, torch.Tensor]:
        """``{"pixel_values": [crops, 3, H, W], "image_sizes"?: [n, 2]}`` (sizes for a tiling processor)
        for the images of one sample; with ``several_one_crop`` also ``"batch_num_images": [1]``, their
        number."""
        images = [self.prepare(open_rgb(p)) for p in paths]
        if self.several_one_crop:  # the processor decides per sample: tiled alone, one crop each else
            out = self.processor(images=[images], return_tensors="pt")
            pixels = out["pixel_values"]  # (images, crops padded to the most, 3, H, W)
            return {
                "pixel_values": pixels[0] if len(images) == 1 else pixels[:, 0],
                "image_sizes": torch.as_tensor(out["image_sizes"]).long(),
                "batch_num_images": torch.tensor([len(images)]),
            }
        if self.native is not None:
            out = self.processor(images=images, return_tensors="pt")
            grid = out["image_grid_thw"].long()
            patch = int(self.processor.patch_size)
            return {
                "pixel_values": out["pixel_values"],
                "image_grid_thw": grid,
                "image_sizes": grid[:, 1:] * patch,  # the resized (H, W): what the count needs
            }
        if not self.tiles:
            return {"pixel_values": self.processor(images=images, return_tensors="pt")["pixel_values"]}
        # One image at a time: a batch is padded to its largest crop count.
        crops, sizes = [], []
        for img in images:
            out = self.processor(images=[img], return_tensors="pt")
            crops.append(out["pixel_values"][0])
            sizes.append(torch.as_tensor(out["image_sizes"][0]))
        return {"pixel_values": torch.cat(crops, dim=0), "image_sizes": torch.stack(sizes).long()}

    def load_videos(self, videos: list[list[str]]) -> dict[str, torch.Tensor]:
        """``{"pixel_values_videos": [sum of patches, C*2*14*14], "video_grid_thw": [n, 3],
        "second_per_grid_ts": [n], "video_sizes": [n, 3]}`` for videos given as frame-path lists,
        from a patch-row video processor (Qwen's, which gives ``video_grid_thw``); from a frame video
        processor (``pixel_values_videos: [n, T, C, H, W]``, LLaVA-OneVision's):
        ``{"pixel_values_videos": [sum of frames, C, H, W], "video_frames": [n], "video_sizes": [n, 3]}``,
        every video's frames back to back, so that videos of different lengths share a batch.

        ``video_sizes`` is each video's ``(T, H, W)``: frames padded to the temporal patch, the
        resized frame size (what the count needs). Frames are taken as given (no sampling);
        ``second_per_grid_ts`` is ``temporal_patch_size / fps`` with the processor's fps (Qwen's
        2 frames per second when the frames carry no rate), as ``Qwen2_5_VLProcessor`` computes it.
        """
        if self.video_processor is None:
            raise ValueError("data: a video, but this model's processor takes no video")
        frames = []
        for paths in videos:
            opened = [open_rgb(p) for p in paths]
            if len({im.size for im in opened}) > 1:
                raise ValueError(
                    f"the frames of a video differ in size ({sorted({im.size for im in opened})})"
                )
            frames.append(opened)
        if self.video_temporal_patch == 1:  # a frame processor: one video at a time (lengths differ)
            pixels = [
                self.video_processor(videos=[v], return_tensors="pt")["pixel_values_videos"][0]
                for v in frames
            ]
            return {
                "pixel_values_videos": torch.cat(pixels, dim=0),
                "video_frames": torch.tensor([len(p) for p in pixels], dtype=torch.long),
                "video_sizes": torch.tensor([list(p.shape[:1]) + list(p.shape[-2:]) for p in pixels]).long(),
            }
        out = self.video_processor(videos=frames, return_tensors="pt", return_metadata=True)
        grid = out["video_grid_thw"].long()
        temporal = int(self.video_processor.temporal_patch_size)
        metadata = out.get("video_metadata") or [None] * len(videos)
        fps = [float(getattr(m, "sampled_fps", None) or getattr(m, "fps", None) or 2.0) for m in metadata]
        patch = int(self.video_processor.patch_size)
        sizes = torch.cat([grid[:, :1] * temporal, grid[:, 1:] * patch], dim=1)
        return {
            "pixel_values_videos": out["pixel_values_videos"],
            "video_grid_thw": grid,
            "second_per_grid_ts": torch.tensor([temporal / f for f in fps], dtype=torch.float32),
            "video_sizes": sizes,
        }
