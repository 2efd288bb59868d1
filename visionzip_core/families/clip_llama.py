"""The CLIP + Llama layout LLaVA-1.5 and LLaVA-NeXT share, as shapes: patch counts, the tower and
decoder shapes, the FLOP model of a training step, the benchmark sizes and synthetic rows (what the
families' benchmark hooks hand to ``visionzip_core.bench``).

Random weights are enough for the benchmarks: compression changes shapes, not values, and step time
and memory depend only on shapes (VisionZip's selection is data-dependent, but its cost is not).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from transformers import CLIPVisionConfig

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


def vision_tower_config(config: Any) -> Any:
    """The vision fields of a CLIP folder's config.

    A full ``CLIPModel`` download (e.g. openai/clip-vit-large-patch14-336, ``model_type: clip``)
    keeps them in ``.vision_config``; a ``CLIPVisionModel`` folder has them at the top level.
    """
    return getattr(config, "vision_config", None) or config


def patches_per_image(vision_config: Any) -> int:
    """Patch tokens of one square CLIP crop: ``(image_size // patch_size) ** 2`` (576 at 336/14)."""
    vision = vision_tower_config(vision_config)
    return (vision.image_size // vision.patch_size) ** 2


@dataclass(frozen=True)
class VisionTowerShape:
    """A CLIP vision tower (transformers ``CLIPVisionModel``)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    image_size: int
    patch_size: int
    channels: int = 3

    @property
    def num_patches(self) -> int:
        return patches_per_image(self)

    @property
    def seq_len(self) -> int:
        """Tokens per image inside the tower: patches + CLS."""
        return self.num_patches + 1

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @classmethod
    def from_config(cls, cfg: Any) -> VisionTowerShape:
        return cls(
            hidden=cfg.hidden_size,
            intermediate=cfg.intermediate_size,
            layers=cfg.num_hidden_layers,
            heads=cfg.num_attention_heads,
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            channels=cfg.num_channels,
        )

    def to_config(self, **overrides: Any) -> CLIPVisionConfig:
        """The ``CLIPVisionConfig`` of this shape, with OpenAI CLIP's activation and projection width
        (``overrides`` replace or add fields): the inverse of :meth:`from_config`."""
        fields = {
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "num_channels": self.channels,
            "projection_dim": 768,
            "hidden_act": "quick_gelu",
        }
        return CLIPVisionConfig(**{**fields, **overrides})


def vision_tower_flops(
    shape: VisionTowerShape, num_images: int, *, layers_run: int, layers_used: int, trainable: bool
) -> Flops:
    """Patch embedding and ``layers_run`` encoder layers over ``num_images`` images.

    Args:
        layers_run: layers executed forward (stock HF runs them all, VisionZip stops at the feature layer).
        layers_used: layers up to the feature layer; only these take part in backward.
        trainable: the tower's weights train (otherwise no backward at all: pixels need no gradient).
    """
    tokens = num_images * shape.seq_len
    d, inner = shape.hidden, shape.intermediate
    # Convolution with stride = kernel = patch: one (patches, 3 p^2) @ (3 p^2, d) product; pixels
    # need no gradient, so backward is the weight gradient only.
    patch = linear_flops(
        num_images * shape.num_patches,
        shape.channels * shape.patch_size**2,
        d,
        grad_input=False,
        grad_weight=trainable,
    )

    def layer(grad: bool) -> Flops:
        projections = linear_flops(tokens, d, 4 * d, grad_input=grad, grad_weight=grad)  # q, k, v, out
        mlp = linear_flops(tokens, d, inner, grad_input=grad, grad_weight=grad) + linear_flops(
            tokens, inner, d, grad_input=grad, grad_weight=grad
        )
        attention = attention_flops(
            num_images, shape.heads, shape.seq_len, shape.seq_len, shape.head_dim, grad=grad
        )
        return projections + mlp + attention

    total = patch
    for index in range(layers_run):
        total = total + layer(trainable and index < layers_used)
    return total


def projector_flops(
    tokens: int, vision_hidden: int, text_hidden: int, *, train_weights: bool, grad_input: bool
) -> Flops:
    """LLaVA's two-layer MLP projector (``linear_1``, GELU, ``linear_2``) over ``tokens`` visual tokens."""
    first = linear_flops(tokens, vision_hidden, text_hidden, grad_input=grad_input, grad_weight=train_weights)
    # linear_2's input always needs a gradient when linear_1 trains or anything before it does.
    second = linear_flops(
        tokens, text_hidden, text_hidden, grad_input=train_weights or grad_input, grad_weight=train_weights
    )
    return first + second


def visionzip_overhead_flops(
    shape: VisionTowerShape, num_images: int, dominant: int, contextual: int, *, grad: bool
) -> Flops:
    """VisionZip's own products per step (``visionzip_core.algorithm``/``capture``), tiny next to a layer.

    CLS attention row ``(1, d) @ (d, N)`` per head; key similarity ``(R-K, d_head) @ (d_head, K)``;
    the merge ``(K, R-K) @ (R-K, C)``, which back-propagates to the hidden states when the tower trains.
    """
    n = shape.seq_len
    remaining = n - dominant
    others = max(remaining - contextual, 0)
    cls_row = num_images * matmul_flops(1, shape.hidden, n)
    if contextual == 0:
        return Flops(cls_row, 0)
    similarity = num_images * matmul_flops(others, shape.head_dim, contextual)
    merge = num_images * matmul_flops(contextual, others, shape.hidden)
    return Flops(cls_row + similarity + merge, merge if grad else 0)


def llava_step_flops(
    vision: VisionTowerShape,
    llm: LlamaShape,
    parts: TrainableParts,
    *,
    num_images: int,
    batch: int,
    seq_len: int,
    image_tokens: int,
    feature_layer: int = -2,
    visionzip_split: tuple[int, int] | None = None,
    logits_positions: int | None = None,
    crops_per_image: int = 1,
    projector_tokens_per_image: int | None = None,
) -> dict[str, Flops]:
    """Matmul FLOPs of one LLaVA-1.5 (or LLaVA-NeXT) training step, by part.

    Args:
        vision, llm: model shapes.
        parts: what trains.
        num_images: images in the batch.
        batch, seq_len: the LLM input, ``(batch, seq_len)`` with padding (what is computed).
        image_tokens: visual tokens per image (576 stock, ``D + K`` compressed in LLaVA-1.5).
        feature_layer: HF ``hidden_states`` index the features come from (-2 in LLaVA-1.5).
        visionzip_split: ``(dominant, contextual)`` when compression is on. Then the tower stops at
            the feature layer; stock transformers runs every layer and picks ``hidden_states[-2]``.
        logits_positions: see :func:`llama_flops` (1 for a ``generate`` prefill).
        crops_per_image: crops the tower runs per image (LLaVA-NeXT's anyres: base + tiles; 1 for
            LLaVA-1.5). The tower and VisionZip's selection run once per crop.
        projector_tokens_per_image: tokens entering the projector per image, when they differ from
            ``image_tokens`` (stock LLaVA-NeXT projects every crop's 576 patches, then unpads and
            adds a newline per row, so the LLM sees another count); default ``image_tokens``.

    Returns:
        ``{"vision", "visionzip", "projector", "llm", "total"}`` -> :class:`Flops`.
    """
    used = feature_layer if feature_layer >= 0 else vision.layers + 1 + feature_layer
    layers_run = used if visionzip_split is not None else vision.layers
    crops = num_images * crops_per_image
    projected = image_tokens if projector_tokens_per_image is None else projector_tokens_per_image
    out = {
        "vision": vision_tower_flops(
            vision, crops, layers_run=layers_run, layers_used=used, trainable=parts.vision
        ),
        "visionzip": (
            visionzip_overhead_flops(vision, crops, *visionzip_split, grad=parts.vision)
            if visionzip_split is not None
            else Flops()
        ),
        "projector": projector_flops(
            num_images * projected,
            vision.hidden,
            llm.hidden,
            train_weights=parts.projector,
            grad_input=parts.vision,
        ),
        "llm": llama_flops(llm, batch, seq_len, parts, logits_positions),
    }
    total = Flops()
    for value in out.values():
        total = total + value
    out["total"] = total
    return out


#: llava-hf LLaVA-1.5's vocabulary: Llama's 32000 text ids + <image> + <pad>, padded to 64.
LLAVA_VOCAB = 32064


def llava_token_ids(vocab: int) -> tuple[int, int]:
    """``(<image>, <pad>)`` ids of a vocabulary laid out as llava-hf's: the text ids, then ``<image>``
    and ``<pad>``, padded to a multiple of 64 (32000 and 32001 in LLaVA-1.5's 32064)."""
    return vocab - 64, vocab - 63


IMAGE_TOKEN_ID, PAD_TOKEN_ID = llava_token_ids(LLAVA_VOCAB)
BOS_TOKEN_ID, EOS_TOKEN_ID = 1, 2


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

    #: Whether its family's ``step_flops`` counts this layout's FLOPs analytically (else the
    #: benchmarks count them on the step with ``counted_flops``).
    flop_model: ClassVar[bool] = True

    name: str
    vision: VisionTowerShape
    llm: LlamaShape
    batch_size: int
    text_tokens: tuple[int, int]
    dtype: str
    note: str = ""
    gpu_only: bool = False

    def quick(self) -> BenchSize:
        """A clearly smaller variant for smoke runs: 6 tower layers, 2 LLM layers, same widths."""
        tower, llm = min(self.vision.layers, 6), min(self.llm.layers, 2)
        return replace(
            self,
            name=f"{self.name}-quick",
            vision=replace(self.vision, layers=tower),
            llm=replace(self.llm, layers=llm),
            batch_size=1,
            note=f"QUICK (smoke only): {self.name} widths, {tower} tower layers, {llm} LLM layers, batch 1",
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
    # For testing the scripts' plumbing in seconds, not for figures: LLaVA's geometry (336 px crops of
    # 576 patches, so the 576 / 64 budgets and LLaVA-NeXT's 5 crops hold) at a 64 wide, 2-layer tower
    # and LLM, and a vocabulary of 2048 text ids laid out as llava-hf's (a 32064-wide LM head would
    # be most of a step). Its timings and memory mean nothing.
    "smoke": BenchSize(
        name="smoke",
        vision=replace(CLIP_L_336, hidden=64, intermediate=256, layers=2, heads=4),
        llm=LlamaShape(hidden=64, intermediate=256, layers=2, heads=4, kv_heads=4, vocab=2112),
        batch_size=1,
        text_tokens=(100, 150),
        dtype="float32",
        note="SMOKE (tests the scripts; figures meaningless): CLIP-L/336 geometry (576 patches) at 2 layers "
        "x 64 + Llama 2 layers x 64, vocab 2112, batch 1",
    ),
}


def synthetic_row(
    n: int, image_tokens: int, gen: torch.Generator, image_token_id: int = IMAGE_TOKEN_ID
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample's ``(input_ids, labels)``, each ``[1 + image_tokens + n]``: ``<s>``, the first 20% of
    ``n`` random text tokens (ids below ``image_token_id``), ``<image>*image_tokens``, the rest; only
    the last 60% of the text (the answer) carries labels, as in LLaVA."""
    text = torch.randint(3, image_token_id, (n,), generator=gen)
    before, answer_from = n // 5, n - (3 * n) // 5
    ids = torch.cat(
        [
            torch.tensor([BOS_TOKEN_ID]),
            text[:before],
            torch.full((image_tokens,), image_token_id),
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
    vocab: int = LLAVA_VOCAB,
) -> list[dict[str, torch.Tensor]]:
    """Dataset-like items (one image each), laid out as :func:`synthetic_batch`'s rows, for the
    real collators and samplers: ``input_ids``/``labels`` ``[n]``, ``pixel_values`` ``[1, 3, S, S]``;
    token ids of a llava-hf layout of ``vocab`` (:func:`llava_token_ids`)."""
    gen = torch.Generator().manual_seed(seed)
    image_token_id = llava_token_ids(vocab)[0]
    items = []
    for n in text_lengths:
        ids, labels = synthetic_row(n, image_tokens, gen, image_token_id)
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
    each image is ``crops`` crops and the batch carries ``image_sizes``. Token ids as
    :func:`llava_token_ids` of the size's vocabulary.
    """
    gen = torch.Generator().manual_seed(seed)
    image_token_id, pad_token_id = llava_token_ids(size.llm.vocab)
    lengths = synthetic_text_lengths(size, seed)
    rows, labels = [], []
    for n in lengths:
        ids, lab = synthetic_row(n, image_tokens, gen, image_token_id)
        rows.append(ids)
        labels.append(lab)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id)
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
