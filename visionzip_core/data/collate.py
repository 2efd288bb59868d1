"""Batching: right padding, attention mask, ignored labels on padding, stacked images."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from visionzip_core.data.encode import IGNORE_INDEX


@dataclass(frozen=True)
class DataCollator:
    """List of dataset items -> ``{"input_ids", "attention_mask", "labels"[, "pixel_values"]}``.

    Shapes: ``input_ids``/``attention_mask``/``labels``: ``[B, T_max]`` (padded right to the longest,
    or up to a multiple of ``pad_to_multiple_of``); ``pixel_values``: ``[N, 3, H, W]``, the images (or, for a
    tiling model, the crops) of all samples concatenated in batch order (the order the model meets
    their image-token runs), present only when at least one sample has an image, so text-only and
    mixed batches both work; ``image_sizes``: ``[n_images, 2]`` when the items carry them.
    """

    pad_token_id: int
    ignore_index: int = IGNORE_INDEX
    pad_to_multiple_of: int | None = None

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        longest = max(len(item["input_ids"]) for item in items)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(items)
        input_ids = torch.full((batch, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, longest), self.ignore_index, dtype=torch.long)
        attention_mask = torch.zeros((batch, longest), dtype=torch.long)
        for b, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[b, :n] = item["input_ids"]
            labels[b, :n] = item["labels"]
            attention_mask[b, :n] = 1
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        images = [item["pixel_values"] for item in items if "pixel_values" in item]
        if images:
            out["pixel_values"] = torch.cat(images, dim=0)
        sizes = [item["image_sizes"] for item in items if "image_sizes" in item]
        if sizes:
            out["image_sizes"] = torch.cat(sizes, dim=0)
        return out
