"""Qwen3-VL's and Qwen3.5's benchmark shapes: their sizes (``vision_config`` / ``text_config`` entries
of a ``qwen3_vl`` / ``qwen3_5`` config.json), the FLOP model of a training step, and synthetic batches
(what the two families' benchmark hooks hand to ``visionzip_core.bench``).

What the FLOP model counts that Qwen2.5-VL's (:mod:`~visionzip_core.families.qwen_bench`) does not:

- **Qwen3's tower** attends in full in every block (no windows), its MLP is plain (``fc1``, ``fc2``),
  and it has 16 px patches. Its learned position table is interpolated by gathers and weighted sums
  (element-wise: not counted).
- **DeepStack** (Qwen3-VL): after each block in ``deepstack_visual_indexes`` a merger of the main
  merger's shapes (``4H -> 4H -> out``) runs over every merged token; it trains with the projector.
  Its outputs are *added* to the LLM's hidden states (element-wise).
- **Qwen3.5's hybrid LLM.** The full-attention layers (one in ``full_attention_interval``) have a
  ``q_proj`` twice as wide (the query and its output gate). The Gated DeltaNet layers replace the
  attention's quadratic term by a chunked scan that is linear in the length: the input projections
  (``in_proj_qkv``, ``in_proj_z``, ``in_proj_b``, ``in_proj_a``), a causal depthwise conv1d, per chunk
  of 64 tokens and value head two ``(64, dk) @ (dk, 64)`` products and four against the
  ``(dk, dv)`` state, then ``out_proj``. Its two triangular solves per chunk
  (``torch.linalg.solve_triangular``, ``64^2 (dk + dv)`` multiply-adds) are counted apart
  (``"solve"``): ``FlopCounterMode`` does not see them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from visionzip_core.families.flops import (
    Flops,
    LlamaShape,
    TrainableParts,
    attention_flops,
    linear_flops,
    llama_flops,
    lora_flops,
    matmul_flops,
)
from visionzip_core.families.qwen_bench import QwenBenchSize, qwen_synthetic_batch, qwen_visionzip_flops

#: Tokens per chunk of transformers' reference Gated DeltaNet kernel (``torch_chunk_gated_delta_rule``).
DELTA_CHUNK = 64


@dataclass(frozen=True)
class Qwen3BenchSize(QwenBenchSize):
    """A Qwen3-VL or Qwen3.5 size: the fields of :class:`QwenBenchSize` (``vision`` and ``text`` are
    the ``vision_config`` / ``text_config`` entries of its config.json, token ids the tiny Qwen
    tokenizer's, added by ``bench_config``), with its own smoke variant; its FLOP model is
    :func:`qwen3_step_flops`."""

    def quick(self) -> Qwen3BenchSize:
        """Smoke variant: 2 vision blocks (a DeepStack level after the first when the size has any),
        the smallest LLM with each of its layer kinds (1 layer; Qwen3.5: one DeltaNet + one full
        attention), batch 1, same widths."""
        depth = min(self.vision["depth"], 2)
        vision = {**self.vision, "depth": depth}
        if self.vision.get("deepstack_visual_indexes"):
            vision["deepstack_visual_indexes"] = [0]
        text = {**self.text, "num_hidden_layers": 1}
        if "layer_types" in self.text:
            text.update(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"])
        return replace(
            self,
            name=f"{self.name}-quick",
            vision=vision,
            text=text,
            batch_size=1,
            note=f"QUICK (smoke only): {self.name} widths, {depth} vision blocks, "
            f"{text['num_hidden_layers']} LLM layer(s), batch 1",
        )


_VISION_COMMON = {
    "hidden_act": "gelu_pytorch_tanh",
    "in_channels": 3,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "initializer_range": 0.02,
}
_TEXT_COMMON = {
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "tie_word_embeddings": False,
}
# Qwen/Qwen3-VL-8B-Instruct's config.json (4.57 key names, which transformers 5.x reads).
_QWEN3_VL_8B_VISION = {
    **_VISION_COMMON,
    "model_type": "qwen3_vl",
    "depth": 27,
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_heads": 16,
    "num_position_embeddings": 2304,
    "out_hidden_size": 4096,
    "deepstack_visual_indexes": [8, 16, 24],
}
_QWEN3_VL_TEXT = {
    **_TEXT_COMMON,
    "model_type": "qwen3_vl_text",
    "max_position_embeddings": 262144,
    "rope_scaling": {"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True},
    "rope_theta": 5000000,
}
# Qwen/Qwen3.5-9B's config.json: the tower is Qwen3-VL-8B's without DeepStack.
_QWEN3_5_TEXT = {
    **_TEXT_COMMON,
    "model_type": "qwen3_5_text",
    "max_position_embeddings": 262144,
    "attn_output_gate": True,
    "full_attention_interval": 4,
    "linear_conv_kernel_dim": 4,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 10000000,
        "partial_rotary_factor": 0.25,
        "mrope_section": [11, 11, 10],
        "mrope_interleaved": True,
    },
}


def _hybrid_layers(n: int) -> list[str]:
    """Qwen3.5's layer kinds: three Gated DeltaNet layers, then one full attention, repeated."""
    return ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(n)]


# The CPU size: the real geometry (16 px patches, 2x2 merge, full attention in every block, the LLM's
# head layout) at widths a 2-core step runs in seconds; a 16k vocabulary (a 152k or 248k LM head
# would be most of a CPU step).
_CPU_VISION = {
    **_VISION_COMMON,
    "depth": 8,
    "hidden_size": 256,
    "intermediate_size": 956,  # the 8B's MLP ratio, 4304 / 1152
    "num_heads": 4,
    "num_position_embeddings": 2304,
    "out_hidden_size": 768,
}

QWEN3_VL_SIZES: dict[str, Qwen3BenchSize] = {
    "cpu": Qwen3BenchSize(
        name="cpu",
        vision={**_CPU_VISION, "model_type": "qwen3_vl", "deepstack_visual_indexes": [2, 4, 6]},
        text={
            **_QWEN3_VL_TEXT,
            "hidden_size": 768,
            "intermediate_size": 2304,
            "num_hidden_layers": 4,
            "num_attention_heads": 6,
            "num_key_value_heads": 2,
            "head_dim": 128,
            "vocab_size": 16384,
            "rope_scaling": {
                "rope_type": "default",
                "mrope_section": [24, 20, 20],
                "mrope_interleaved": True,
            },
        },
        batch_size=2,
        text_tokens=(100, 150),
        dtype="float32",
        note="Qwen3-VL geometry at CPU scale: ViT 8 blocks x 256 (MLP 956, 4 heads, full attention, 16 px "
        "patches, DeepStack after blocks 2/4/6) + 2x2 merger and 3 DeepStack mergers + Qwen3 LLM 4 layers "
        "x 768 (MLP 2304, 6 heads, 2 KV heads, head dim 128, interleaved M-RoPE), vocab 16384; 448 px images "
        "(196 merged tokens)",
    ),
    "qwen3-vl-8b": Qwen3BenchSize(
        name="qwen3-vl-8b",
        vision=_QWEN3_VL_8B_VISION,
        text={
            **_QWEN3_VL_TEXT,
            "hidden_size": 4096,
            "intermediate_size": 12288,
            "num_hidden_layers": 36,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "vocab_size": 151936,
        },
        batch_size=2,
        text_tokens=(100, 150),
        dtype="bfloat16",
        note="Qwen3-VL-8B-Instruct shapes (ViT 27 x 1152, 16 px patches, DeepStack after blocks 8/16/24; "
        "Qwen3 36 x 4096, 32 heads, 8 KV heads, vocab 151936), 448 px images (196 merged tokens), bf16; "
        "GPU only",
        gpu_only=True,
    ),
}

QWEN3_5_SIZES: dict[str, Qwen3BenchSize] = {
    "cpu": Qwen3BenchSize(
        name="cpu",
        vision={**_CPU_VISION, "model_type": "qwen3_5", "deepstack_visual_indexes": []},
        text={
            **_QWEN3_5_TEXT,
            "hidden_size": 768,
            "intermediate_size": 2304,
            "num_hidden_layers": 4,
            "layer_types": _hybrid_layers(4),
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 256,
            "linear_key_head_dim": 128,
            "linear_value_head_dim": 128,
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
            "vocab_size": 16384,
        },
        batch_size=2,
        text_tokens=(100, 150),
        dtype="float32",
        note="Qwen3.5 geometry at CPU scale: ViT 8 blocks x 256 (MLP 956, 4 heads, full attention, 16 px "
        "patches) + 2x2 merger + hybrid LLM 4 layers x 768 (3 Gated DeltaNet: 2 key / 4 value heads of 128; "
        "1 gated full attention: 4 heads, 1 KV head of 256; MLP 2304), vocab 16384; 448 px images "
        "(196 merged tokens)",
    ),
    "qwen3.5-9b": Qwen3BenchSize(
        name="qwen3.5-9b",
        vision={**_QWEN3_VL_8B_VISION, "model_type": "qwen3_5", "deepstack_visual_indexes": []},
        text={
            **_QWEN3_5_TEXT,
            "hidden_size": 4096,
            "intermediate_size": 12288,
            "num_hidden_layers": 32,
            "layer_types": _hybrid_layers(32),
            "num_attention_heads": 16,
            "num_key_value_heads": 4,
            "head_dim": 256,
            "linear_key_head_dim": 128,
            "linear_value_head_dim": 128,
            "linear_num_key_heads": 16,
            "linear_num_value_heads": 32,
            "vocab_size": 248320,
        },
        batch_size=2,
        text_tokens=(100, 150),
        dtype="bfloat16",
        note="Qwen3.5-9B shapes (ViT 27 x 1152, 16 px patches; hybrid LLM 32 x 4096 = 8 x (3 Gated DeltaNet "
        "with 16 key / 32 value heads of 128 + 1 gated full attention with 16 heads, 4 KV heads of 256), "
        "vocab 248320), 448 px images (196 merged tokens), bf16; GPU only",
        gpu_only=True,
    ),
}


def qwen3_vision_flops(
    vision_config: Any, num_images: int, image_hw: tuple[int, int], *, trainable: bool
) -> tuple[Flops, Flops]:
    """Qwen3's tower, its merger and its DeepStack mergers over ``num_images`` images of ``image_hw``
    px (a multiple of the merge unit, as the processor resizes).

    Patch embedding (``3 * 2 * p * p -> H`` per patch), each block's ``qkv``, ``proj``, ``fc1``,
    ``fc2`` and full attention over the image; then the merger and one DeepStack merger per level
    (each ``4H -> 4H -> out`` over the merged tokens). A frozen tower runs forward only; the mergers
    train (the projector), their norms included, so their first linear passes a gradient back too.

    Returns:
        ``(tower, mergers)`` :class:`Flops`.
    """
    v = vision_config
    rows, cols = image_hw[0] // v.patch_size, image_hw[1] // v.patch_size
    patches = num_images * rows * cols
    d, inner, heads = v.hidden_size, v.intermediate_size, v.num_heads
    grad = trainable

    def lin(d_in: int, d_out: int) -> Flops:
        return linear_flops(patches, d_in, d_out, grad_input=grad, grad_weight=grad)

    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size**2
    total = linear_flops(patches, patch_dim, d, grad_input=False, grad_weight=grad)
    block = lin(d, 3 * d) + lin(d, d) + lin(d, inner) + lin(inner, d)
    block = block + attention_flops(num_images, heads, rows * cols, rows * cols, d // heads, grad=grad)
    for _ in range(v.depth):
        total = total + block
    merged = patches // v.spatial_merge_size**2
    unit = d * v.spatial_merge_size**2
    one = linear_flops(merged, unit, unit, grad_input=True, grad_weight=True) + linear_flops(
        merged, unit, v.out_hidden_size, grad_input=True, grad_weight=True
    )
    mergers = one
    for _ in getattr(v, "deepstack_visual_indexes", None) or ():
        mergers = mergers + one
    return total, mergers


def delta_rule_flops(batch: int, seq_len: int, value_heads: int, dk: int, dv: int, *, grad: bool) -> dict:
    """The chunked Gated DeltaNet scan of transformers' reference kernel over ``batch`` sequences of
    ``seq_len`` (padded to whole chunks of :data:`DELTA_CHUNK`), keys repeated to ``value_heads``.

    Per chunk and head: ``k_beta K^T`` and ``Q K^T`` (``(C, dk) @ (dk, C)``), then against the
    ``(dk, dv)`` state ``K_cumdecay S`` and ``Q S``, ``A V_new`` (``(C, C) @ (C, dv)``) and
    ``K^T V_new``. Backward computes both operands' gradients of each product, except the first
    chunk's two reads of the zero initial state (no gradient) and the last chunk's state update (never
    read), plus the triangular solves' matrix gradients (``(C, dv) @ (dv, C)`` and ``(C, dk) @ (dk, C)``).

    Returns:
        ``{"scan": Flops, "solve": int}``: the products ``FlopCounterMode`` counts, and the forward
        multiply-adds of the two triangular solves, which it does not (x2: FLOPs).
    """
    c = DELTA_CHUNK
    chunks = -(-seq_len // c)
    heads = batch * value_heads
    per_chunk = 2 * matmul_flops(c, dk, c) + 2 * matmul_flops(c, dk, dv)
    per_chunk += matmul_flops(c, c, dv) + matmul_flops(dk, c, dv)
    forward = heads * chunks * per_chunk
    backward = 0
    if grad:
        # The zero initial state needs no gradient (the first chunk's two reads of it pass one each),
        # and the state after the last chunk is never read (its update runs forward only).
        backward = 2 * forward - heads * (2 * matmul_flops(c, dk, dv) + 2 * matmul_flops(dk, c, dv))
        backward += heads * chunks * (matmul_flops(c, dv, c) + matmul_flops(c, dk, c))
    solve = heads * chunks * c * c * (dk + dv)
    return {"scan": Flops(forward, backward), "solve": solve}


def hybrid_llm_flops(
    text_config: Any, batch: int, seq_len: int, parts: TrainableParts, logits_positions: int | None = None
) -> tuple[Flops, int]:
    """Qwen3.5's hybrid LLM over ``batch`` sequences of ``seq_len`` (padding included): per layer its
    gated MLP, and by ``layer_types`` either gated full attention (``q_proj`` to twice the heads: query
    and output gate) or a Gated DeltaNet layer (projections, causal depthwise conv1d, the chunked scan
    of :func:`delta_rule_flops`, ``out_proj``); then the LM head (over ``logits_positions`` per
    sequence, None: all, as :func:`llama_flops`). With LoRA, each layer's adapters on the targets it
    has (:func:`~visionzip_core.families.flops.lora_flops`): full attention's ``q_proj`` (to the query
    and its gate), ``k_proj``, ``v_proj``, ``o_proj``, a DeltaNet layer's ``in_proj_qkv``,
    ``in_proj_z``, ``in_proj_b``, ``in_proj_a``, ``out_proj``, and every layer's MLP.

    Returns:
        ``(Flops, solve)``: the counted products, and the triangular solves' FLOPs apart.
    """
    t = text_config
    tokens = batch * seq_len
    d, hd = t.hidden_size, t.head_dim
    grad_in, grad_w = parts.any, parts.llm == "full"

    def lin(d_in: int, d_out: int) -> Flops:
        return linear_flops(tokens, d_in, d_out, grad_input=grad_in, grad_weight=grad_w)

    mlp = lin(d, t.intermediate_size) + lin(d, t.intermediate_size) + lin(t.intermediate_size, d)
    q_out, kv_out = t.num_attention_heads * hd, t.num_key_value_heads * hd
    full = lin(d, 2 * q_out) + lin(d, kv_out) + lin(d, kv_out) + lin(q_out, d) + mlp
    full = full + attention_flops(batch, t.num_attention_heads, seq_len, seq_len, hd, grad=grad_in)
    key_dim = t.linear_num_key_heads * t.linear_key_head_dim
    value_dim = t.linear_num_value_heads * t.linear_value_head_dim
    conv_dim, kernel = 2 * key_dim + value_dim, t.linear_conv_kernel_dim
    # The causal conv pads kernel - 1 on both sides and keeps the first seq_len outputs.
    conv_fwd = 2 * batch * conv_dim * kernel * (seq_len + kernel - 1)
    conv = Flops(conv_fwd, conv_fwd * (int(grad_in) + int(grad_w)))
    scan = delta_rule_flops(
        batch, seq_len, t.linear_num_value_heads, t.linear_key_head_dim, t.linear_value_head_dim, grad=grad_in
    )
    gates = lin(d, t.linear_num_value_heads)  # in_proj_b and in_proj_a
    linear = lin(d, conv_dim) + lin(d, value_dim) + gates + gates
    linear = linear + conv + scan["scan"] + lin(value_dim, d) + mlp
    if parts.llm == "lora":
        inner = t.intermediate_size
        mlp_sizes = {"gate_proj": (d, inner), "up_proj": (d, inner), "down_proj": (inner, d)}
        full_sizes = {
            "q_proj": (d, 2 * q_out),
            "k_proj": (d, kv_out),
            "v_proj": (d, kv_out),
            "o_proj": (q_out, d),
        }
        linear_sizes = {
            "in_proj_qkv": (d, conv_dim),
            "in_proj_z": (d, value_dim),
            "in_proj_b": (d, t.linear_num_value_heads),
            "in_proj_a": (d, t.linear_num_value_heads),
            "out_proj": (value_dim, d),
        }
        absent = sorted(set(parts.lora_targets) - {*mlp_sizes, *full_sizes, *linear_sizes})
        if absent:
            raise ValueError(f"lora_targets {absent}: a {t.model_type} layer has no such layers")
        full = full + lora_flops(tokens, {**full_sizes, **mlp_sizes}, parts)
        linear = linear + lora_flops(tokens, {**linear_sizes, **mlp_sizes}, parts)
    head_tokens = tokens if logits_positions is None else batch * logits_positions
    total = linear_flops(head_tokens, d, t.vocab_size, grad_input=grad_in, grad_weight=grad_w)
    solve = 0
    for kind in t.layer_types:
        if kind == "full_attention":
            total = total + full
        else:
            total, solve = total + linear, solve + 2 * scan["solve"]
    return total, solve


def qwen3_step_flops(
    config: Any,
    parts: TrainableParts,
    *,
    num_images: int,
    image_hw: tuple[int, int],
    seq_len: int,
    split: tuple | None = None,
    logits_positions: int | None = None,
) -> dict[str, Any]:
    """Matmul FLOPs of one Qwen3-VL or Qwen3.5 training step, one image of ``image_hw`` per sample
    (``logits_positions``: as :func:`llama_flops`; 1 with nothing trained is ``generate``'s prefill).

    VisionZip compresses after the mergers, so the tower and every merger see every patch at every
    budget and only the LLM's ``seq_len`` (padded, image tokens included) shrinks. Qwen3-VL's LLM is a
    Qwen3 decoder, counted as :func:`llama_flops` counts a Llama (its q/k norms are element-wise);
    Qwen3.5's is :func:`hybrid_llm_flops`. VisionZip's own products at budget ``split`` (None: stock)
    are Qwen2.5-VL's (:func:`~.qwen_bench.qwen_visionzip_flops`), its merge over the main features and
    the DeepStack levels concatenated along the channels.

    Returns:
        ``{"vision", "visionzip", "projector", "llm", "total"}`` -> :class:`Flops`, and ``"solve"``: the
        DeltaNet triangular solves' FLOPs (0 for Qwen3-VL), which ``total`` leaves out.
    """
    v = config.vision_config
    vision, mergers = qwen3_vision_flops(v, num_images, image_hw, trainable=parts.vision)
    levels = len(getattr(v, "deepstack_visual_indexes", None) or ())
    channels = v.out_hidden_size * (1 + levels)
    grad = parts.projector or parts.vision
    visionzip = qwen_visionzip_flops(v, num_images, image_hw, split, channels, grad=grad)
    text = config.text_config
    if getattr(text, "layer_types", None) and "linear_attention" in text.layer_types:
        llm, solve = hybrid_llm_flops(text, num_images, seq_len, parts, logits_positions)
    else:
        shape = LlamaShape.from_config(text)
        llm, solve = llama_flops(shape, num_images, seq_len, parts, logits_positions), 0
    return {
        "vision": vision,
        "visionzip": visionzip,
        "projector": mergers,
        "llm": llm,
        "total": vision + visionzip + mergers + llm,
        "solve": solve,
    }


def qwen3_synthetic_batch(
    size: Qwen3BenchSize, config: Any, image_tokens: int, device: str | torch.device = "cpu", seed: int = 0
) -> dict[str, torch.Tensor]:
    """Qwen2.5-VL's synthetic batch (:func:`~.qwen_bench.qwen_synthetic_batch`: 16 px patches here,
    from the config) with the ``mm_token_type_ids`` Qwen3's stock forward needs (1 at image tokens)."""
    batch = qwen_synthetic_batch(size, config, image_tokens, device, seed=seed)
    batch["mm_token_type_ids"] = (batch["input_ids"] == config.image_token_id).long()
    return batch
