"""The registered families, and the questions only the registry can answer: which family a model,
processor, config or name belongs to, and which family builds stage-1 models from parts.

Adding a family = one module in this package, and its instance in :data:`FAMILIES`.
"""

from __future__ import annotations

from typing import Any

from visionzip_core.families.base import ModelFamily
from visionzip_core.families.llava import Llava15
from visionzip_core.families.llava_next import LlavaNext
from visionzip_core.families.llava_onevision import LlavaOnevision
from visionzip_core.families.qwen2_5_vl import Qwen2_5VL, Qwen2VL
from visionzip_core.families.qwen3_vl import Qwen3_5, Qwen3VL

FAMILIES: tuple[ModelFamily, ...] = (
    Llava15(),
    LlavaNext(),
    Qwen2_5VL(),
    Qwen2VL(),
    Qwen3VL(),
    Qwen3_5(),
    LlavaOnevision(),
)

# A processor class two families share (Qwen3.5 ships Qwen3-VL's) maps to the first registered; the
# families that share one adapt it alike.
_BY_CLASS: dict[str, ModelFamily] = {}
for _family in FAMILIES:
    for _cls in (*_family.model_classes, *_family.processor_classes):
        _BY_CLASS.setdefault(_cls, _family)
_BY_TYPE = {t: family for family in FAMILIES for t in family.model_types}
_BY_NAME = {family.name: family for family in FAMILIES}


class UnsupportedModel(ValueError):
    pass


def supported() -> str:
    return "; ".join(f"{f.name} ({', '.join(f.model_classes)})" for f in FAMILIES)


def family_for(obj: Any) -> ModelFamily:
    """The family of a model or processor instance (peft wrappers unwrapped), a config, or a class
    name, model_type or family name."""
    if isinstance(obj, str):
        family = _BY_CLASS.get(obj) or _BY_TYPE.get(obj) or _BY_NAME.get(obj)
        what = obj
    elif hasattr(obj, "model_type") and not hasattr(obj, "forward"):  # a config
        family = _BY_TYPE.get(obj.model_type)
        what = f"model_type '{obj.model_type}'"
    else:
        inner = obj.get_base_model() if callable(getattr(obj, "get_base_model", None)) else obj
        family = next((_BY_CLASS[c.__name__] for c in type(inner).__mro__ if c.__name__ in _BY_CLASS), None)
        what = type(obj).__name__
    if family is None:
        raise UnsupportedModel(f"unsupported model {what}; supported families: {supported()}")
    return family


def stage1_family() -> ModelFamily:
    """The family whose stage 1 (``train.mode: pretrain``) assembles a model from a vision-tower
    folder and an LLM folder with a fresh projector (:attr:`ModelFamily.assembles`): the first
    registered that does. The families that reuse its stage 1 (LLaVA-NeXT) start from its output."""
    return next(family for family in FAMILIES if family.assembles)


def ratio_takers() -> str:
    """The families that take a ratio budget, for messages."""
    return ", ".join(f.name for f in FAMILIES if f.takes_ratios)


def ratio_flags_refusal(family: ModelFamily) -> str:
    """The one line a command prints when ``--dominant-ratio``/``--contextual-ratio`` are given for a
    family that takes counts only (as training refuses ``visionzip.dominant_ratio``)."""
    takers = ", ".join(f.name for f in FAMILIES if f.takes_ratios)
    return (
        "--dominant-ratio/--contextual-ratio: only for families whose token count follows the image size "
        f"({takers}); {family.name} takes --dominant and --contextual counts"
    )
