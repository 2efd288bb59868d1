"""Matmul FLOPs of a training step from model shapes and real sequence lengths: the layers every
family's FLOP model is built from (linears, attention, a Llama-layout decoder), and the counter for
families without an analytic model. Each family's whole-step model is its ``step_flops`` hook
(:meth:`visionzip_core.families.ModelFamily.step_flops`).

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

from transformers import LlamaConfig

from visionzip_core.families.base import LORA_TARGETS

LlmTraining = Literal["none", "lora", "full"]
#: The projections of a Gated DeltaNet (linear-attention) layer, LoRA targets of a hybrid LLM (Qwen3.5)
#: besides a decoder layer's linears.
GATED_DELTANET_TARGETS = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")
#: LoRA targets the FLOP models can count: a decoder layer's linears (what LoRA wraps by default,
#: LORA_TARGETS), and a Gated DeltaNet layer's projections.
COUNTED_LORA_TARGETS = LORA_TARGETS + GATED_DELTANET_TARGETS


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
        unknown = set(self.lora_targets) - set(COUNTED_LORA_TARGETS)
        if unknown:
            raise ValueError(
                f"TrainableParts.lora_targets: unknown {sorted(unknown)}; allowed {list(COUNTED_LORA_TARGETS)}"
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


def lora_flops(tokens: int, sizes: dict[str, tuple[int, int]], parts: TrainableParts) -> Flops:
    """The LoRA adapters of one layer whose linears are ``sizes`` (name -> ``(d_in, d_out)``) over
    ``tokens`` rows: each of ``parts.lora_targets`` the layer has gets A (``d_in -> r``) then B
    (``r -> d_out``); both train, and both pass gradients on. Targets the layer lacks match nothing
    in it (as peft's name match)."""
    total = Flops()
    r = parts.lora_rank
    for name in parts.lora_targets:
        if name in sizes:
            d_in, d_out = sizes[name]
            total = total + linear_flops(tokens, d_in, r, grad_input=True, grad_weight=True)
            total = total + linear_flops(tokens, r, d_out, grad_input=True, grad_weight=True)
    return total


def attention_flops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, *, grad: bool) -> Flops:
    """``softmax(Q K^T) V`` over ``batch * heads`` heads; backward is 2x forward (no recompute)."""
    forward = 2 * batch * heads * matmul_flops(q_len, head_dim, kv_len)
    return Flops(forward, 2 * forward if grad else 0)


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
        absent = sorted(set(parts.lora_targets) - set(sizes))
        if absent:
            raise ValueError(f"lora_targets {absent}: a Llama-layout decoder has no such layers")
        layer = layer + lora_flops(tokens, sizes, parts)
    head_tokens = tokens if logits_positions is None else batch * logits_positions
    total = linear_flops(head_tokens, d, shape.vocab, grad_input=grad_in, grad_weight=grad_w)
    for _ in range(shape.layers):
        total = total + layer
    return total


def counted_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` as ``torch.utils.flop_counter.FlopCounterMode`` counts them (matmuls
    and attention, forward and backward): the FLOP figure for families without an analytic model."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()
