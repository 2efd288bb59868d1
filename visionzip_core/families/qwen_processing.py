"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL (and Qwen3.5) processors built without torchvision.

Why: transformers' ``Qwen2_5_VLProcessor`` wants a video processor, and the only one transformers
ships for Qwen (``Qwen2VLVideoProcessor``) imports torchvision at module import, as does the default
("fast") ``Qwen2VLImageProcessor``. The torchvision wheels available here are CUDA builds whose
``_C.so`` needs ``libtorch_cuda.so``; under the pinned CPU torch, ``import torchvision`` fails
(``operator torchvision::nms does not exist``). So:

- images go through transformers' own PIL/numpy backend, ``Qwen2VLImageProcessorPil``
  (``image_processing_pil_qwen2_vl.py`` imports numpy and PIL only);
- videos go through :class:`FrameVideoProcessor`, written here: the same math as
  ``Qwen2VLVideoProcessor`` (smart_resize, rescale, normalize, pad the frame count to a multiple of
  ``temporal_patch_size`` by repeating the last frame, patchify in the same element order), done per
  frame with the PIL backend's resize/rescale/normalize, so that a still image given as a video
  gives exactly the image processor's ``pixel_values``. (The torchvision processor resizes with
  torchvision's bicubic kernel, so its floats differ slightly from any PIL path; the layout and the
  grid are the same.)
- :func:`load_qwen_processor` builds the processor from its parts, so no ``AutoVideoProcessor``
  lookup (which would pick the torchvision class) ever happens.

``ProcessorMixin.__init__`` (transformers 5.23, ``check_argument_for_proper_class``) checks
``isinstance(video_processor, VideoProcessorMixin)``. ``VideoProcessorMixin`` lives in
``video_processing_utils``, which imports torchvision only when it is importable, and neither the
mixin nor its ``__init__`` touches it (``BaseVideoProcessor`` is the torchvision backend and is
``@requires(torchvision)``), so :class:`FrameVideoProcessor` subclasses the mixin plus ``PilBackend``.
But the check looks the name "VideoProcessorMixin" up on the top-level ``transformers`` module, which
exports it only when torchvision is installed, then falls back to ``VIDEO_PROCESSOR_MAPPING``, a
torchvision dummy here (``AttributeError: ... has no attribute '_extra_content'``): without
torchvision no video processor at all passes. So the processors here are thin subclasses with the
library's class names (saved folders name the library classes, and ``AutoProcessor`` reads them where
torchvision exists) whose only change is to check the video processor against the real
``VideoProcessorMixin`` class; every other attribute goes through the library's check.

Frames are used as given: :class:`FrameVideoProcessor` never samples (``do_sample_frames`` is
ignored); pass the frames you want, as a pre-sampled list. ``fps`` (or ``video_metadata``) only
sets ``second_per_grid_ts`` (``temporal_patch_size / fps``); it defaults to 2.0, Qwen's sampling
rate, when unknown.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import transformers as _hf
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import (
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PILImageResampling,
    SizeDict,
    load_image,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize
from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as qwen3_smart_resize
from transformers.processing_utils import VideosKwargs
from transformers.video_processing_utils import VideoProcessorMixin
from transformers.video_utils import VideoMetadata

DEFAULT_FPS = 2.0  # Qwen2-VL's own sampling rate (qwen-vl-utils FPS); used when a video's rate is unknown

# Keys of saved processor configs that name classes rather than settings.
_TYPE_KEYS = (
    "image_processor_type",
    "video_processor_type",
    "processor_class",
    "auto_map",
    "_processor_class",
)


class QwenProcessorFilesError(ValueError):
    """A processor folder lacks a file it needs; the message is one line naming the folder and file."""


class FrameVideoKwargs(VideosKwargs, total=False):
    """Qwen2-VL's video settings (the same names as ``Qwen2VLVideoProcessor``'s)."""

    min_pixels: int
    max_pixels: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int


class FrameVideoProcessor(VideoProcessorMixin, PilBackend):
    """Qwen2-VL video preprocessing on PIL/numpy for videos given as lists of frames.

    A video is a list of frames (PIL images, ``(H, W, C)``/``(C, H, W)`` numpy arrays or image file
    paths) or a ``(T, H, W, C)`` array; a batch is a list of videos. All frames of one video must
    have one size. Output, for videos of ``T_i`` frames resized to ``(H_i, W_i)``:

    - ``pixel_values_videos``: ``(sum_i t_i * h_i * w_i, C * temporal_patch_size * patch_size**2)``
      with ``t_i = ceil(T_i / temporal_patch_size)``, ``h_i = H_i / patch_size``, ``w_i = W_i / patch_size``;
    - ``video_grid_thw``: ``(num_videos, 3)`` int64, rows ``(t_i, h_i, w_i)``;
    - ``video_metadata`` (with ``return_metadata``): one ``VideoMetadata`` per video whose
      ``sampled_fps`` is the given fps (default 2.0).
    """

    resample = PILImageResampling.BICUBIC
    size = {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768}  # Qwen2VLVideoProcessor's
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    patch_size = 14
    temporal_patch_size = 2
    merge_size = 2
    do_sample_frames = False
    valid_kwargs = FrameVideoKwargs
    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __init__(self, **kwargs):
        # As Qwen2VLVideoProcessor: min_pixels/max_pixels (the 4.x config keys) become the size bounds.
        size = kwargs.pop("size", None)
        size = dict(self.size) if size is None else dict(size)
        if (min_pixels := kwargs.pop("min_pixels", None)) is not None:
            size["shortest_edge"] = min_pixels
        if (max_pixels := kwargs.pop("max_pixels", None)) is not None:
            size["longest_edge"] = max_pixels
        size.pop("min_pixels", None)
        size.pop("max_pixels", None)
        super().__init__(size=size, **kwargs)

    # -- inputs -------------------------------------------------------------------------------------

    @staticmethod
    def _is_frame(item) -> bool:
        import PIL.Image

        return isinstance(item, (str, os.PathLike, PIL.Image.Image)) or (
            isinstance(item, np.ndarray) and item.ndim in (2, 3)
        )

    def _split_videos(self, videos) -> list[list]:
        """Any accepted nesting -> a list of videos, each a list of frames (paths still unopened).

        A flat list of frames is one video; a 4-D array is one video; nested lists are flattened to
        their innermost frame lists (so ``[[[p1, p2]]]``, the nesting ``ProcessorMixin`` needs to
        count a list of paths as one video, also works)."""
        if hasattr(videos, "numpy") and not isinstance(videos, np.ndarray):  # a torch tensor
            videos = videos.numpy()
        if isinstance(videos, np.ndarray):
            if videos.ndim == 4:
                return [list(videos)]
            if videos.ndim == 5:
                return [list(v) for v in videos]
            if videos.ndim in (2, 3):
                return [[videos]]
            raise ValueError(f"a video array must have 4 dimensions (T, H, W, C), got shape {videos.shape}")
        if self._is_frame(videos):
            return [[videos]]
        if not isinstance(videos, (list, tuple)) or not videos:
            raise ValueError(
                f"expected a video (a list of frames) or a list of videos, got {type(videos).__name__}"
            )
        if all(self._is_frame(item) for item in videos):
            return [list(videos)]
        out = []
        for item in videos:
            out.extend(self._split_videos(item))
        return out

    @staticmethod
    def _fps_of(metadata, default: float) -> float:
        if metadata is None:
            return default
        fps = metadata.get("fps") if isinstance(metadata, dict) else getattr(metadata, "fps", None)
        return float(fps) if fps else default

    # -- processing ---------------------------------------------------------------------------------

    def frame_size(
        self, num_frames: int, height: int, width: int, factor: int, min_pixels: int, max_pixels: int
    ) -> tuple[int, int]:
        """The resized ``(H', W')`` of every frame: Qwen2-VL bounds each frame's pixels on its own."""
        return smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)

    def resize(
        self,
        image: np.ndarray,
        size: SizeDict,
        resample=None,
        factor: int = 28,
        num_frames: int = 1,
        **kwargs,
    ) -> np.ndarray:
        """``(C, H, W)`` -> ``(C, H', W')`` with ``H', W'`` multiples of ``factor`` (:meth:`frame_size`)."""
        if not size.shortest_edge or not size.longest_edge:
            raise ValueError(
                f"`size` must hold 'shortest_edge' and 'longest_edge' (min/max pixels), got {size}"
            )
        height, width = image.shape[-2:]
        new_h, new_w = self.frame_size(
            num_frames, height, width, factor, size.shortest_edge, size.longest_edge
        )
        return super().resize(image, size=SizeDict(height=new_h, width=new_w), resample=resample)

    def patchify(self, video: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int):
        """``(T, C, H, W)`` -> ``((t*h*w), C*temporal_patch_size*patch_size**2)``, t, h, w.

        The last frame is repeated up to a multiple of ``temporal_patch_size``. Element order is
        Qwen2VLVideoProcessor's: rows (t, h-block, w-block, h-in-merge, w-in-merge), columns
        (channel, frame-in-group, pixel row, pixel column)."""
        if pad := -video.shape[0] % temporal_patch_size:
            video = np.concatenate([video, np.repeat(video[-1:], pad, axis=0)], axis=0)
        frames, channel, height, width = video.shape
        grid_t, grid_h, grid_w = frames // temporal_patch_size, height // patch_size, width // patch_size
        patches = video.reshape(
            grid_t,
            temporal_patch_size,
            channel,
            grid_h // merge_size,
            merge_size,
            patch_size,
            grid_w // merge_size,
            merge_size,
            patch_size,
        )
        # -> (t, h-block, w-block, h-in-merge, w-in-merge, C, frame-in-group, ph, pw)
        patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        flat = patches.reshape(
            grid_t * grid_h * grid_w, channel * temporal_patch_size * patch_size * patch_size
        )
        return flat, grid_t, grid_h, grid_w

    def preprocess(self, videos, **kwargs) -> BatchFeature:
        # Settings not given in the call come from the instance, as in VideoProcessorMixin.preprocess.
        for name in self.valid_kwargs.__annotations__:
            if kwargs.get(name) is None:
                kwargs[name] = getattr(self, name, None)
        return_tensors = kwargs.get("return_tensors")
        metadata = kwargs.get("video_metadata")
        default_fps = float(kwargs.get("fps") or DEFAULT_FPS)
        size = kwargs.get("size")
        if kwargs.get("min_pixels") is not None or kwargs.get("max_pixels") is not None:
            size = dict(size or {})
            size["shortest_edge"] = kwargs.get("min_pixels") or size.get("shortest_edge")
            size["longest_edge"] = kwargs.get("max_pixels") or size.get("longest_edge")
        size = size if isinstance(size, SizeDict) else SizeDict(**dict(size))
        patch_size, merge_size = kwargs["patch_size"], kwargs["merge_size"]
        temporal_patch_size = kwargs["temporal_patch_size"]
        mean, std = kwargs["image_mean"], kwargs["image_std"]

        split = self._split_videos(videos)
        if metadata is not None and not isinstance(metadata, (list, tuple)):
            metadata = [metadata]
        if metadata is not None and len(metadata) != len(split):
            raise ValueError(f"got {len(metadata)} video_metadata entries for {len(split)} videos")

        all_patches, grids, metas = [], [], []
        for index, frames in enumerate(split):
            arrays = []
            for frame in frames:
                if isinstance(frame, (str, os.PathLike)):
                    frame = load_image(str(frame))  # as the image processor opens a path (EXIF, RGB)
                arrays.append(
                    self.process_image(
                        frame,
                        do_convert_rgb=kwargs["do_convert_rgb"],
                        input_data_format=kwargs.get("input_data_format"),
                    )
                )
            if len({a.shape for a in arrays}) != 1:
                raise ValueError(
                    f"video {index}: frames differ in size ({sorted({a.shape for a in arrays})})"
                )
            processed = []
            for frame in arrays:  # per frame, exactly the image processor's steps and order
                if kwargs["do_resize"]:
                    frame = self.resize(
                        frame,
                        size,
                        kwargs["resample"],
                        factor=patch_size * merge_size,
                        num_frames=len(arrays),
                    )
                if kwargs["do_rescale"]:
                    frame = self.rescale(frame, kwargs["rescale_factor"])
                if kwargs["do_normalize"]:
                    frame = self.normalize(frame, mean, std)
                processed.append(np.asarray(frame, dtype=np.float32))
            flat, grid_t, grid_h, grid_w = self.patchify(
                np.stack(processed), patch_size, merge_size, temporal_patch_size
            )
            all_patches.append(flat)
            grids.append([grid_t, grid_h, grid_w])
            fps = self._fps_of(metadata[index] if metadata is not None else None, default_fps)
            height, width = arrays[0].shape[-2:]
            metas.append(
                VideoMetadata(
                    total_num_frames=len(frames),
                    fps=fps,
                    width=width,
                    height=height,
                    duration=len(frames) / fps,
                    frames_indices=list(range(len(frames))),  # every given frame is used
                )
            )
        data = {
            "pixel_values_videos": np.concatenate(all_patches, axis=0),
            "video_grid_thw": np.array(grids, dtype=np.int64),
        }
        out = BatchFeature(data=data, tensor_type=return_tensors)
        if kwargs.get("return_metadata"):
            out["video_metadata"] = metas  # kept out of tensor conversion by ProcessorMixin
        return out

    def get_num_of_video_patches(self, num_frames: int, height: int, width: int, videos_kwargs=None) -> int:
        """Patches (before merging) of a ``num_frames``-frame ``height x width`` video."""
        videos_kwargs = videos_kwargs or {}
        size = videos_kwargs.get("size") or self.size
        patch_size = videos_kwargs.get("patch_size") or self.patch_size
        merge_size = videos_kwargs.get("merge_size") or self.merge_size
        temporal = videos_kwargs.get("temporal_patch_size") or self.temporal_patch_size
        new_h, new_w = self.frame_size(
            num_frames, height, width, patch_size * merge_size, size["shortest_edge"], size["longest_edge"]
        )
        return -(-num_frames // temporal) * (new_h // patch_size) * (new_w // patch_size)


class Qwen3FrameVideoProcessor(FrameVideoProcessor):
    """:class:`FrameVideoProcessor` with ``Qwen3VLVideoProcessor``'s resize and defaults (Qwen3-VL,
    Qwen3.5): the pixel budget bounds the whole clip (frames x height x width, transformers'
    ``video_processing_qwen3_vl.smart_resize``), 16 px patches, mean/std 0.5."""

    size = {"shortest_edge": 128 * 32 * 32, "longest_edge": 32 * 32 * 768}  # Qwen3VLVideoProcessor's
    image_mean = IMAGENET_STANDARD_MEAN
    image_std = IMAGENET_STANDARD_STD
    patch_size = 16

    def frame_size(
        self, num_frames: int, height: int, width: int, factor: int, min_pixels: int, max_pixels: int
    ) -> tuple[int, int]:
        # Qwen3's resize refuses fewer frames than a temporal patch; the frames are padded to one anyway.
        frames = max(int(num_frames), self.temporal_patch_size)
        return qwen3_smart_resize(
            frames,
            height,
            width,
            self.temporal_patch_size,
            factor,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
        )


class _TorchvisionFreeCheck:
    """Accept a video processor by ``isinstance(..., VideoProcessorMixin)`` with the class itself."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor":
            if not isinstance(argument, VideoProcessorMixin):
                raise TypeError(
                    f"Received a {type(argument).__name__} for argument video_processor, "
                    "but a VideoProcessorMixin was expected."
                )
            return VideoProcessorMixin
        return super().check_argument_for_proper_class(argument_name, argument)


class Qwen2_5_VLProcessor(_TorchvisionFreeCheck, _hf.Qwen2_5_VLProcessor):
    """transformers' ``Qwen2_5_VLProcessor``, constructible without torchvision (see the module doc)."""


class Qwen2VLProcessor(_TorchvisionFreeCheck, _hf.Qwen2VLProcessor):
    """transformers' ``Qwen2VLProcessor``, constructible without torchvision (see the module doc)."""


class Qwen3VLProcessor(_TorchvisionFreeCheck, _hf.Qwen3VLProcessor):
    """transformers' ``Qwen3VLProcessor`` (Qwen3-VL and Qwen3.5), constructible without torchvision."""


# The torchvision-free processor classes by name, and the video processor each takes.
_PROCESSORS = {
    "Qwen2_5_VLProcessor": (Qwen2_5_VLProcessor, FrameVideoProcessor),
    "Qwen2VLProcessor": (Qwen2VLProcessor, FrameVideoProcessor),
    "Qwen3VLProcessor": (Qwen3VLProcessor, Qwen3FrameVideoProcessor),
}
# config.json model_type -> the processor class its download uses when the folder does not name one.
_PROCESSOR_OF_TYPE = {
    "qwen2_vl": "Qwen2VLProcessor",
    "qwen3_vl": "Qwen3VLProcessor",
    "qwen3_5": "Qwen3VLProcessor",
}


# -- loading ----------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise QwenProcessorFilesError(f"{path}: cannot read it as JSON ({err})") from None


def _settings(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in _TYPE_KEYS}


def _processor_class(folder: Path, processor_class, configs: list[dict]):
    classes = {name: pair[0] for name, pair in _PROCESSORS.items()}
    if processor_class is None:
        named = [c.get("processor_class") for c in configs if c.get("processor_class")]
        if named:
            processor_class = named[0]
        elif (folder / "config.json").is_file():
            model_type = _read_json(folder / "config.json").get("model_type")
            processor_class = _PROCESSOR_OF_TYPE.get(model_type, "Qwen2_5_VLProcessor")
        else:
            processor_class = "Qwen2_5_VLProcessor"
    if isinstance(processor_class, str):
        if processor_class not in classes:
            raise QwenProcessorFilesError(
                f"{folder}: processor_class {processor_class!r} is not a Qwen-VL processor "
                f"(expected one of {sorted(classes)})"
            )
        processor_class = classes[processor_class]
    elif processor_class in (_hf.Qwen2_5_VLProcessor, _hf.Qwen2VLProcessor, _hf.Qwen3VLProcessor):
        processor_class = classes[processor_class.__name__]  # the library class itself cannot take ours
    return processor_class


def load_qwen_processor(path: str | os.PathLike, processor_class=None):
    """A ``Qwen2_5_VLProcessor`` (or ``Qwen2VLProcessor``) for a local folder, without torchvision.

    Reads either layout:

    - a download (as transformers 4.x saved it): ``preprocessor_config.json`` (image settings, also
      used for videos unless ``video_preprocessor_config.json`` exists), tokenizer files,
      ``chat_template.json`` or ``chat_template.jinja``;
    - this function's processor after ``save_pretrained`` (transformers 5.x): ``processor_config.json``
      holding ``image_processor`` and ``video_processor``, tokenizer files, ``chat_template.jinja``.

    ``processor_class``: a class or its name; by default the folder's ``processor_class``, else
    ``config.json``'s ``model_type`` (``qwen2_vl`` -> ``Qwen2VLProcessor``), else Qwen2.5-VL.

    Raises:
        QwenProcessorFilesError: one line naming the folder and the missing or unreadable file.
    """
    from transformers import AutoTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise QwenProcessorFilesError(f"{folder}: no such folder (expected a Qwen2.5-VL processor folder)")
    processor_config = (
        _read_json(folder / "processor_config.json") if (folder / "processor_config.json").is_file() else {}
    )
    if isinstance(processor_config.get("image_processor"), dict):
        image_config = processor_config["image_processor"]
    elif (folder / "preprocessor_config.json").is_file():
        image_config = _read_json(folder / "preprocessor_config.json")
    else:
        raise QwenProcessorFilesError(
            f"{folder}: missing preprocessor_config.json (the image processor settings of a Qwen2.5-VL folder)"
        )
    if isinstance(processor_config.get("video_processor"), dict):
        video_config = processor_config["video_processor"]
    elif (folder / "video_preprocessor_config.json").is_file():
        video_config = _read_json(folder / "video_preprocessor_config.json")
    else:
        video_config = image_config  # 4.x downloads: one file drove both (min/max pixels included)
    if not (folder / "tokenizer.json").is_file() and not (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    ):
        raise QwenProcessorFilesError(
            f"{folder}: missing tokenizer.json (or vocab.json + merges.txt), the Qwen tokenizer files"
        )
    if not (folder / "tokenizer_config.json").is_file():
        raise QwenProcessorFilesError(
            f"{folder}: missing tokenizer_config.json (the Qwen tokenizer settings)"
        )
    cls = _processor_class(folder, processor_class, [processor_config, image_config])

    image_processor = Qwen2VLImageProcessorPil.from_dict(_settings(image_config))
    videos = (pair[1] for pair in _PROCESSORS.values() if issubclass(cls, pair[0]))
    video_processor = next(videos, FrameVideoProcessor).from_dict(_settings(video_config))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    chat_template = _chat_template(folder) or getattr(tokenizer, "chat_template", None)
    return cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=chat_template,
    )


def _chat_template(folder: Path) -> Any:
    """``chat_template.jinja`` (5.x saves) or ``chat_template.json``'s ``chat_template`` (older downloads)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if (folder / "chat_template.json").is_file():
        return _read_json(folder / "chat_template.json").get("chat_template")
    return None


@dataclass(frozen=True)
class NativeResize:
    """The processor's ``smart_resize`` of one processor: ``(H, W)`` -> multiples of ``patch * merge``
    within ``[min_pixels, max_pixels]``, aspect ratio kept. Plain numbers inside: the data pipeline
    pickles it to preflight workers."""

    patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int

    @classmethod
    def of(cls, processor) -> NativeResize:
        """The resize settings of an image or video processor."""
        size = processor.size
        get = size.get if isinstance(size, dict) else (lambda k, s=size: getattr(s, k, None))
        min_pixels = getattr(processor, "min_pixels", None) or get("shortest_edge")
        max_pixels = getattr(processor, "max_pixels", None) or get("longest_edge")
        return cls(int(processor.patch_size), int(processor.merge_size), int(min_pixels), int(max_pixels))

    def __call__(self, size: tuple[int, int]) -> tuple[int, int]:
        h, w = smart_resize(
            int(size[0]),
            int(size[1]),
            factor=self.patch_size * self.merge_size,
            min_pixels=self.min_pixels,
            max_pixels=self.max_pixels,
        )
        return int(h), int(w)
