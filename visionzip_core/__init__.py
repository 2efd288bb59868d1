"""VisionZip for training and inference of vision-language models (llava-hf format), one module per
model family (:mod:`visionzip_core.families`)."""

from visionzip_core.adapt import (
    load_visionzip_model,
    load_visionzip_processor,
    remove_visionzip,
    visionzip,
    visionzip_processor,
)
from visionzip_core.config import VisionZipConfig, read_visionzip_config
from visionzip_core.families import num_image_tokens

__all__ = [
    "VisionZipConfig",
    "load_visionzip_model",
    "load_visionzip_processor",
    "num_image_tokens",
    "read_visionzip_config",
    "remove_visionzip",
    "visionzip",
    "visionzip_processor",
]
