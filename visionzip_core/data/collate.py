"""Batching: right padding (DataCollator) or several samples per row (PackingCollator), ignored
labels on padding, images in the order their tokens appear."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from visionzip_core.data.encode import IGNORE_INDEX

# Per-image (per-video) tensors of an item, concatenated along dim 0 in batch order: the order in
# which the model meets the image-token (video-token) runs. Qwen2.5-VL's are patch rows and
# ``(t, h, w)`` grids; ``second_per_grid_ts`` is one float per video. A frame video processor's
# (LLaVA-OneVision's) are frames and ``video_frames``, one frame count per video; its
# ``batch_num_images`` holds one count per sample with images.
VISUAL_KEYS = (
    "pixel_values",
    "image_sizes",
    "batch_num_images",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "second_per_grid_ts",
    "video_frames",
)


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
        for key in VISUAL_KEYS:
            parts = [item[key] for item in items if key in item]
            if parts:
                out[key] = torch.cat(parts, dim=0)
        return out


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of item positions whose lengths sum to at most ``capacity``, as few and as even as can be.

    First-fit decreasing gives R rows. The items are then dealt again, longest first, each to the
    least-filled of R rows where it fits: rows are padded to the longest one, so even rows waste
    the least. The even deal is kept when it needs no more rows and its longest row is no longer
    than first-fit's. Ties break by position: the result depends only on ``lengths``. Each row
    lists its items in their original order.
    """
    if any(n > capacity for n in lengths):
        raise ValueError(f"a sample of {max(lengths)} tokens does not fit a row of {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))

    def deal(rows: list[list[int]], pick) -> list[list[int]]:
        loads = [sum(lengths[i] for i in row) for row in rows]
        for i in order:
            fits = [r for r in range(len(rows)) if loads[r] + lengths[i] <= capacity]
            if not fits:
                rows.append([])
                loads.append(0)
                fits = [len(rows) - 1]
            r = pick(fits, loads)
            rows[r].append(i)
            loads[r] += lengths[i]
        return rows

    first_fit = deal([], lambda fits, loads: fits[0])
    even = deal([[] for _ in first_fit], lambda fits, loads: min(fits, key=lambda r: (loads[r], r)))

    def cost(rows):
        return len(rows), max(sum(lengths[i] for i in row) for row in rows)

    best = even if cost(even) <= cost(first_fit) else first_fit
    return [sorted(row) for row in best if row]


@dataclass(frozen=True)
class PackingCollator:
    """List of dataset items -> rows that each hold several whole samples, back to back.

    Shapes: ``input_ids``/``labels``/``position_ids``: ``[R, L]``, R rows of at most
    ``max_tokens_per_row`` tokens (L: the longest row, rounded up to ``pad_to_multiple_of``);
    ``pixel_values``: the images (crops) of all samples in the order their image-token runs appear
    row by row; ``image_sizes`` and the videos' tensors likewise; ``num_tokens``: a 0-d tensor, the real (non-padding) tokens.

    There is no ``attention_mask``: ``position_ids`` restart at 0 with every sample, and transformers
    reads the sample boundaries from them, so no token attends across samples. Trailing padding is
    a segment of its own. SDPA and eager read them in every row (a block-diagonal mask per row).
    flash-attention reads them only from a batch of ONE row (its varlen path): with ``one_row`` the
    rows are laid end to end in a single row ``[1, sum of the samples' lengths]``, as
    transformers' ``DataCollatorWithFlattening`` does; several rows there would attend across samples.
    Each sample's first label is ignored: unpacked, nothing predicts it either (labels shift by one),
    so the summed token loss is the same as an unpacked batch's.
    """

    pad_token_id: int
    max_tokens_per_row: int
    ignore_index: int = IGNORE_INDEX
    pad_to_multiple_of: int | None = None
    one_row: bool = False

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        lengths = [len(item["input_ids"]) for item in items]
        rows = pack_rows(lengths, self.max_tokens_per_row)
        if self.one_row:  # the rows back to back, without the padding that evened them
            rows = [[i for row in rows for i in row]]
        longest = max(sum(lengths[i] for i in row) for row in rows)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        shape = (len(rows), longest)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        labels = torch.full(shape, self.ignore_index, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        visual: dict[str, list[torch.Tensor]] = {}
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                item, n = items[i], lengths[i]
                input_ids[r, at : at + n] = item["input_ids"]
                labels[r, at : at + n] = item["labels"]
                labels[r, at] = self.ignore_index
                position_ids[r, at : at + n] = torch.arange(n)
                for key in VISUAL_KEYS:
                    if key in item:
                        visual.setdefault(key, []).append(item[key])
                at += n
            position_ids[r, at:] = torch.arange(longest - at)
        out = {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "num_tokens": torch.tensor(sum(lengths)),
        }
        for key, parts in visual.items():
            out[key] = torch.cat(parts, dim=0)
        return out
