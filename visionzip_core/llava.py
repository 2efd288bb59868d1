"""The public adaptation API under its earlier module name; it lives in :mod:`visionzip_core.adapt`
(family-independent) and :mod:`visionzip_core.families.llava` (LLaVA-1.5)."""

from visionzip_core.adapt import (
    load_visionzip_model,
    load_visionzip_processor,
    remove_visionzip,
    visionzip,
    visionzip_processor,
)
from visionzip_core.families.llava import find_llava_model

__all__ = [
    "find_llava_model",
    "load_visionzip_model",
    "load_visionzip_processor",
    "remove_visionzip",
    "visionzip",
    "visionzip_processor",
]
