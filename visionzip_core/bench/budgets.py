"""Visual-token budgets of the benchmarks: the table each family sweeps (its ``bench_budgets``),
their parsing and labels, switching a model to one, and what one image costs at one
(:class:`ImagePlan`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from visionzip_core import remove_visionzip, visionzip
from visionzip_core.config import VisionZipConfig
from visionzip_core.families import FAMILIES, family_for


def budgets_for(family: str) -> dict:
    """The budget table ``family``'s benchmarks sweep (``ModelFamily.bench_budgets``)."""
    return family_for(family).bench_budgets


def budget_unit(family: str) -> str:
    """What a budget of ``family``'s table counts: percent of each image's tokens kept (a family that
    takes ratios), visual tokens per crop (a tiled family, whose count depends on the image size)
    or per image."""
    fam = family_for(family)
    if fam.takes_ratios:
        return "percent kept"
    return "per crop" if fam.count_depends_on_size else "per image"


def budgets_help() -> str:
    """The bench scripts' ``--budgets`` help: each benchmarked family's table and unit, from the
    registry (no percent sign: argparse formats help strings)."""
    tables = [
        f"{fam.name} ({budget_unit(fam.name)}) {','.join(map(str, fam.bench_budgets))}"
        for fam in FAMILIES
        if fam.bench_sizes is not None
    ]
    return "visual-token budgets, the stock one included; default: the family's whole table: " + "; ".join(
        tables
    )


def stock_budget(budgets: dict) -> int:
    """The key of the stock model (compression off) in a budget table: 576, or 100 (percent) for qwen."""
    return next(k for k, split in budgets.items() if split is None)


def split_config(split: tuple | None) -> VisionZipConfig | None:
    """The :class:`VisionZipConfig` of a budget table's split: counts, or ratios of each image's
    tokens (floats); None for the stock model."""
    if split is None:
        return None
    if isinstance(split[0], float):
        return VisionZipConfig(dominant_ratio=split[0], contextual_ratio=split[1])
    return VisionZipConfig(dominant=split[0], contextual=split[1])


def set_budget(model: torch.nn.Module, tokens: int, budgets: dict) -> None:
    """Switch ``model`` (possibly peft-wrapped) to budget ``tokens`` of the table ``budgets``."""
    split = budgets[tokens]
    remove_visionzip(model)
    if split is None:
        return
    if isinstance(split[0], float):  # fractions of each image's tokens
        visionzip(model, dominant_ratio=split[0], contextual_ratio=split[1])
    else:
        visionzip(model, dominant=split[0], contextual=split[1])


def parse_budgets(text: str, allowed: dict) -> list[int]:
    """``"576,64"`` -> ``[576, 64]``; each from the table ``allowed``, its stock budget (the
    reference: 576, or 100 for a percent table) present."""
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
    """The :class:`ImagePlan` of the family's benchmark image (``bench_image``) at budget ``tokens``,
    counted by the family (``token_plan``). ``budgets`` (default :func:`budgets_for`) maps ``tokens``
    to its split, as in :func:`set_budget`."""
    fam = family_for(family)
    split = (budgets or fam.bench_budgets)[tokens]
    return ImagePlan(*fam.token_plan(config, split_config(split), fam.bench_image))
