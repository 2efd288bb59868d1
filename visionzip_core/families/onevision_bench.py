"""LLaVA-OneVision's benchmark shapes: its sizes (``vision_config`` / ``text_config`` entries of a
``llava_onevision`` config.json), the FLOP model of a training step, and synthetic batches laid out as
its processor lays them out (what the family's benchmark hooks hand to ``visionzip_core.bench``).

The FLOP model, by part:

- **Tower.** SigLIP over every crop (base + anyres tiles), no CLS: patch embedding, per layer q, k, v,
  out, ``fc1``, ``fc2`` and attention over the crop's ``N`` patches. The feature layer is the last, so
  stock and VisionZip run the same layers.
- **VisionZip.** The received-attention score at the feature layer recomputes ``Q K^T`` per head
  (``N^2 d`` per head and crop: the cost of a CLS-free rule, where a CLS tower reads one row), then the
  contextual tokens' key similarity and the merge.
- **Projector.** Stock projects every patch of every crop before unpadding; VisionZip projects the
  kept tokens only. Unpadding, downsampling and newlines are element-wise.
- **LLM.** Qwen2 (a Llama layout; its q/k/v biases are element-wise).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

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
class OnevisionBenchSize:
    """A LLaVA-OneVision size: ``vision`` and ``text`` are the ``vision_config`` / ``text_config``
    entries of its config.json; the crop side is ``vision["image_size"]`` and the tilings are
    1..6 crops a side (the released 36 pinpoints). Other fields as in ``QwenBenchSize``."""

    flop_model: ClassVar[bool] = True

    name: str
    vision: dict
    text: dict
    batch_size: int
    text_tokens: tuple[int, int]
    dtype: str
    note: str = ""
    gpu_only: bool = False

    def quick(self) -> OnevisionBenchSize:
        """Smoke variant: 2 tower layers, 1 LLM layer, same widths, batch 1."""
        return replace(
            self,
            name=f"{self.name}-quick",
            vision={**self.vision, "num_hidden_layers": 2},
            text={**self.text, "num_hidden_layers": 1},
            batch_size=1,
            note=f"QUICK (smoke only): {self.name} widths, 2 tower layers, 1 LLM layer, batch 1",
        )


def onevision_pinpoints(side: int) -> list[list[int]]:
    """The released checkpoints' 36 tilings: 1 to 6 crops of ``side`` px a side."""
    return [[i * side, j * side] for i in range(1, 7) for j in range(1, 7)]


_SIGLIP = {"model_type": "siglip_vision_model", "image_size": 384, "patch_size": 14, "vision_use_head": False}
_QWEN2 = {
    "model_type": "qwen2",
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}

ONEVISION_SIZES: dict[str, OnevisionBenchSize] = {
    "cpu": OnevisionBenchSize(
        name="cpu",
        # SigLIP-so400m's geometry (384 px crops of 14 px patches: 729 per crop, no CLS) at 1/4 width
        # and 8 layers; a Qwen2 LLM of 4 layers x 768 and a 16k vocabulary.
        vision={
            **_SIGLIP,
            "hidden_size": 288,
            "intermediate_size": 1076,
            "num_hidden_layers": 8,
            "num_attention_heads": 4,
        },
        text={
            **_QWEN2,
            "hidden_size": 768,
            "intermediate_size": 4096,
            "num_hidden_layers": 4,
            "num_attention_heads": 6,
            "num_key_value_heads": 2,
            "vocab_size": 16384,
        },
        batch_size=1,
        text_tokens=(100, 150),
        dtype="float32",
        note="LLaVA-OneVision geometry at CPU scale: SigLIP 8 layers x 288 (MLP 1076, 4 heads, 384 px crops, "
        "729 patches, no CLS) + Qwen2 LLM 4 layers x 768 (MLP 4096, 6 heads, 2 KV heads), vocab 16384; "
        "768 px images (base + 2 x 2 tiles = 5 crops)",
    ),
    # For testing the scripts' plumbing in seconds, not for figures: the cpu size's geometry (384 px
    # crops of 729 patches, 768 px images of 5 crops) at a 64 wide, 2-layer tower and LLM and a
    # 2048 vocabulary (the tiny tokenizer's ids fit). Its timings and memory mean nothing.
    "smoke": OnevisionBenchSize(
        name="smoke",
        vision={
            **_SIGLIP,
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        text={
            **_QWEN2,
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 2048,
        },
        batch_size=1,
        text_tokens=(100, 150),
        dtype="float32",
        note="SMOKE (tests the scripts; figures meaningless): the cpu size's geometry (384 px crops, 729 "
        "patches, 768 px images = 5 crops) at SigLIP 2 layers x 64 + Qwen2 2 layers x 64, vocab 2048",
    ),
    "llava-onevision-7b": OnevisionBenchSize(
        name="llava-onevision-7b",
        vision={
            **_SIGLIP,
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_hidden_layers": 26,
            "num_attention_heads": 16,
        },
        text={
            **_QWEN2,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "vocab_size": 152128,
        },
        batch_size=2,
        text_tokens=(100, 150),
        dtype="bfloat16",
        note="llava-onevision-qwen2-7b-ov-hf shapes (SigLIP-so400m 26 x 1152, 384 px crops; Qwen2-7B 28 x 3584, "
        "28 heads, 4 KV heads, vocab 152128), 768 px images (5 crops), bf16; GPU only",
        gpu_only=True,
    ),
}


def siglip_tower_flops(vision_config: Any, crops: int) -> Flops:
    """A frozen SigLIP tower over ``crops`` crops (forward only: pixels need no gradient): the
    patch embedding, then per layer q, k, v, out, ``fc1``, ``fc2`` and attention over the crop's
    ``N`` patches (no CLS)."""
    v = vision_config
    n = (v.image_size // v.patch_size) ** 2
    tokens, d = crops * n, v.hidden_size
    patch = linear_flops(tokens, v.num_channels * v.patch_size**2, d, grad_input=False, grad_weight=False)
    layer = linear_flops(tokens, d, 4 * d, grad_input=False, grad_weight=False)
    layer = layer + linear_flops(tokens, d, v.intermediate_size, grad_input=False, grad_weight=False)
    layer = layer + linear_flops(tokens, v.intermediate_size, d, grad_input=False, grad_weight=False)
    layer = layer + attention_flops(
        crops, v.num_attention_heads, n, n, d // v.num_attention_heads, grad=False
    )
    total = patch
    for _ in range(v.num_hidden_layers):
        total = total + layer
    return total


def received_attention_flops(vision_config: Any, crops: int, dominant: int, contextual: int) -> Flops:
    """VisionZip's own products on ``crops`` crops (forward only: the frozen tower's features need no
    gradient): the received-attention score ``Q K^T`` per head at the feature layer, the similarity of
    the other tokens' head-mean keys to the contextual targets, and the merge."""
    v = vision_config
    n = (v.image_size // v.patch_size) ** 2
    heads, head_dim = v.num_attention_heads, v.hidden_size // v.num_attention_heads
    score = crops * heads * matmul_flops(n, head_dim, n)
    others = max(n - dominant - contextual, 0)
    if contextual == 0:
        return Flops(score, 0)
    similarity = crops * matmul_flops(others, head_dim, contextual)
    merge = crops * matmul_flops(contextual, others, v.hidden_size)
    return Flops(score + similarity + merge, 0)


def onevision_step_flops(
    config: Any,
    parts: TrainableParts,
    plan: Any,
    split: tuple | None,
    *,
    samples: int,
    seq_len: int,
    logits_positions: int | None = None,
) -> dict[str, Flops]:
    """Matmul FLOPs of one LLaVA-OneVision step (see the module doc), one image per sample costing
    ``plan`` (``visionzip_core.bench.budgets.ImagePlan``: crops, projected and LLM tokens), compressed
    by ``split`` ``(dominant, contextual)`` per crop (None: stock).

    Returns:
        ``{"vision", "visionzip", "projector", "llm", "total"}`` -> :class:`Flops`.
    """
    if parts.vision:
        raise NotImplementedError("llava-onevision: the FLOP model counts a frozen tower")
    v = config.vision_config
    crops = samples * plan.crops
    text = config.text_config
    projected = samples * plan.projected
    projector = linear_flops(
        projected, v.hidden_size, text.hidden_size, grad_input=False, grad_weight=parts.projector
    )
    projector = projector + linear_flops(
        projected, text.hidden_size, text.hidden_size, grad_input=parts.projector, grad_weight=parts.projector
    )
    out = {
        "vision": siglip_tower_flops(v, crops),
        "visionzip": received_attention_flops(v, crops, *split) if split is not None else Flops(),
        "projector": projector,
        "llm": llama_flops(LlamaShape.from_config(text), samples, seq_len, parts, logits_positions),
    }
    total = Flops()
    for value in out.values():
        total = total + value
    out["total"] = total
    return out


def onevision_synthetic_batch(
    size: OnevisionBenchSize,
    config: Any,
    plan: Any,
    image_hw: tuple[int, int],
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A right-padded training batch: per sample ``<|im_start|>``, 20 % of its text, ``plan.llm``
    ``<image>`` ids, the rest of the text (labels on its last 60 %); ``pixel_values`` ``(B, crops, 3,
    S, S)`` and ``image_sizes`` as the processor gives them for one ``image_hw`` image each. Text ids
    are drawn below the tiny tokenizer's specials, identical for every budget."""
    gen = torch.Generator().manual_seed(seed)
    text_cfg = config.text_config
    first_special = min(config.image_token_id, text_cfg.bos_token_id, text_cfg.eos_token_id)
    rows, labels = [], []
    for n in synthetic_text_lengths(size, seed):
        text = torch.randint(0, first_special, (n,), generator=gen)
        before, answer_from = n // 5, n - (3 * n) // 5
        ids = torch.cat(
            [
                torch.tensor([text_cfg.bos_token_id]),
                text[:before],
                torch.full((plan.llm,), config.image_token_id),
                text[before:],
            ]
        )
        lab = torch.full_like(ids, -100)
        offset = 1 + plan.llm + answer_from
        lab[offset:] = ids[offset:]
        rows.append(ids)
        labels.append(lab)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), text_cfg.pad_token_id)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    label_t = torch.full((len(rows), width), -100)
    for i, (r, lab) in enumerate(zip(rows, labels)):
        input_ids[i, : len(r)] = r
        attention_mask[i, : len(r)] = 1
        label_t[i, : len(r)] = lab
    side = config.vision_config.image_size
    pixel_gen = torch.Generator().manual_seed(seed + 1)
    pixel_values = torch.randn(len(rows), plan.crops, 3, side, side, generator=pixel_gen)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": label_t,
        "pixel_values": pixel_values.to(getattr(torch, size.dtype)),
        "image_sizes": torch.tensor([list(image_hw)] * len(rows)),
    }
    return {k: t.to(device) for k, t in batch.items()}
