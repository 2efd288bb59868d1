"""Visual-token budgets of the benchmarks: the tables each family sweeps, their parsing and labels,
switching a model to one, and what one image costs at one (:class:`ImagePlan`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from visionzip_core import remove_visionzip, visionzip
from visionzip_core.bench.sizes import NEXT_IMAGE, QWEN_IMAGE
from visionzip_core.config import VisionZipConfig
from visionzip_core.families import family_for
from visionzip_core.families.llava_next import crops_per_image

# Visual tokens per image -> (dominant, contextual); None is the stock model (compression off).
BUDGETS: dict[int, tuple[int, int] | None] = {576: None, 192: (162, 30), 128: (108, 20), 64: (54, 10)}
# LLaVA-NeXT: visual tokens per crop (the paper's 640 / 320 / 160 for a 5-crop image), split in the
# proportion of the paper's 54 + 10; 576 is the stock model (every patch of every crop, unpadded,
# one newline per row).
NEXT_BUDGETS: dict[int, tuple[int, int] | None] = {576: None, 128: (108, 20), 64: (54, 10), 32: (27, 5)}


# Qwen2.5-VL: budgets are fractions of each image's merged tokens, keyed by the percent kept, split as
# (dominant_ratio, contextual_ratio); 100 is the stock model. 70 = the authors' default (0.65 + 0.05),
# 50 = their README's 0.45 + 0.05.
QWEN_BUDGETS: dict[int, tuple[float, float] | None] = {
    100: None,
    70: (0.65, 0.05),
    50: (0.45, 0.05),
    25: (0.20, 0.05),
}


def budgets_for(family: str) -> dict:
    if family == "qwen2.5-vl":
        return QWEN_BUDGETS
    return NEXT_BUDGETS if family == "llava-next" else BUDGETS


def stock_budget(budgets: dict) -> int:
    """The key of the stock model (compression off) in a budget table: 576, or 100 (percent) for qwen."""
    return next(k for k, split in budgets.items() if split is None)


def set_budget(model: torch.nn.Module, tokens: int, budgets: dict | None = None) -> None:
    """Switch ``model`` (LLaVA, possibly peft-wrapped) to ``tokens`` visual tokens per image (per
    crop with ``budgets=NEXT_BUDGETS``)."""
    split = (budgets or BUDGETS)[tokens]
    remove_visionzip(model)
    if split is None:
        return
    if isinstance(split[0], float):  # Qwen2.5-VL: fractions of each image's merged tokens
        visionzip(model, dominant_ratio=split[0], contextual_ratio=split[1])
    else:
        visionzip(model, dominant=split[0], contextual=split[1])


def parse_budgets(text: str, allowed: dict | None = None) -> list[int]:
    """``"576,64"`` -> ``[576, 64]``; each from ``allowed`` (:data:`BUDGETS`), the stock budget (the
    reference: 576, or 100 for :data:`QWEN_BUDGETS`) present."""
    allowed = BUDGETS if allowed is None else allowed
    stock = stock_budget(allowed)
    try:
        budgets = [int(b) for b in text.split(",")]
    except ValueError:
        raise ValueError(f"--budgets: {text!r} is not a comma-separated list of integers") from None
    bad = [b for b in budgets if b not in allowed]
    if bad or stock not in budgets:
        raise ValueError(
            f"--budgets: {bad or f'missing {stock}'}; allowed {list(allowed)} and {stock} (the reference) "
            "must be in"
        )
    return budgets


def budget_label(row: dict) -> str:
    """A result row's budget for tables: ``64`` (LLaVA-1.5), ``64/crop = 320`` (LLaVA-NeXT), with
    `` (stock)`` on the reference row."""
    if row.get("budget_kind") == "percent":  # Qwen2.5-VL: 178 (70%)
        return f"{row['image_tokens']} ({row['tokens']}%)" + ("" if row["split"] else " (stock)")
    crops = row.get("crops_per_image", 1)
    label = str(row["tokens"]) if crops == 1 else f"{row['tokens']}/crop = {row['image_tokens']}"
    return label + ("" if row["split"] else " (stock)")


@dataclass(frozen=True)
class ImagePlan:
    """What one image costs at one budget: ``crops`` through the tower, ``projected`` tokens through
    the projector, ``llm`` tokens in the LLM sequence."""

    crops: int
    projected: int
    llm: int


def image_plan(config, family: str, tokens: int, budgets: dict | None = None) -> ImagePlan:
    """The :class:`ImagePlan` of the benchmark image at budget ``tokens`` (per image for LLaVA-1.5,
    per crop for LLaVA-NeXT, which feeds :data:`NEXT_IMAGE`, percent of the merged tokens of a
    :data:`QWEN_IMAGE` for Qwen2.5-VL), counted by the model's family.
    ``budgets`` (default :func:`budgets_for`) maps ``tokens`` to its split, as in :func:`set_budget`."""
    split = (budgets or budgets_for(family))[tokens]
    fam = family_for(family)
    if family == "qwen2.5-vl":  # compression runs after the merger: the merger sees every token
        stock = fam.stock_tokens_per_image(config, QWEN_IMAGE)
        if split is None:
            return ImagePlan(1, stock, stock)
        vz = VisionZipConfig(dominant_ratio=split[0], contextual_ratio=split[1])
        return ImagePlan(1, stock, fam.compressed_tokens_per_image(config, vz, QWEN_IMAGE))
    if family != "llava-next":
        return ImagePlan(1, tokens, tokens)
    crops = crops_per_image(config, NEXT_IMAGE)
    if split is None:
        patches = fam.tower_tokens(config) - 1  # "default": CLS dropped before the projector
        return ImagePlan(crops, crops * patches, fam.stock_tokens_per_image(config, NEXT_IMAGE))
    vz = VisionZipConfig(dominant=split[0], contextual=split[1])
    n = fam.compressed_tokens_per_image(config, vz, NEXT_IMAGE)
    return ImagePlan(crops, n, n)
