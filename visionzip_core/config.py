"""VisionZip settings, validated, and how they are recorded on a transformers config."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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
    dominant_ratio: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Towers whose token count follows the image size (qwen2.5-vl): dominant tokens as a "
        "fraction of each image's merged tokens, floored (at least 1). Overrides dominant.",
    )
    contextual_ratio: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="With dominant_ratio: contextual tokens as a fraction of each image's merged tokens, "
        "floored, at least 1 unless 0. Overrides contextual.",
    )

    @model_validator(mode="after")
    def _ratios_together(self) -> VisionZipConfig:
        if (self.dominant_ratio is None) != (self.contextual_ratio is None):
            given = "dominant_ratio" if self.contextual_ratio is None else "contextual_ratio"
            raise ValueError(
                f"visionzip.{given}: give dominant_ratio and contextual_ratio together (or neither)"
            )
        if self.uses_ratios and self.dominant_ratio + self.contextual_ratio > 1:
            raise ValueError(
                f"visionzip.dominant_ratio + contextual_ratio = "
                f"{self.dominant_ratio + self.contextual_ratio:g} keeps more than every token (must be <= 1)"
            )
        return self

    @property
    def uses_ratios(self) -> bool:
        """Whether the split is a fraction of each image's tokens rather than fixed counts."""
        return self.dominant_ratio is not None

    @property
    def tokens_per_image(self) -> int:
        """``dominant + contextual``: the fixed count per image (or crop) of a count split."""
        if self.uses_ratios:
            raise ValueError("visionzip: a ratio split has no fixed count per image; see split_for()")
        return self.dominant + self.contextual

    def split_for(self, num_tokens: int, what: str = "an image") -> tuple[int, int]:
        """``(dominant, contextual)`` for one image (or video frame group) of ``num_tokens`` tokens.

        Ratios are floored as the authors' Qwen2.5-VL code does (``int(ratio * N)``), with at least
        one dominant token and at least one contextual token unless ``contextual_ratio`` is 0.
        Raises ``ValueError`` naming ``what`` when the image is too small for the budget.
        """
        if self.uses_ratios:
            dominant = max(1, int(self.dominant_ratio * num_tokens))
            contextual = 0 if self.contextual_ratio == 0 else max(1, int(self.contextual_ratio * num_tokens))
        else:
            dominant, contextual = self.dominant, self.contextual
        if dominant + contextual > num_tokens:
            raise ValueError(
                f"visionzip: {what} has {num_tokens} visual tokens, too few for dominant + contextual = "
                f"{dominant + contextual}; use a larger image (or min_pixels) or a smaller split"
            )
        return dominant, contextual

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


def one_line(err: ValueError) -> str:
    """A settings error as one line: pydantic's ``ValidationError`` as ``visionzip.<field>: <why>``
    per problem, anything else as its text."""
    errors = getattr(err, "errors", None)
    if not callable(errors):
        return " ".join(str(err).split())
    parts = []
    for item in errors():
        field = ".".join(str(x) for x in item.get("loc", ()))
        why = str(item.get("msg", "")).removeprefix("Value error, ")
        parts.append(why if why.startswith("visionzip.") or not field else f"visionzip.{field}: {why}")
    return "; ".join(parts)


def allowed_values(field: str) -> str:
    """What :class:`VisionZipConfig`'s ``field`` accepts, in words, from its declaration (type and
    bounds): ``"an integer >= 1"``, ``"a number in (0, 1]"``, ``"'paper' or 'mean'"``."""
    info = VisionZipConfig.model_fields[field]
    # annotated_types' Ge(ge=1), Gt(gt=0), ...: the class name and its one field, named alike.
    bounds = {type(m).__name__: getattr(m, type(m).__name__.lower()) for m in info.metadata}
    annotation = info.annotation
    if getattr(annotation, "__origin__", None) is Literal:
        return " or ".join(repr(v) for v in annotation.__args__)
    if annotation is bool:
        return "True or False"
    if annotation is int:
        limits = [f"{op} {bounds[name]:g}" for name, op in (("Ge", ">="), ("Gt", ">")) if name in bounds]
        return " ".join(["an integer", *limits])
    low = "(" if "Gt" in bounds else "["
    high = ")" if "Lt" in bounds else "]"
    lo, hi = bounds.get("Gt", bounds.get("Ge")), bounds.get("Lt", bounds.get("Le"))
    return f"a number in {low}{lo:g}, {hi:g}{high}"


def config_from_arguments(call: str, **arguments: Any) -> VisionZipConfig:
    """:class:`VisionZipConfig` from a library call's keyword ``arguments``; a bad value raises a
    one-line ``ValueError`` naming ``call``, the argument, its value and what it accepts
    (``visionzip(dominant_ratio=1.5): must be a number in (0, 1]``), every bad argument on the same
    line, instead of pydantic's multi-line report."""
    try:
        return VisionZipConfig(**arguments)
    except ValueError as err:  # pydantic's ValidationError is one
        errors = err.errors() if callable(getattr(err, "errors", None)) else []
        parts = []
        for item in errors:
            loc = item.get("loc", ())
            if loc and loc[0] in VisionZipConfig.model_fields:
                name = loc[0]
                parts.append(f"{call}({name}={arguments.get(name)!r}): must be {allowed_values(name)}")
            else:  # a rule across fields: its message names them
                why = str(item.get("msg", "")).removeprefix("Value error, ").removeprefix("visionzip.")
                parts.append(f"{call}: {why}")
        raise ValueError("; ".join(parts) or one_line(err)) from None


def settings_from_flags(
    recorded: VisionZipConfig | None, default: dict[str, Any], **flags: Any
) -> VisionZipConfig:
    """The split a command runs at: each of ``dominant``, ``contextual``, ``dominant_ratio`` and
    ``contextual_ratio`` given in ``flags`` (None = left out) replaces the checkpoint's
    ``recorded`` settings, else ``default`` (the family's budget, its ``feature_layer`` included).
    Counts given replace recorded ratios and the other way round, so a flag never mixes with the
    other form. Raises ``ValueError`` (one per bad field, see :func:`one_line`)."""
    base = recorded.model_dump() if recorded is not None else dict(default)
    counts = {k: flags.get(k) for k in ("dominant", "contextual")}
    ratios = {k: flags.get(k) for k in ("dominant_ratio", "contextual_ratio")}
    chosen = {k: v for k, v in counts.items() if v is not None}
    if any(v is not None for v in ratios.values()):
        chosen |= ratios
    elif chosen:
        chosen |= {"dominant_ratio": None, "contextual_ratio": None}
    return VisionZipConfig(**(base | chosen))


def add_budget_flags(parser) -> None:
    """The budget flags every command takes (``--dominant``/``--contextual`` counts, or
    ``--dominant-ratio``/``--contextual-ratio``), all defaulting to None: left out, the checkpoint's
    recorded split or the family's budget applies (:func:`settings_from_flags`)."""
    parser.add_argument(
        "--dominant",
        type=int,
        default=None,
        help="tokens kept by attention per image, CLS included (default: the recorded split or the family's)",
    )
    parser.add_argument(
        "--contextual",
        type=int,
        default=None,
        help="merged tokens built from the rest (default: the recorded split or the family's)",
    )
    parser.add_argument(
        "--dominant-ratio",
        type=float,
        default=None,
        help="dominant tokens as a fraction of each image's tokens (families whose count follows the "
        "image size: qwen2-vl, qwen2.5-vl)",
    )
    parser.add_argument(
        "--contextual-ratio",
        type=float,
        default=None,
        help="contextual tokens as a fraction (as --dominant-ratio)",
    )
