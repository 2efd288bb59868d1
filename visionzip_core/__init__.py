"""VisionZip for training and inference of LLaVA-style models (llava-hf format)."""

from visionzip_core.config import VisionZipConfig, num_image_tokens, read_visionzip_config

__all__ = ["VisionZipConfig", "num_image_tokens", "read_visionzip_config"]
