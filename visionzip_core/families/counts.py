"""How many token ids one image (or video) expands to, asked of the model's family.

:class:`ImageTokenCount` and :class:`VideoTokenCount` hold plain strings inside (the family name,
the model config and the VisionZip settings as JSON), so that the data pipeline can pickle them
to preflight workers and hash them into the preflight cache's fingerprint; the family's
``stock_tokens_per_*`` / ``compressed_tokens_per_*`` is asked on first use of each size.
:func:`num_image_tokens` is the same question asked once of a model config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from visionzip_core.config import VisionZipConfig, read_visionzip_config
from visionzip_core.families.registry import family_for


def num_image_tokens(model_config: Any, image_size: tuple[int, int] | None = None) -> int:
    """Image-token ids each ``<image>`` placeholder must expand to for this model.

    The model's family counts them: with VisionZip settings recorded on the config, the
    compressed count; otherwise the stock one. ``image_size`` (H, W) matters for families whose
    count depends on it (tiled images); LLaVA-1.5 crops every image to one square.
    """
    family = family_for(model_config)
    vz = read_visionzip_config(model_config)
    if vz is not None:
        return family.compressed_tokens_per_image(model_config, vz, image_size)
    return family.stock_tokens_per_image(model_config, image_size)


@lru_cache(maxsize=16)
def _config(family: str, config_json: str) -> Any:
    return family_for(family).config_from_dict(json.loads(config_json))


def _settings(vz_json: str) -> VisionZipConfig:
    return VisionZipConfig(**json.loads(vz_json))


@dataclass(frozen=True)
class ImageTokenCount:
    """``count((H, W)) -> int``: the image-token ids one image of that size expands to.

    ``per_size`` is False when every image gets the same count (no image size needed); the count
    itself always comes from the family.
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
                self._memo[key] = self._compressed(family, config, _settings(self.vz_json), key)
        return self._memo[key]

    def in_several(self) -> int | None:
        """The count of each image of a sample holding several, when the family lays those out
        apart from an image alone (:meth:`ModelFamily.several_image_tokens`); None: as alone."""
        if self.fixed is not None or not self.family:
            return None
        if "several" not in self._memo:
            family, config = family_for(self.family), _config(self.family, self.config_json)
            vz = None if self.vz_json is None else _settings(self.vz_json)
            self._memo["several"] = family.several_image_tokens(config, vz)
        return self._memo["several"]

    @staticmethod
    def _stock(family: Any, config: Any, size: tuple[int, ...] | None) -> int:
        return family.stock_tokens_per_image(config, size)

    @staticmethod
    def _compressed(family: Any, config: Any, vz: VisionZipConfig, size: tuple[int, ...] | None) -> int:
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
        vz = _settings(self.vz_json)
        if vz.uses_ratios:  # no fixed count: tokens_per_image raises for a ratio split
            return f"{vz.dominant_ratio:g} + {vz.contextual_ratio:g} of each image's tokens"
        return f"{vz.tokens_per_image} per crop"


def image_token_count(model_config: Any, vz: VisionZipConfig | None = None) -> ImageTokenCount:
    """The :class:`ImageTokenCount` of a model config, compressed by ``vz`` or stock (``vz=None``)."""
    family = family_for(model_config)
    return ImageTokenCount(
        family=family.name,
        config_json=json.dumps(model_config.to_dict(), sort_keys=True, default=str),
        vz_json=None if vz is None else json.dumps(vz.model_dump(), sort_keys=True),
        per_size=family.count_depends_on_size,
    )


@dataclass(frozen=True)
class VideoTokenCount(ImageTokenCount):
    """``count((T, H, W)) -> int``: the video-token ids of a video of ``T`` frames (padded to the
    temporal patch) resized to ``(H, W)``; compressed by ``vz_json``'s split, or stock when None.
    The same plain-string state as :class:`ImageTokenCount`, asked of the family's video counts."""

    per_size: bool = True

    @staticmethod
    def _stock(family: Any, config: Any, size: tuple[int, ...] | None) -> int:
        return family.stock_tokens_per_video(config, size)

    @staticmethod
    def _compressed(family: Any, config: Any, vz: VisionZipConfig, size: tuple[int, ...] | None) -> int:
        return family.compressed_tokens_per_video(config, vz, size)

    def placeholder_text(self, video_size: tuple[int, int, int], video_token: str) -> str | None:
        """The text one video placeholder becomes before tokenising, when the family lays a video
        out as more than one run of ``video_token`` (:meth:`ModelFamily.video_placeholder_text`);
        None: the placeholder is repeated ``self(video_size)`` times."""
        family, config = family_for(self.family), _config(self.family, self.config_json)
        vz = None if self.vz_json is None else _settings(self.vz_json)
        return family.video_placeholder_text(config, vz, tuple(int(x) for x in video_size), video_token)


def video_token_count(model_config: Any, vz: VisionZipConfig | None = None) -> VideoTokenCount | None:
    """The :class:`VideoTokenCount` of a model config (None when its family takes no video)."""
    family = family_for(model_config)
    if not family.takes_video:
        return None
    return VideoTokenCount(
        family=family.name,
        config_json=json.dumps(model_config.to_dict(), sort_keys=True, default=str),
        vz_json=None if vz is None else json.dumps(vz.model_dump(), sort_keys=True),
    )
