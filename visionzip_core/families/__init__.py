"""Model families behind one interface (:class:`ModelFamily`), looked up by model class or config.

``family_for(x)`` accepts a model (also wrapped by peft), a config, or a model class name. An
unsupported model is one line that lists the supported families.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from visionzip_core.families.base import MODULE_GROUPS, ModelFamily
from visionzip_core.families.llava import Llava15
from visionzip_core.families.llava_next import LlavaNext
from visionzip_core.families.qwen2_5_vl import Qwen2_5VL, Qwen2VL

FAMILIES: tuple[ModelFamily, ...] = (Llava15(), LlavaNext(), Qwen2_5VL(), Qwen2VL())

_BY_CLASS = {cls: family for family in FAMILIES for cls in (*family.model_classes, *family.processor_classes)}
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
    """The family stage 1 (``train.mode=pretrain``) assembles from a vision folder and an LLM folder."""
    return next(f for f in FAMILIES if f.assembles)


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


@lru_cache(maxsize=16)
def _config(family: str, config_json: str) -> Any:
    return family_for(family).config_from_dict(json.loads(config_json))


@dataclass(frozen=True)
class ImageTokenCount:
    """``count((H, W)) -> int``: the image-token ids one image of that size expands to.

    Plain strings inside, so the data pipeline can pickle it to worker processes and hash it into
    the preflight cache's fingerprint. ``per_size`` is False when every image gets the same count
    (no image size needed); the count itself always comes from the family.
    """

    family: str = ""
    config_json: str = ""
    vz_json: str | None = None
    per_size: bool = False
    fixed: int | None = None
    _memo: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def constant(cls, tokens: int) -> ImageTokenCount:
        """The same count for every image (a model not built yet, e.g. stage 1's)."""
        return cls(fixed=int(tokens))

    def __call__(self, image_size: tuple[int, int] | None = None) -> int:
        if self.fixed is not None:
            return self.fixed
        if self.per_size and image_size is None:
            raise ValueError(f"{self.family}: the image-token count depends on the image size")
        key = None if not self.per_size else tuple(int(x) for x in image_size)
        if key not in self._memo:
            family, config = family_for(self.family), _config(self.family, self.config_json)
            if self.vz_json is None:
                self._memo[key] = self._stock(family, config, key)
            else:
                from visionzip_core.config import VisionZipConfig

                vz = VisionZipConfig(**json.loads(self.vz_json))
                self._memo[key] = self._compressed(family, config, vz, key)
        return self._memo[key]

    @staticmethod
    def _stock(family: ModelFamily, config: Any, size: tuple[int, ...] | None) -> int:
        return family.stock_tokens_per_image(config, size)

    @staticmethod
    def _compressed(family: ModelFamily, config: Any, vz: Any, size: tuple[int, ...] | None) -> int:
        return family.compressed_tokens_per_image(config, vz, size)

    def __getstate__(self):
        return {k: getattr(self, k) for k in ("family", "config_json", "vz_json", "per_size", "fixed")}

    def __setstate__(self, state):
        for k, v in state.items():
            object.__setattr__(self, k, v)
        object.__setattr__(self, "_memo", {})

    def describe(self) -> int | str:
        """The count when it is fixed, else a phrase for logs and the run record."""
        if not self.per_size:
            return self()
        if self.vz_json is None:
            return "stock, per image size"
        from visionzip_core.config import VisionZipConfig

        vz = VisionZipConfig(**json.loads(self.vz_json))
        if vz.uses_ratios:  # no fixed count: tokens_per_image raises for a ratio split
            return f"{vz.dominant_ratio:g} + {vz.contextual_ratio:g} of each image's tokens"
        return f"{vz.tokens_per_image} per crop"


@dataclass(frozen=True)
class VideoTokenCount(ImageTokenCount):
    """``count((T, H, W)) -> int``: the video-token ids of a video of ``T`` frames (padded to the
    temporal patch) resized to ``(H, W)``; compressed by ``vz_json``'s split, or stock when None.
    The same plain-string state as :class:`ImageTokenCount`, asked of the family's video counts."""

    per_size: bool = True

    @staticmethod
    def _stock(family: ModelFamily, config: Any, size: tuple[int, ...] | None) -> int:
        return family.stock_tokens_per_video(config, size)

    @staticmethod
    def _compressed(family: ModelFamily, config: Any, vz: Any, size: tuple[int, ...] | None) -> int:
        return family.compressed_tokens_per_video(config, vz, size)


def video_token_count(model_config: Any, vz: Any = None) -> VideoTokenCount | None:
    """The :class:`VideoTokenCount` of a model config (None when its family takes no video)."""
    family = family_for(model_config)
    if not family.takes_video:
        return None
    return VideoTokenCount(
        family=family.name,
        config_json=json.dumps(model_config.to_dict(), sort_keys=True, default=str),
        vz_json=None if vz is None else json.dumps(vz.model_dump(), sort_keys=True),
    )


def image_token_count(model_config: Any, vz: Any = None) -> ImageTokenCount:
    """The :class:`ImageTokenCount` of a model config, compressed by ``vz`` (a
    :class:`~visionzip_core.config.VisionZipConfig`) or stock (``vz=None``)."""
    family = family_for(model_config)
    return ImageTokenCount(
        family=family.name,
        config_json=json.dumps(model_config.to_dict(), sort_keys=True, default=str),
        vz_json=None if vz is None else json.dumps(vz.model_dump(), sort_keys=True),
        per_size=family.count_depends_on_size,
    )


__all__ = [
    "FAMILIES",
    "MODULE_GROUPS",
    "ImageTokenCount",
    "ModelFamily",
    "UnsupportedModel",
    "VideoTokenCount",
    "family_for",
    "image_token_count",
    "ratio_flags_refusal",
    "ratio_takers",
    "stage1_family",
    "supported",
    "video_token_count",
]
