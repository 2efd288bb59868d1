"""Model families behind one interface (:class:`ModelFamily`), looked up by model class or config.

``family_for(x)`` accepts a model (also wrapped by peft), a config, or a model class name. An
unsupported model is one line that lists the supported families.
"""

from __future__ import annotations

from typing import Any

from visionzip_core.families.base import MODULE_GROUPS, ModelFamily
from visionzip_core.families.llava import Llava15

FAMILIES: tuple[ModelFamily, ...] = (Llava15(),)

_BY_CLASS = {cls: family for family in FAMILIES for cls in (*family.model_classes, *family.processor_classes)}
_BY_TYPE = {t: family for family in FAMILIES for t in family.model_types}


class UnsupportedModel(ValueError):
    pass


def supported() -> str:
    return "; ".join(f"{f.name} ({', '.join(f.model_classes)})" for f in FAMILIES)


def family_for(obj: Any) -> ModelFamily:
    """The family of a model or processor instance (peft wrappers unwrapped), a config, or a class
    name or model_type."""
    if isinstance(obj, str):
        family = _BY_CLASS.get(obj) or _BY_TYPE.get(obj)
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


__all__ = ["FAMILIES", "MODULE_GROUPS", "ModelFamily", "UnsupportedModel", "family_for", "supported"]
