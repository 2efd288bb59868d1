"""VisionZip settings, validated, and how they are recorded on a transformers config."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Key under which the settings live in ``model.config`` (and so in config.json).
CONFIG_KEY = "visionzip"


class VisionZipConfig(BaseModel):
    """How many visual tokens to keep per image, and how.

    Output per image: ``dominant`` tokens (CLS first when ``keep_cls``, then patches in raster
    order) followed by ``contextual`` merged tokens. Invalid values raise ``ValueError``
    (pydantic's ``ValidationError`` is one) naming the field.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    dominant: int = Field(54, ge=1, description="Tokens kept by CLS attention, CLS included when keep_cls.")
    contextual: int = Field(10, ge=0, description="Merged tokens built from the rest.")
    feature_layer: int = Field(-2, description="Vision layer whose attention, keys and output are used.")
    keep_cls: bool = Field(
        True, description="Keep the CLS token as the first dominant token (the paper does)."
    )
    merge: Literal["paper", "mean"] = Field(
        "paper", description="'paper': target + mean of assigned; 'mean': mean over target and assigned."
    )

    @property
    def tokens_per_image(self) -> int:
        return self.dominant + self.contextual

    def check_fits(self, num_tokens: int, has_cls: bool = True) -> None:
        """Raise ``ValueError`` unless the split fits a tower with ``num_tokens`` tokens (CLS included).

        Args:
            num_tokens: sequence length of the vision tower, e.g. 577 for CLIP-L/336.
            has_cls: whether token 0 is a CLS token.
        """
        available = num_tokens if (self.keep_cls and has_cls) else num_tokens - int(has_cls)
        if self.dominant + self.contextual > available:
            raise ValueError(
                f"visionzip: dominant + contextual = {self.dominant + self.contextual} exceeds the "
                f"{available} tokens available (tower has {num_tokens} tokens, keep_cls={self.keep_cls})"
            )
        if self.keep_cls and self.dominant < 1:
            raise ValueError(
                "visionzip.dominant must be >= 1 when keep_cls is true (CLS is a dominant token)"
            )


def read_visionzip_config(model_config: Any) -> VisionZipConfig | None:
    """The VisionZip settings recorded on a (Llava) transformers config, or None when absent/off."""
    raw = getattr(model_config, CONFIG_KEY, None)
    if not raw:
        return None
    return VisionZipConfig(**raw)


def num_image_tokens(model_config: Any, image_size: tuple[int, int] | None = None) -> int:
    """Image-token ids each ``<image>`` placeholder must expand to for this model.

    The model's family counts them: with VisionZip settings recorded on the config, the
    compressed count; otherwise the stock one. ``image_size`` (H, W) matters for families whose
    count depends on it (tiled images); LLaVA-1.5 crops every image to one square.
    """
    from visionzip_core.families import family_for

    family = family_for(model_config)
    vz = read_visionzip_config(model_config)
    if vz is not None:
        return family.compressed_tokens_per_image(model_config, vz, image_size)
    return family.stock_tokens_per_image(model_config, image_size)
