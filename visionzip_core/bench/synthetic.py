"""Synthetic training batches for the benchmarks: right-padded rows laid out as the data pipeline
lays them out (prompt, image tokens, question, answer; labels on the answer only), with text
lengths fixed by a seed so that every budget sees the same text."""

from __future__ import annotations

import numpy as np
import torch

from visionzip_core.bench.sizes import BOS_TOKEN_ID, IMAGE_TOKEN_ID, PAD_TOKEN_ID, BenchSize, QwenBenchSize


def text_lengths(size: BenchSize, seed: int = 0) -> list[int]:
    """Per-sample text lengths, fixed by ``seed`` so that every budget sees the same text."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = size.text_tokens
    return torch.randint(lo, hi + 1, (size.batch_size,), generator=gen).tolist()


def mix665k_like_text_lengths(n: int, seed: int = 0, cap: int = 2048 - 576 - 1) -> list[int]:
    """Text tokens (besides the image's) of ``n`` one-image samples, shaped like LLaVA-665k.

    A stand-in, not fitted to the file: half the samples are single-turn and half multi-turn (2 to
    10 turns, as 665k's VQA sets group several questions about one picture); each turn is a
    question of about 15 tokens and an answer that is short (a word or a number, about 4 tokens)
    six times in ten and otherwise a sentence-to-paragraph reply (median 90 tokens); the system
    prompt and role markers add 40. So many samples are short and a tail is long: median about
    170 text tokens, 10th percentile 57, 90th 640, mean 267, capped at ``cap`` (a 2048-token sample with 576
    image tokens). Deterministic in ``seed``.
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        turns = 1 if rng.random() < 0.5 else int(rng.integers(2, 11))
        total = 40.0
        for _ in range(turns):
            total += rng.lognormal(np.log(15), 0.4)
            short = rng.random() < 0.6
            total += rng.lognormal(np.log(4), 0.5) if short else min(rng.lognormal(np.log(90), 0.7), 600)
        out.append(int(min(total, cap)))
    return out


def _llava_row(n: int, image_tokens: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample's ``(input_ids, labels)``, each ``[1 + image_tokens + n]``: ``<s>``, the first 20% of
    ``n`` random text tokens, ``<image>*image_tokens``, the rest; only the last 60% of the text (the
    answer) carries labels, as in LLaVA."""
    text = torch.randint(3, IMAGE_TOKEN_ID, (n,), generator=gen)
    before, answer_from = n // 5, n - (3 * n) // 5
    ids = torch.cat(
        [
            torch.tensor([BOS_TOKEN_ID]),
            text[:before],
            torch.full((image_tokens,), IMAGE_TOKEN_ID),
            text[before:],
        ]
    )
    labels = torch.full_like(ids, -100)
    offset = 1 + image_tokens + answer_from
    labels[offset:] = ids[offset:]
    return ids, labels


def synthetic_items(
    text_lengths: list[int],
    image_tokens: int,
    image_size: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """Dataset-like items (one image each), laid out as :func:`synthetic_batch`'s rows, for the
    real collators and samplers: ``input_ids``/``labels`` ``[n]``, ``pixel_values`` ``[1, 3, S, S]``."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for n in text_lengths:
        ids, labels = _llava_row(n, image_tokens, gen)
        pixels = torch.randn(1, 3, image_size, image_size, generator=gen).to(dtype)
        items.append({"input_ids": ids, "labels": labels, "pixel_values": pixels})
    return items


def synthetic_batch(
    size: BenchSize,
    image_tokens: int,
    device: str | torch.device = "cpu",
    seed: int = 0,
    image_hw: tuple[int, int] | None = None,
    crops: int = 1,
) -> dict[str, torch.Tensor]:
    """A right-padded LLaVA training batch: ``<s>`` prompt ``<image>*K`` question answer, one image each.

    The first 20% of each sample's text is the prompt before the image, the answer is the last
    60%; only answer tokens carry labels (image, prompt and padding are -100), as in LLaVA.
    The text tokens are identical for every ``image_tokens``. For LLaVA-NeXT (``image_hw`` given)
    each image is ``crops`` crops and the batch carries ``image_sizes``.
    """
    gen = torch.Generator().manual_seed(seed)
    lengths = text_lengths(size, seed)
    rows, labels = [], []
    for n in lengths:
        ids, lab = _llava_row(n, image_tokens, gen)
        rows.append(ids)
        labels.append(lab)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD_TOKEN_ID)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    label_t = torch.full((len(rows), width), -100)
    for i, (r, lab) in enumerate(zip(rows, labels)):
        input_ids[i, : len(r)] = r
        attention_mask[i, : len(r)] = 1
        label_t[i, : len(r)] = lab
    pixel_gen = torch.Generator().manual_seed(seed + 1)
    v = size.vision
    pixel_values = torch.randn(len(rows) * crops, 3, v.image_size, v.image_size, generator=pixel_gen)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": label_t,
        "pixel_values": pixel_values.to(getattr(torch, size.dtype)),
    }
    if image_hw is not None:
        batch["image_sizes"] = torch.tensor([list(image_hw)] * len(rows))
    return {k: t.to(device) for k, t in batch.items()}


def qwen_synthetic_batch(
    size: QwenBenchSize, config, image_tokens: int, device: str | torch.device = "cpu", seed: int = 0
) -> dict[str, torch.Tensor]:
    """A right-padded Qwen2.5-VL training batch laid out as :func:`synthetic_batch`'s rows:
    prompt ``<|vision_start|><|image_pad|>*K<|vision_end|>`` question answer, one
    :attr:`QwenBenchSize.image` image each, with ``pixel_values`` as the processor flattens them
    (``[patches, 3 * 2 * 14 * 14]``) and ``image_grid_thw``. Text ids are drawn from the tiny
    tokenizer's BPE range (below its specials), identical for every ``image_tokens``."""
    gen = torch.Generator().manual_seed(seed)
    v = config.vision_config
    first_special = min(config.image_token_id, config.vision_start_token_id, config.text_config.bos_token_id)
    rows, labels = [], []
    for n in text_lengths(size, seed):
        text = torch.randint(0, first_special, (n,), generator=gen)
        before, answer_from = n // 5, n - (3 * n) // 5
        ids = torch.cat(
            [
                text[:before],
                torch.tensor([config.vision_start_token_id]),
                torch.full((image_tokens,), config.image_token_id),
                torch.tensor([config.vision_end_token_id]),
                text[before:],
            ]
        )
        lab = torch.full_like(ids, -100)
        offset = before + image_tokens + 2 + (answer_from - before)
        lab[offset:] = ids[offset:]
        rows.append(ids)
        labels.append(lab)
    width = max(len(r) for r in rows)
    pad = config.text_config.pad_token_id
    input_ids = torch.full((len(rows), width), pad)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    label_t = torch.full((len(rows), width), -100)
    for i, (r, lab) in enumerate(zip(rows, labels)):
        input_ids[i, : len(r)] = r
        attention_mask[i, : len(r)] = 1
        label_t[i, : len(r)] = lab
    grid = [1, size.image[0] // v.patch_size, size.image[1] // v.patch_size]
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size * v.patch_size
    pixel_gen = torch.Generator().manual_seed(seed + 1)
    pixel_values = torch.randn(len(rows) * grid[1] * grid[2], patch_dim, generator=pixel_gen)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": label_t,
        "pixel_values": pixel_values.to(getattr(torch, size.dtype)),
        "image_grid_thw": torch.tensor([grid] * len(rows)),
    }
    return {k: t.to(device) for k, t in batch.items()}


def benchmark_batch(
    size: BenchSize | QwenBenchSize,
    config,
    plan,
    device: str | torch.device = "cpu",
    seed: int = 0,
    image_hw: tuple[int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """The synthetic batch of ``size``'s layout with ``plan.llm`` image tokens per image
    (``plan``: a :class:`~visionzip_core.bench.budgets.ImagePlan`): :func:`qwen_synthetic_batch`
    for a :class:`QwenBenchSize`, else :func:`synthetic_batch` with ``plan.crops`` crops per image
    of ``image_hw`` (the family's ``bench_image``; None: one crop, no ``image_sizes``)."""
    if isinstance(size, QwenBenchSize):
        return qwen_synthetic_batch(size, config, plan.llm, device, seed=seed)
    return synthetic_batch(size, plan.llm, device, seed=seed, image_hw=image_hw, crops=plan.crops)
