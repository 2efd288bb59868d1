"""VisionZip for training and inference of LLaVA-style models (llava-hf format)."""

from visionzip_core.config import VisionZipConfig, num_image_tokens, read_visionzip_config
from visionzip_core.llava import (
    load_visionzip_model,
    load_visionzip_processor,
    remove_visionzip,
    visionzip,
    visionzip_processor,
)

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
