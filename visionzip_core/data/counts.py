"""How many ``<|video_pad|>`` ids one video becomes, asked of the model's family.

The image count is :class:`visionzip_core.families.ImageTokenCount`; this is its video twin, kept
here so that the data pipeline holds everything it pickles to preflight workers: plain strings
inside (the family name and the config and VisionZip settings as JSON), the family's
``stock_tokens_per_video`` / ``compressed_tokens_per_video`` asked on first use of each size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class VideoTokenCount:
    """``count((T, H, W)) -> int``: the video-token ids of a video of ``T`` frames (padded to the
    temporal patch) resized to ``(H, W)``; compressed by ``vz_json``'s split, or stock when None."""

    family: str
    config_json: str
    vz_json: str | None = None
    _memo: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __call__(self, video_size: tuple[int, int, int]) -> int:
        key = tuple(int(x) for x in video_size)
        if key not in self._memo:
            from visionzip_core.families import _config, family_for

            family, config = family_for(self.family), _config(self.family, self.config_json)
            if self.vz_json is None:
                self._memo[key] = family.stock_tokens_per_video(config, key)
            else:
                from visionzip_core.config import VisionZipConfig

                vz = VisionZipConfig(**json.loads(self.vz_json))
                self._memo[key] = family.compressed_tokens_per_video(config, vz, key)
        return self._memo[key]

    def __getstate__(self):
        return {k: getattr(self, k) for k in ("family", "config_json", "vz_json")}

    def __setstate__(self, state):
        for k, v in state.items():
            object.__setattr__(self, k, v)
        object.__setattr__(self, "_memo", {})


def video_token_count(model_config: Any, vz: Any = None) -> VideoTokenCount | None:
    """The :class:`VideoTokenCount` of a model config (None when its family takes no video)."""
    from visionzip_core.families import family_for

    family = family_for(model_config)
    if not getattr(family, "takes_video", False):
        return None
    return VideoTokenCount(
        family=family.name,
        config_json=json.dumps(model_config.to_dict(), sort_keys=True, default=str),
        vz_json=None if vz is None else json.dumps(vz.model_dump(), sort_keys=True),
    )
