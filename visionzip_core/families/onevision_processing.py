"""The LLaVA-OneVision processor built without torchvision, and the folder it loads from.

Why: transformers' ``LlavaOnevisionProcessor`` wants a video processor, and the only one it ships
(``LlavaOnevisionVideoProcessor``, a ``BaseVideoProcessor``) needs torchvision, which this stack
cannot import (see :mod:`~visionzip_core.families.qwen_processing`). So:

- images go through transformers' own PIL/numpy backend, ``LlavaOnevisionImageProcessorPil``;
- videos go through :class:`OnevisionVideoProcessor`, written here: the stock video processor's
  steps (resize every frame to ``size``, bicubic; rescale; normalise; no frame sampling) per frame
  with the PIL backend, giving ``pixel_values_videos`` ``(videos, frames, C, H, W)``;
- :func:`load_onevision_processor` builds the processor from its parts, so no
  ``AutoVideoProcessor`` lookup (which would pick the torchvision class) happens.

It reads a folder as ``llava-hf/llava-onevision-qwen2-7b-ov-hf`` ships it (saved by transformers
4.45): ``preprocessor_config.json`` (image settings), ``video_processor/preprocessor_config.json``
(the 4.45 place of the video settings), ``processor_config.json`` (``num_image_tokens``,
``vision_feature_select_strategy``, ``vision_aspect_ratio`` when present), tokenizer files and
``chat_template.json``; and as transformers 5 saves it (everything in ``processor_config.json``,
``chat_template.jinja``). The hub files write 0.5 means and stds while the classes default to CLIP's,
so the settings always come from the folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import transformers as _hf
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import SizeDict, load_image
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
from transformers.processing_utils import VideosKwargs

from visionzip_core.families.qwen_processing import (
    FrameVideoProcessor,
    QwenProcessorFilesError,
    _chat_template,
    _read_json,
    _settings,
    _TorchvisionFreeCheck,
)

# Processor settings of processor_config.json that the constructor takes.
_PROCESSOR_KEYS = (
    "num_image_tokens",
    "vision_feature_select_strategy",
    "vision_aspect_ratio",
    "image_token",
    "video_token",
)


class OnevisionVideoProcessor(FrameVideoProcessor):
    """LLaVA-OneVision video preprocessing on PIL/numpy for videos given as lists of frames.

    A video is a list of frames (PIL images, numpy arrays or image paths) or a ``(T, H, W, C)``
    array; a batch is a list of videos of one frame count. Every frame is resized to ``size``
    (``{"height", "width"}``, 384 x 384 in the download), rescaled and normalised, as the stock
    ``LlavaOnevisionVideoProcessor`` does. Output: ``pixel_values_videos`` ``(videos, T, C, H, W)``.
    """

    size = {"height": 384, "width": 384}
    valid_kwargs = VideosKwargs
    model_input_names = ["pixel_values_videos"]

    def resize(self, image: np.ndarray, size: SizeDict, resample=None, **kwargs) -> np.ndarray:
        """``(C, H, W)`` -> ``(C, size.height, size.width)``; the aspect ratio is not kept (as stock)."""
        return super(FrameVideoProcessor, self).resize(
            image, size=SizeDict(height=size.height, width=size.width), resample=resample
        )

    def preprocess(self, videos, **kwargs) -> BatchFeature:
        for name in self.valid_kwargs.__annotations__:
            if kwargs.get(name) is None:
                kwargs[name] = getattr(self, name, None)
        size = kwargs.get("size")
        size = size if isinstance(size, SizeDict) else SizeDict(**dict(size))
        out = []
        for frames in self._split_videos(videos):
            processed = []
            for frame in frames:
                if isinstance(frame, (str, os.PathLike)):
                    frame = load_image(str(frame))
                frame = self.process_image(frame, do_convert_rgb=kwargs["do_convert_rgb"])
                if kwargs["do_resize"]:
                    frame = self.resize(frame, size, kwargs["resample"])
                if kwargs["do_rescale"]:
                    frame = self.rescale(frame, kwargs["rescale_factor"])
                if kwargs["do_normalize"]:
                    frame = self.normalize(frame, kwargs["image_mean"], kwargs["image_std"])
                processed.append(np.asarray(frame, dtype=np.float32))
            out.append(np.stack(processed))
        if len({v.shape for v in out}) > 1:
            raise ValueError(
                f"videos of one batch need one frame count; got {sorted({v.shape[0] for v in out})} frames"
            )
        return BatchFeature(
            data={"pixel_values_videos": np.stack(out)}, tensor_type=kwargs.get("return_tensors")
        )


@dataclass(frozen=True)
class FrameSize:
    """``(H, W) -> (H, W)``: the size a video frame of any size is resized to (the processor's one
    ``size``, aspect ratio not kept); picklable, for the data pipeline's workers."""

    height: int
    width: int

    @classmethod
    def of(cls, video_processor) -> FrameSize:
        size = video_processor.size
        get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k))
        return cls(int(get("height")), int(get("width")))

    def __call__(self, size: tuple[int, int]) -> tuple[int, int]:
        return self.height, self.width


class LlavaOnevisionProcessor(_TorchvisionFreeCheck, _hf.LlavaOnevisionProcessor):
    """transformers' ``LlavaOnevisionProcessor``, constructible without torchvision."""


def load_onevision_processor(path: str | os.PathLike) -> LlavaOnevisionProcessor:
    """A ``LlavaOnevisionProcessor`` for a local folder (either layout above), without torchvision.

    Raises:
        QwenProcessorFilesError: one line naming the folder and the missing or unreadable file.
    """
    from transformers import AutoTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise QwenProcessorFilesError(f"{folder}: no such folder (expected a LLaVA-OneVision folder)")
    processor_config = (
        _read_json(folder / "processor_config.json") if (folder / "processor_config.json").is_file() else {}
    )
    if isinstance(processor_config.get("image_processor"), dict):
        image_config = processor_config["image_processor"]
    elif (folder / "preprocessor_config.json").is_file():
        image_config = _read_json(folder / "preprocessor_config.json")
    else:
        raise QwenProcessorFilesError(
            f"{folder}: missing preprocessor_config.json (the image settings of a LLaVA-OneVision folder)"
        )
    if isinstance(processor_config.get("video_processor"), dict):
        video_config = processor_config["video_processor"]
    elif (folder / "video_preprocessor_config.json").is_file():
        video_config = _read_json(folder / "video_preprocessor_config.json")
    elif (folder / "video_processor" / "preprocessor_config.json").is_file():  # 4.45's layout
        video_config = _read_json(folder / "video_processor" / "preprocessor_config.json")
    else:
        video_config = {k: image_config[k] for k in ("image_mean", "image_std", "size") if k in image_config}
    if not (folder / "tokenizer.json").is_file() and not (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    ):
        raise QwenProcessorFilesError(
            f"{folder}: missing tokenizer.json (or vocab.json + merges.txt), the Qwen2 tokenizer files"
        )
    image_processor = LlavaOnevisionImageProcessorPil(**_settings(image_config))
    video_processor = OnevisionVideoProcessor(**_settings(video_config))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    settings = {k: processor_config[k] for k in _PROCESSOR_KEYS if k in processor_config}
    if "num_image_tokens" not in settings:
        raise QwenProcessorFilesError(
            f"{folder}: processor_config.json lacks num_image_tokens (tokens per crop, 729 for SigLIP-so400m/384)"
        )
    return LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=_chat_template(folder) or getattr(tokenizer, "chat_template", None),
        **settings,
    )
