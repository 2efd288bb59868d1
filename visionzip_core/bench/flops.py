"""Matmul FLOPs of a LLaVA-1.5 training step, from model shapes and real sequence lengths.

What is counted: every matrix multiply of the forward and backward pass (linear layers, the
patch-embedding convolution, attention's ``Q K^T`` and ``A V`` with their ``s^2`` terms, the
LM head, VisionZip's own small products). Element-wise work (norms, activations, softmax, the
loss) is not. A multiply of ``(m, k) @ (k, n)`` costs ``2 m k n``. This is the count
``torch.utils.flop_counter.FlopCounterMode`` gives for eager attention; tests check it there.

Backward follows what autograd actually needs:
  - a layer with trainable weights computes weight gradients (one more matmul per linear);
  - a layer computes input gradients only when something *upstream* of it is trainable
    (a frozen LLM still back-propagates to a trainable projector);
  - a frozen vision tower fed by pixels (which need no gradient) runs forward only.
Attention backward is counted as its mathematical minimum, twice the forward (flash-style
kernels that recompute the scores do 2.5x; that only lowers the measured/ideal ratio).

The FLOP-ideal speed-up of a visual-token budget is ``step_flops(576).total / step_flops(K).total``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from transformers import CLIPVisionConfig, LlamaConfig

from visionzip_core.families.base import LORA_TARGETS
from visionzip_core.families.llava import patches_per_image

LlmTraining = Literal["none", "lora", "full"]
# LoRA targets this model can count: a decoder layer's linears, what LoRA wraps by default (LORA_TARGETS).


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


@dataclass(frozen=True)
class LlamaShape:
    """A Llama decoder with an untied LM head (Llama-2 / Vicuna layout)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int | None = None

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @classmethod
    def from_config(cls, cfg: Any) -> LlamaShape:
        return cls(
            hidden=cfg.hidden_size,
            intermediate=cfg.intermediate_size,
            layers=cfg.num_hidden_layers,
            heads=cfg.num_attention_heads,
            kv_heads=cfg.num_key_value_heads or cfg.num_attention_heads,
            vocab=cfg.vocab_size,
            head_dim=getattr(cfg, "head_dim", None),
        )

    def to_config(self, **overrides: Any) -> LlamaConfig:
        """The ``LlamaConfig`` of this shape (4096 positions, untied LM head; ``overrides`` replace or
        add fields, e.g. token ids): the inverse of :meth:`from_config`."""
        fields = {
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "max_position_embeddings": 4096,
            "tie_word_embeddings": False,
        }
        if self.head_dim is not None:
            fields["head_dim"] = self.head_dim
        return LlamaConfig(**{**fields, **overrides})


@dataclass(frozen=True)
class TrainableParts:
    """Which parts of the model have trainable parameters.

    Every mode of this project trains the projector (or the tower), so activation gradients run
    through the whole LLM; an LLM trained with nothing upstream trainable is not modelled.
    """

    vision: bool = False
    projector: bool = True
    llm: LlmTraining = "none"
    lora_rank: int = 0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self) -> None:
        if self.llm not in ("none", "lora", "full"):
            raise ValueError(f"TrainableParts.llm={self.llm!r} must be 'none', 'lora' or 'full'")
        if self.llm == "lora" and self.lora_rank < 1:
            raise ValueError("TrainableParts.lora_rank must be >= 1 when llm='lora'")
        unknown = set(self.lora_targets) - set(LORA_TARGETS)
        if unknown:
            raise ValueError(
                f"TrainableParts.lora_targets: unknown {sorted(unknown)}; allowed {list(LORA_TARGETS)}"
            )
        if self.llm != "none" and not (self.projector or self.vision):
            raise ValueError(
                "TrainableParts: an LLM trained with a frozen projector and tower is not modelled"
            )

    @property
    def any(self) -> bool:
        return self.vision or self.projector or self.llm != "none"


@dataclass(frozen=True)
class Flops:
    """Forward and backward matmul FLOPs."""

    forward: int = 0
    backward: int = 0

    @property
    def total(self) -> int:
        return self.forward + self.backward

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.forward + other.forward, self.backward + other.backward)


def matmul_flops(m: int, k: int, n: int) -> int:
    """``(m, k) @ (k, n)``."""
    return 2 * m * k * n


def linear_flops(tokens: int, d_in: int, d_out: int, *, grad_input: bool, grad_weight: bool) -> Flops:
    """A linear layer applied to ``tokens`` rows; backward as requested."""
    one = matmul_flops(tokens, d_in, d_out)
    return Flops(one, one * (int(grad_input) + int(grad_weight)))


def attention_flops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, *, grad: bool) -> Flops:
    """``softmax(Q K^T) V`` over ``batch * heads`` heads; backward is 2x forward (no recompute)."""
    forward = 2 * batch * heads * matmul_flops(q_len, head_dim, kv_len)
    return Flops(forward, 2 * forward if grad else 0)


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


def llama_flops(
    shape: LlamaShape, batch: int, seq_len: int, parts: TrainableParts, logits_positions: int | None = None
) -> Flops:
    """A Llama forward (+ backward) over ``batch`` sequences of ``seq_len`` tokens (padding included).

    ``logits_positions``: positions per sequence that go through the LM head; None = all of them
    (transformers in training); ``generate``'s prefill computes only the last one.
    """
    tokens = batch * seq_len
    d, hd = shape.hidden, shape.dim_per_head
    grad_in = parts.any
    grad_w = parts.llm == "full"
    q_out, kv_out = shape.heads * hd, shape.kv_heads * hd

    def lin(d_in: int, d_out: int) -> Flops:
        return linear_flops(tokens, d_in, d_out, grad_input=grad_in, grad_weight=grad_w)

    layer = lin(d, q_out) + lin(d, kv_out) + lin(d, kv_out) + lin(q_out, d)
    layer = layer + lin(d, shape.intermediate) + lin(d, shape.intermediate) + lin(shape.intermediate, d)
    # Eager attention repeats K/V to all query heads, so the s^2 terms count every query head.
    layer = layer + attention_flops(batch, shape.heads, seq_len, seq_len, hd, grad=grad_in)
    if parts.llm == "lora":
        inner = shape.intermediate
        sizes = {
            "q_proj": (d, q_out),
            "k_proj": (d, kv_out),
            "v_proj": (d, kv_out),
            "o_proj": (q_out, d),
            "gate_proj": (d, inner),
            "up_proj": (d, inner),
            "down_proj": (inner, d),
        }
        for name in parts.lora_targets:
            d_in, d_out = sizes[name]
            r = parts.lora_rank
            # Adapter A (d_in -> r) then B (r -> d_out); both train, and both pass gradients on.
            layer = layer + linear_flops(tokens, d_in, r, grad_input=True, grad_weight=True)
            layer = layer + linear_flops(tokens, r, d_out, grad_input=True, grad_weight=True)
    head_tokens = tokens if logits_positions is None else batch * logits_positions
    total = linear_flops(head_tokens, d, shape.vocab, grad_input=grad_in, grad_weight=grad_w)
    for _ in range(shape.layers):
        total = total + layer
    return total


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


def qwen_step_flops(
    config: Any,
    parts: TrainableParts,
    *,
    num_images: int,
    image_hw: tuple[int, int],
    seq_len: int,
    image_tokens: int,
) -> dict[str, Flops]:
    """Matmul FLOPs of one Qwen2.5-VL training step, one image of ``image_hw`` per sample, by part.

    The LLM is a Qwen2 decoder, counted as :func:`llama_flops` counts a Llama one (the same matmuls;
    its q/k/v biases are element-wise). VisionZip compresses after the merger, so the tower and
    merger see every patch at every budget and only the LLM's ``seq_len`` (padded, ``image_tokens``
    per sample included) shrinks; VisionZip's own selection products are left out (a few
    ``(tokens, H)`` products, far under one block's).

    Returns:
        ``{"vision", "projector", "llm", "total"}`` -> :class:`Flops`.
    """
    vision, merger = qwen_vision_flops(config.vision_config, num_images, image_hw, trainable=parts.vision)
    llm = llama_flops(LlamaShape.from_config(config.text_config), num_images, seq_len, parts)
    out = {"vision": vision, "projector": merger, "llm": llm}
    out["total"] = vision + merger + llm
    return out


def counted_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` as ``torch.utils.flop_counter.FlopCounterMode`` counts them (matmuls
    and attention, forward and backward): the FLOP figure for families without an analytic model."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()
