"""Qwen2.5-VL's benchmark shapes: its sizes (``vision_config`` / ``text_config`` entries of a
``qwen2_5_vl`` config.json), the FLOP model of a training step, and synthetic batches laid out as
its processor lays them out (what the family's benchmark hooks hand to ``visionzip_core.bench``)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from visionzip_core.config import VisionZipConfig
from visionzip_core.families.base import synthetic_text_lengths
from visionzip_core.families.flops import (
    Flops,
    LlamaShape,
    TrainableParts,
    attention_flops,
    linear_flops,
    llama_flops,
    matmul_flops,
)


@dataclass(frozen=True)
class QwenBenchSize:
    """A Qwen2.5-VL size: ``vision`` and ``text`` are the ``vision_config`` / ``text_config`` entries
    of a ``qwen2_5_vl`` config.json (token ids are the tiny Qwen tokenizer's, added by ``Qwen2_5VL.bench_config``); ``image`` is the
    (H, W) of every benchmark image (the family's ``bench_image``). The other fields as in
    :class:`BenchSize`."""

    flop_model: ClassVar[bool] = True

    name: str
    vision: dict
    text: dict
    batch_size: int
    text_tokens: tuple[int, int]
    dtype: str
    image: tuple[int, int] = (448, 448)
    note: str = ""
    gpu_only: bool = False

    def quick(self) -> QwenBenchSize:
        """Smoke variant: 2 vision blocks (the last full-attention), 1 LLM layer, same widths, batch 1."""
        depth = min(self.vision["depth"], 2)
        return replace(
            self,
            name=f"{self.name}-quick",
            vision={**self.vision, "depth": depth, "fullatt_block_indexes": [depth - 1]},
            text={**self.text, "num_hidden_layers": min(self.text["num_hidden_layers"], 1)},
            batch_size=1,
            note=f"QUICK (smoke only): {self.name} widths, {depth} vision blocks, 1 LLM layer, batch 1",
        )


_QWEN_VISION_COMMON = {
    "hidden_act": "silu",
    "in_channels": 3,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "tokens_per_second": 2,
}
_QWEN_TEXT_COMMON = {
    "hidden_act": "silu",
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},  # sums to head_dim / 2 = 64
    "rope_theta": 1000000.0,
    "use_sliding_window": False,
    "tie_word_embeddings": False,
}

QWEN_SIZES: dict[str, QwenBenchSize] = {
    "cpu": QwenBenchSize(
        name="cpu",
        # The 7B's vision geometry (patch 14, 2x2 merge, 112 px windows, windowed blocks with full
        # attention in every 4th and the last) at 8 blocks of 1/5 width (the 7B's MLP ratio, 3420 / 1280;
        # head dim 64 against the 7B's 80).
        vision={
            **_QWEN_VISION_COMMON,
            "depth": 8,
            "hidden_size": 256,
            "intermediate_size": 684,
            "num_heads": 4,
            "out_hidden_size": 768,
            "fullatt_block_indexes": [3, 7],
        },
        # Qwen2-layout LLM: head dim 128 (so the 7B's mrope_section fits), grouped KV, 4 layers; a
        # 16k vocabulary (the 7B's 152k LM head would be most of a CPU step).
        text={
            **_QWEN_TEXT_COMMON,
            "hidden_size": 768,
            "intermediate_size": 4096,
            "num_hidden_layers": 4,
            "num_attention_heads": 6,
            "num_key_value_heads": 2,
            "vocab_size": 16384,
        },
        batch_size=2,
        text_tokens=(100, 150),
        dtype="float32",
        note="Qwen2.5-VL geometry at CPU scale: ViT 8 blocks x 256 (MLP 684, 4 heads, full attention in "
        "blocks 3 and 7, 112 px windows) + 2x2 merger + Qwen2 LLM 4 layers x 768 (MLP 4096, 6 heads, "
        "2 KV heads, head dim 128, M-RoPE), vocab 16384; 448 px images (256 merged tokens)",
    ),
    "qwen2.5-vl-7b": QwenBenchSize(
        name="qwen2.5-vl-7b",
        vision={
            **_QWEN_VISION_COMMON,
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "out_hidden_size": 3584,
            "fullatt_block_indexes": [7, 15, 23, 31],
        },
        text={
            **_QWEN_TEXT_COMMON,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "vocab_size": 152064,
        },
        batch_size=2,
        text_tokens=(100, 150),
        dtype="bfloat16",
        note="Qwen2.5-VL-7B shapes (ViT 32 x 1280, full attention in blocks 7/15/23/31; Qwen2 28 x 3584, "
        "28 heads, 4 KV heads, vocab 152064), 448 px images (256 merged tokens), bf16; GPU only",
        gpu_only=True,
    ),
}


def qwen_vision_flops(
    vision_config: Any, num_images: int, image_hw: tuple[int, int], *, trainable: bool
) -> tuple[Flops, Flops]:
    """Qwen2.5-VL's vision tower and merger over ``num_images`` images of ``image_hw`` px (already
    a multiple of the merge unit, as the processor resizes), by the config's shapes.

    Patch embedding (a ``3 * 2 * p * p -> H`` product per patch), each block's ``qkv`` and ``proj``,
    its gated MLP (gate, up, down), attention within 112 px windows in the windowed blocks and over
    the whole image in ``fullatt_block_indexes``; then the merger (``4H -> 4H -> out``) over the
    merged tokens. A frozen tower runs forward only, and its merger still trains (the projector).

    Returns:
        ``(tower, merger)`` :class:`Flops`.
    """
    v = vision_config
    rows, cols = image_hw[0] // v.patch_size, image_hw[1] // v.patch_size
    patches = num_images * rows * cols
    d, inner, heads = v.hidden_size, v.intermediate_size, v.num_heads
    head_dim = d // heads
    grad = trainable
    patch = linear_flops(
        patches,
        v.in_channels * v.temporal_patch_size * v.patch_size**2,
        d,
        grad_input=False,
        grad_weight=grad,
    )
    per_window = v.window_size // v.patch_size  # patches per window side
    windows = -(-rows // per_window) * -(-cols // per_window)
    window_len = min(per_window**2, rows * cols)

    def block(full: bool) -> Flops:
        out = linear_flops(patches, d, 3 * d, grad_input=grad, grad_weight=grad)
        out = out + linear_flops(patches, d, d, grad_input=grad, grad_weight=grad)
        for d_in, d_out in ((d, inner), (d, inner), (inner, d)):
            out = out + linear_flops(patches, d_in, d_out, grad_input=grad, grad_weight=grad)
        if full:
            return out + attention_flops(num_images, heads, rows * cols, rows * cols, head_dim, grad=grad)
        return out + attention_flops(num_images * windows, heads, window_len, window_len, head_dim, grad=grad)

    total = patch
    for index in range(v.depth):
        total = total + block(index in v.fullatt_block_indexes)
    merged = patches // v.spatial_merge_size**2
    unit = d * v.spatial_merge_size**2
    # The merger trains (projector), its norm ``ln_q`` included, so even its first linear passes a
    # gradient back to that norm's weight.
    merger = linear_flops(merged, unit, unit, grad_input=True, grad_weight=True) + linear_flops(
        merged, unit, v.out_hidden_size, grad_input=True, grad_weight=True
    )
    return total, merger


def qwen_visionzip_flops(
    vision_config: Any,
    num_images: int,
    image_hw: tuple[int, int],
    split: tuple | None,
    channels: int,
    *,
    grad: bool,
) -> Flops:
    """VisionZip's own products on ``num_images`` images of ``image_hw`` px at budget ``split``
    (``(dominant_ratio, contextual_ratio)`` or counts per image; None: stock, nothing), as the Qwen
    adapter runs them per image (scores and keys come from the frozen block: forward only; the merge
    passes a gradient back to the merger's outputs when ``grad``, the merger or tower trained):

    - the score: the last block's ``Q K^T`` recomputed per head over the image's ``N`` patches (that
      block attends to the whole image in every released size), ``heads * N^2 * head_dim``;
    - the similarity of the other merged tokens' head-mean keys to the contextual targets,
      ``(others, head_dim) @ (head_dim, contextual)``;
    - the merge, ``(contextual, others) @ (others, channels)``: ``channels`` the merger's output
      width (times the levels merged with it, Qwen3-VL's DeepStack).
    """
    if split is None:
        return Flops()
    v = vision_config
    patches = (image_hw[0] // v.patch_size) * (image_hw[1] // v.patch_size)
    merged = patches // v.spatial_merge_size**2
    heads = v.num_heads
    head_dim = v.hidden_size // heads
    if isinstance(split[0], float):
        budget = VisionZipConfig(dominant_ratio=split[0], contextual_ratio=split[1])
    else:
        budget = VisionZipConfig(dominant=split[0], contextual=split[1])
    dominant, contextual = budget.split_for(merged)
    others = merged - dominant - contextual
    forward = heads * matmul_flops(patches, head_dim, patches)
    merge = matmul_flops(contextual, others, channels) if contextual else 0
    if contextual:
        forward += matmul_flops(others, head_dim, contextual) + merge
    return Flops(num_images * forward, num_images * merge if grad else 0)


def qwen_step_flops(
    config: Any,
    parts: TrainableParts,
    *,
    num_images: int,
    image_hw: tuple[int, int],
    seq_len: int,
    image_tokens: int,
    split: tuple | None = None,
    logits_positions: int | None = None,
) -> dict[str, Flops]:
    """Matmul FLOPs of one Qwen2.5-VL training step, one image of ``image_hw`` per sample, by part
    (``logits_positions``: as :func:`llama_flops`; 1 with nothing trained is ``generate``'s prefill).

    The LLM is a Qwen2 decoder, counted as :func:`llama_flops` counts a Llama one (the same matmuls;
    its q/k/v biases are element-wise). VisionZip compresses after the merger, so the tower and
    merger see every patch at every budget and only the LLM's ``seq_len`` (padded, ``image_tokens``
    per sample included) shrinks; VisionZip's own products at budget ``split`` (None: stock) are
    :func:`qwen_visionzip_flops`.

    Returns:
        ``{"vision", "visionzip", "projector", "llm", "total"}`` -> :class:`Flops`.
    """
    v = config.vision_config
    vision, merger = qwen_vision_flops(v, num_images, image_hw, trainable=parts.vision)
    grad = parts.projector or parts.vision
    visionzip = qwen_visionzip_flops(v, num_images, image_hw, split, v.out_hidden_size, grad=grad)
    llm = llama_flops(
        LlamaShape.from_config(config.text_config), num_images, seq_len, parts, logits_positions
    )
    out = {"vision": vision, "visionzip": visionzip, "projector": merger, "llm": llm}
    out["total"] = vision + visionzip + merger + llm
    return out


def qwen_synthetic_batch(
    size: QwenBenchSize, config, image_tokens: int, device: str | torch.device = "cpu", seed: int = 0
) -> dict[str, torch.Tensor]:
    """A right-padded Qwen2.5-VL training batch laid out as the LLaVA benchmark rows (``clip_llama.synthetic_batch``):
    prompt ``<|vision_start|><|image_pad|>*K<|vision_end|>`` question answer, one
    :attr:`QwenBenchSize.image` image each, with ``pixel_values`` as the processor flattens them
    (``[patches, 3 * 2 * 14 * 14]``) and ``image_grid_thw``. Text ids are drawn from the tiny
    tokenizer's BPE range (below its specials), identical for every ``image_tokens``."""
    gen = torch.Generator().manual_seed(seed)
    v = config.vision_config
    first_special = min(config.image_token_id, config.vision_start_token_id, config.text_config.bos_token_id)
    rows, labels = [], []
    for n in synthetic_text_lengths(size, seed):
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
