"""Model families behind one interface (:class:`ModelFamily`), looked up by model class or config.

``family_for(x)`` accepts a model (also wrapped by peft), a config, or a model class name. An
unsupported model is one line that lists the supported families. The registry is
:mod:`~visionzip_core.families.registry`; how many tokens an image or a video becomes is
:mod:`~visionzip_core.families.counts`.
"""

from visionzip_core.families.base import LORA_TARGETS, MODULE_GROUPS, ModelFamily
from visionzip_core.families.counts import (
    ImageTokenCount,
    VideoTokenCount,
    image_token_count,
    num_image_tokens,
    video_token_count,
)
from visionzip_core.families.registry import (
    FAMILIES,
    UnsupportedModel,
    family_for,
    ratio_flags_refusal,
    ratio_takers,
    stage1_family,
    supported,
)

__all__ = [
    "FAMILIES",
    "LORA_TARGETS",
    "MODULE_GROUPS",
    "ImageTokenCount",
    "ModelFamily",
    "UnsupportedModel",
    "VideoTokenCount",
    "family_for",
    "image_token_count",
    "num_image_tokens",
    "ratio_flags_refusal",
    "ratio_takers",
    "stage1_family",
    "supported",
    "video_token_count",
]
