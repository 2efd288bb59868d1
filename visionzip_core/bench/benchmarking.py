"""Pieces shared by the benchmarks in ``scripts/``: model sizes, random models, synthetic batches,
visual-token budgets, an interleaved schedule and peak-memory measurement.

Random weights are enough: compression changes shapes, not values, and step time and memory
depend only on shapes (VisionZip's selection is data-dependent, but its cost is not).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from visionzip_core import remove_visionzip, visionzip
from visionzip_core.bench.flops import LlamaShape, VisionTowerShape
from visionzip_core.config import VisionZipConfig
from visionzip_core.families import family_for
from visionzip_core.families.llava_next import crops_per_image
from visionzip_core.testing.tiny import (
    QWEN2_5_VL_CHAT_TEMPLATE,
    QWEN_SPECIAL_TOKENS,
    build_tiny_qwen_tokenizer,
    qwen_preprocessor_config,
)

# Visual tokens per image -> (dominant, contextual); None is the stock model (compression off).
BUDGETS: dict[int, tuple[int, int] | None] = {576: None, 192: (162, 30), 128: (108, 20), 64: (54, 10)}
# LLaVA-NeXT: visual tokens per crop (the paper's 640 / 320 / 160 for a 5-crop image), split in the
# proportion of the paper's 54 + 10; 576 is the stock model (every patch of every crop, unpadded,
# one newline per row).
NEXT_BUDGETS: dict[int, tuple[int, int] | None] = {576: None, 128: (108, 20), 64: (54, 10), 32: (27, 5)}
# The picture LLaVA-NeXT benchmarks feed: a square 672 px image picks the 2 x 2 tiling, so it is
# cut into 5 crops (base + 4 tiles), the common case for llava-v1.6 at 336 px crops.
NEXT_IMAGE = (672, 672)


# Qwen2.5-VL: budgets are fractions of each image's merged tokens, keyed by the percent kept, split as
# (dominant_ratio, contextual_ratio); 100 is the stock model. 70 = the authors' default (0.65 + 0.05),
# 50 = their README's 0.45 + 0.05.
QWEN_BUDGETS: dict[int, tuple[float, float] | None] = {
    100: None,
    70: (0.65, 0.05),
    50: (0.45, 0.05),
    25: (0.20, 0.05),
}
# The picture Qwen2.5-VL benchmarks feed: 448 x 448 px = 32 x 32 patches = 16 x 16 = 256 merged tokens
# (inside the processor's default min/max pixels, so it is not resized).
QWEN_IMAGE = (448, 448)


def budgets_for(family: str) -> dict:
    if family == "qwen2.5-vl":
        return QWEN_BUDGETS
    return NEXT_BUDGETS if family == "llava-next" else BUDGETS


def stock_budget(budgets: dict) -> int:
    """The key of the stock model (compression off) in a budget table: 576, or 100 (percent) for qwen."""
    return next(k for k, split in budgets.items() if split is None)


# llava-hf LLaVA-1.5 token ids (vocab 32064: Llama's 32000 + <image> + <pad> + padding to 64).
IMAGE_TOKEN_ID, PAD_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID = 32000, 32001, 1, 2

CLIP_L_336 = VisionTowerShape(
    hidden=1024, intermediate=4096, layers=24, heads=16, image_size=336, patch_size=14
)


@dataclass(frozen=True)
class BenchSize:
    """A model size and the workload run on it.

    Attributes:
        text_tokens: per-sample text length range ``[lo, hi]`` (drawn once per sample, fixed seed),
            besides the image tokens: a LLaVA-665k-like instruction + answer.
        batch_size: samples (one image each) per training step.
        dtype: "float32" on CPU (bf16 matmuls are slower on CPUs without bf16 units), "bfloat16" on GPU.
    """

    name: str
    vision: VisionTowerShape
    llm: LlamaShape
    batch_size: int
    text_tokens: tuple[int, int]
    dtype: str
    note: str = ""

    def quick(self) -> BenchSize:
        """A clearly smaller variant for smoke runs: 6 tower layers, 2 LLM layers, same widths."""
        return replace(
            self,
            name=f"{self.name}-quick",
            vision=replace(self.vision, layers=min(self.vision.layers, 6)),
            llm=replace(self.llm, layers=min(self.llm.layers, 2)),
            batch_size=1,
            note=f"QUICK (smoke only): {self.name} widths, 6 tower layers, 2 LLM layers, batch 1",
        )


SIZES: dict[str, BenchSize] = {
    "cpu": BenchSize(
        name="cpu",
        vision=CLIP_L_336,
        # Llama-2 layout at 1/4 width and 1/4 depth, full Llama-2 vocabulary.
        llm=LlamaShape(hidden=1024, intermediate=2816, layers=8, heads=16, kv_heads=16, vocab=32064),
        batch_size=2,
        text_tokens=(100, 150),
        dtype="float32",
        note="CLIP-L/336 tower (24 layers, 1024 wide) + Llama 8 layers x 1024 (MLP 2816, 16 heads, vocab 32064)",
    ),
    # The cpu size's LLM with a CLIP-L/336 tower at 1/4 width: the tower is about 1/8 of a step's
    # work, as at 7B (where it is 1/20), instead of 3/4 of it. For comparisons that change only the
    # LLM's work (packing), which a full tower beside a small LLM would hide.
    "cpu-llm": BenchSize(
        name="cpu-llm",
        vision=replace(CLIP_L_336, hidden=256, intermediate=1024, heads=4),
        llm=LlamaShape(hidden=1024, intermediate=2816, layers=8, heads=16, kv_heads=16, vocab=32064),
        batch_size=8,
        text_tokens=(100, 150),
        dtype="float32",
        note="CLIP-L/336 geometry at 1/4 width (24 layers x 256, 576 patches) + the cpu size's Llama "
        "(8 layers x 1024, vocab 32064)",
    ),
    "llava-1.5-7b": BenchSize(
        name="llava-1.5-7b",
        vision=CLIP_L_336,
        llm=LlamaShape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32064),
        batch_size=8,
        text_tokens=(100, 150),
        dtype="bfloat16",
        note="CLIP-L/336 + Llama-2-7B shapes (LLaVA-1.5-7B), bf16",
    ),
    "llava-next-7b": BenchSize(
        name="llava-next-7b",
        vision=CLIP_L_336,
        llm=LlamaShape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32064),
        batch_size=4,
        text_tokens=(100, 150),
        dtype="bfloat16",
        note="CLIP-L/336 + Vicuna-7B shapes (llava-v1.6-vicuna-7b), 672 px images = 5 crops, bf16",
    ),
}


@dataclass(frozen=True)
class QwenBenchSize:
    """A Qwen2.5-VL size: ``vision`` and ``text`` are the ``vision_config`` / ``text_config`` entries
    of a ``qwen2_5_vl`` config.json (token ids are added by :func:`qwen_config`); ``image`` is the
    (H, W) of every benchmark image. The other fields as in :class:`BenchSize`."""

    name: str
    vision: dict
    text: dict
    batch_size: int
    text_tokens: tuple[int, int]
    dtype: str
    image: tuple[int, int] = QWEN_IMAGE
    note: str = ""

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
    ),
}


def sizes_for(family: str) -> dict:
    return QWEN_SIZES if family == "qwen2.5-vl" else SIZES


def size_error(family: str, size_name: str, device: str) -> str | None:
    """Why ``--size size_name`` cannot run for ``family`` on ``device`` (None when it can): it must be
    one of the family's sizes, and the Qwen2.5-VL 7B size runs on a GPU only."""
    sizes = sizes_for(family)
    if size_name not in sizes:
        return f"--size {size_name}: not a {family} size; choose from {sorted(sizes)}"
    if family == "qwen2.5-vl" and size_name != "cpu" and not device.startswith("cuda"):
        return (
            f"--size {size_name} is a GPU size (8.3B parameters in {sizes[size_name].dtype}; a step would "
            "take minutes and tens of GB on a CPU): run it where CUDA is available, or use --size cpu. "
            "Its structure is checked on the meta device by tests/test_bench_scripts.py."
        )
    return None


def write_qwen_processor_files(folder: str | os.PathLike) -> Path:
    """Write a Qwen2.5-VL processor folder for the benchmarks' random models: the tiny Qwen tokenizer
    (its special ids are :func:`qwen_token_ids`), Qwen2.5-VL-7B-Instruct's image settings (min_pixels
    56 x 56, max_pixels 28 x 28 x 16384, so a :data:`QWEN_IMAGE` keeps its size) and chat template."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    _, tokenizer = build_tiny_qwen_tokenizer()
    tokenizer.model_max_length = 32768
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    (out / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_5_VL_CHAT_TEMPLATE}))
    preprocessor = qwen_preprocessor_config(56 * 56, 28 * 28 * 16384)  # Qwen2.5-VL-7B-Instruct's bounds
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    return out


def qwen_token_ids() -> dict[str, int]:
    """Special-token ids of the tiny Qwen tokenizer (:func:`visionzip_core.testing.tiny.build_tiny_qwen_tokenizer`),
    which the benchmarks' random Qwen models and processors share."""
    _, tokenizer = build_tiny_qwen_tokenizer()
    return {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}


def qwen_config(size: QwenBenchSize, token_ids: dict[str, int] | None = None):
    """A ``qwen2_5_vl`` config with ``size``'s shapes and the tiny Qwen tokenizer's special ids."""
    ids = token_ids or qwen_token_ids()
    text = {
        **size.text,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    data = {
        "model_type": "qwen2_5_vl",
        "text_config": text,
        "vision_config": size.vision,
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "tie_word_embeddings": False,
    }
    return family_for("qwen2.5-vl").config_from_dict(data)


def build_random_model(size, device: str | torch.device = "cpu", seed: int = 0, family: str = "llava-1.5"):
    """:func:`build_random_llava`, or for ``family="qwen2.5-vl"`` a Qwen2.5-VL with random weights
    (``device="meta"``: the structure only)."""
    if family != "qwen2.5-vl":
        return build_random_llava(size, device, seed=seed, family=family)

    ids = qwen_token_ids()
    config = qwen_config(size, ids)
    torch.manual_seed(seed)
    with torch.device(device):
        model = family_for(config).random_model(config, dtype=getattr(torch, size.dtype))
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.bos_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    return model


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


def counted_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` as ``torch.utils.flop_counter.FlopCounterMode`` counts them (matmuls
    and attention, forward and backward): the FLOP figure for families without an analytic model."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def llava_config(size: BenchSize, family_name: str = "llava-1.5"):
    """A ``LlavaConfig`` with LLaVA-1.5's settings and ``size``'s shapes (built by its family), or
    a ``LlavaNextConfig`` with llava-v1.6's (``family_name="llava-next"``)."""
    from transformers import LlamaConfig

    family = family_for(family_name)
    t = size.llm
    text = LlamaConfig(
        vocab_size=t.vocab,
        hidden_size=t.hidden,
        intermediate_size=t.intermediate,
        num_hidden_layers=t.layers,
        num_attention_heads=t.heads,
        num_key_value_heads=t.kv_heads,
        max_position_embeddings=4096,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        tie_word_embeddings=False,
    )
    return family.build_config(family.vision_config_for_shape(size.vision), text, IMAGE_TOKEN_ID)


def build_random_llava(
    size: BenchSize, device: str | torch.device = "cpu", seed: int = 0, family: str = "llava-1.5"
):
    """A LLaVA-1.5 (or LLaVA-NeXT) model with random weights, built directly on ``device``.

    On a GPU the weights are allocated and initialised there (a 7B model builds in seconds);
    ``device="meta"`` builds the structure only, for checks without memory.
    """
    dtype = getattr(torch, size.dtype)
    config = llava_config(size, family)
    torch.manual_seed(seed)
    with torch.device(device):
        model = family_for(config).random_model(config, dtype=dtype)
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    model.generation_config.bos_token_id = BOS_TOKEN_ID
    model.generation_config.eos_token_id = EOS_TOKEN_ID
    return model


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
    import numpy as np

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
        lab = torch.full_like(ids, -100)
        offset = 1 + image_tokens
        lab[offset + answer_from :] = ids[offset + answer_from :]
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


def interleaved_schedule(budgets: Iterable[int], rounds: int) -> list[int]:
    """``rounds`` passes over ``budgets``, each pass rotated by one, so that no budget always runs
    first or right after the same neighbour (drift and cache effects spread over all budgets)."""
    order = list(budgets)
    out: list[int] = []
    for r in range(rounds):
        shift = r % len(order)
        out.extend(order[shift:] + order[:shift])
    return out


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


class LiveTensorMemory(TorchDispatchMode):
    """Peak bytes of live tensor storage while active, for CPU where torch keeps no allocator stats.

    Every storage produced by an op inside the mode is counted until it is freed (a weakref
    finalizer on the storage, which torch keeps alive exactly as long as the memory). That includes
    activations saved by autograd, gradients, optimizer states and temporaries; kernel-internal
    scratch buffers that never become tensors are not seen. Storages that existed before, passed as
    ``resident``, form the starting level (weights, inputs, optimizer states) and are tracked too, so
    that gradients freed by ``zero_grad`` count down.
    """

    def __init__(self, resident: Iterable[torch.Tensor] = ()):
        super().__init__()
        self._live: dict[int, int] = {}
        self.current = self.peak = 0
        for t in resident:
            self._track(t)
        self.start = self.current
        self.peak = self.current

    def _release(self, key: int, nbytes: int) -> None:
        if self._live.pop(key, None) is not None:
            self.current -= nbytes

    def _counts(self, t: torch.Tensor) -> bool:
        """Whether ``t``'s storage is memory to count: real devices here, the meta device in
        :class:`visionzip_core.bench.memory_sim.MetaTensorMemory`."""
        return t.device.type != "meta"

    def _track(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or not self._counts(t):
            return
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._live:
            return
        nbytes = storage.nbytes()
        self._live[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._release, key, nbytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            self._track(t)
        return out


def peak_memory_bytes(
    step: Callable[[], object], device: torch.device, resident: Callable[[], Iterable[torch.Tensor]]
) -> tuple[int, int]:
    """``(peak, start)`` bytes of one call of ``step``.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset (everything the caching allocator
    handed out). CPU: :class:`LiveTensorMemory` over the tensors ``resident()`` returns.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device), start
    with LiveTensorMemory(resident()) as tracker:
        step()
    return tracker.peak, tracker.start


def model_tensors(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> list[torch.Tensor]:
    """Parameters, buffers, existing gradients and optimizer states: the resident tensors."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        for state in optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return tensors


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model_name = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model_name}, {os.cpu_count()} cores, {platform.system()}"


def run_context(device: torch.device) -> dict:
    """Where and when a benchmark ran: machine, threads, UTC time, load average, command line."""
    import sys
    from datetime import datetime, timezone

    return {
        "threads": torch.get_num_threads(),
        "machine": machine_description(device),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_1min_at_end": os.getloadavg()[0],
        "command": "python " + " ".join(sys.argv),
    }


def write_report(out: Path, results: list[dict], title: str, table: str) -> list[Path]:
    """Write ``out`` (JSON list), ``out.md`` (title, shapes, table); return the paths written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    md = out.with_suffix(".md")
    md.write_text(f"{title}\n\n{results[0]['run']['shapes']}\n\n{table}")
    return [out, md]
