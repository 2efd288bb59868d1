"""The kept-token overlay of a few fixed validation images, for wandb at each evaluation.

The same picture as ``scripts/show_tokens.py`` (:mod:`visionzip_core.token_overlay`), drawn from the
model being trained: the first ``wandb.token_overlays`` images of ``data.val`` (fixed, so the
pictures compare from one evaluation to the next), with the budget's token counts.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from visionzip_core.evaluation import load_eval_samples
from visionzip_core.families import family_for
from visionzip_core.token_overlay import budget_line, crop_pictures, draw_token_map, select_image, token_map
from visionzip_core.training.schema import Settings


def overlay_image_paths(settings: Settings) -> list[Path]:
    """The first ``wandb.token_overlays`` distinct images of the validation sources (none when off)."""
    limit = settings.wandb.token_overlays
    if not limit or not settings.visionzip.enabled or not settings.wandb.enabled:
        return []
    paths: list[Path] = []
    for source in settings.data.val:
        for sample in load_eval_samples(source.path, source.image_folder or "."):
            paths += [p for p in sample.images if p not in paths]
            if len(paths) >= limit:
                return paths[:limit]
    return paths


@torch.no_grad()
def token_overlays(model, image_processor, settings: Settings, paths: list[Path]) -> tuple[list, dict]:
    """``([(picture, caption), ...], token counts)`` for ``paths`` through ``model``'s own selection.

    Under ZeRO-3 the tower's forward gathers parameters: ALL RANKS must call this with the same paths.
    """
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    family = family_for(inner)
    vz = settings.visionzip
    tower = family.tower_tokens(inner.config)
    was_training = inner.training
    inner.eval()
    pictures: list[tuple[Image.Image, str]] = []
    crops = []
    try:
        for path in paths:
            image = select_image(inner, image_processor, str(path), settings.data.image_aspect_ratio)
            tokens = token_map(image)
            summary = budget_line(vz, tower, tokens.n_crops)
            crops.append(tokens.n_crops)
            drawn = draw_token_map(
                crop_pictures(image.crops, image_processor.image_mean, image_processor.image_std),
                tokens,
                [summary, path.name],
            )
            pictures.append((drawn, f"{path.name}: {summary}"))
    finally:
        inner.train(was_training)
    counts = {
        "dominant": vz.dominant,
        "contextual": vz.contextual,
        "kept_per_crop": vz.tokens_per_image,
        "tower_per_crop": tower - 1,
        "kept_per_image": vz.tokens_per_image * max(crops, default=1),
    }
    return pictures, counts
