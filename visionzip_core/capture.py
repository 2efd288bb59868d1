"""Run a CLIP vision tower up to the feature layer and capture what VisionZip needs there.

The tower keeps its own attention kernel (SDPA or flash attention) for every layer. At the
feature layer, forward hooks on that layer's ``self_attn.q_proj`` and ``self_attn.k_proj`` see the
projections the layer computes anyway (from its own ``layer_norm1`` of its own input); from them
only the CLS query's attention row is formed, which costs ``O(N)`` instead of the ``O(N^2)`` maps
per layer that ``output_attentions`` (and eager attention) would store. Layers after the feature
layer are not run.

Hazards handled here:
  - DeepSpeed ZeRO-3 gathers parameters in module hooks, so every submodule is *called*, never
    read through ``.weight`` directly.
  - Under gradient checkpointing, CLIP layers re-run their forward in backward; the hooks are
    removed before this function returns, so the replay does not capture again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class FeatureLayerCapture:
    """What one pass of :func:`capture_feature_layer` returns.

    Attributes:
        hidden: ``(B, N, C)`` output of the feature layer (== HF ``hidden_states[feature_layer]``).
        cls_attention: ``(B, N)`` float32 softmax attention of the CLS query at the feature layer,
            summed over heads (detached: it only ranks tokens).
        keys: ``(B, N, head_dim)`` float32 keys at the feature layer averaged over heads (detached:
            they only assign tokens to merge targets).
    """

    hidden: torch.Tensor
    cls_attention: torch.Tensor
    keys: torch.Tensor


def resolve_feature_layer(feature_layer: int, num_layers: int) -> int:
    """Map an HF ``hidden_states`` index (negative allowed) to ``1..num_layers``.

    ``hidden_states[i]`` is the output of encoder layer ``i - 1`` (``hidden_states[0]`` is the
    embedding output, which has no attention of its own and so is rejected).
    """
    if isinstance(feature_layer, bool) or not isinstance(feature_layer, int):
        raise ValueError(
            f"visionzip.feature_layer must be a single int, got {feature_layer!r} "
            "(multi-layer vision features are not supported)"
        )
    index = feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer
    if not 1 <= index <= num_layers:
        raise ValueError(
            f"visionzip.feature_layer={feature_layer} is out of range for a {num_layers}-layer vision tower "
            f"(allowed: 1..{num_layers} or -{num_layers}..-1)"
        )
    return index


def check_vision_tower(tower: nn.Module) -> None:
    """Raise ``ValueError`` unless ``tower`` is laid out like transformers' ``CLIPVisionModel``."""
    missing = [name for name in ("embeddings", "pre_layrnorm", "encoder") if not hasattr(tower, name)]
    if not missing and not hasattr(tower.encoder, "layers"):
        missing.append("encoder.layers")
    if missing:
        raise ValueError(
            f"visionzip supports CLIP vision towers (transformers CLIPVisionModel); "
            f"{type(tower).__name__} lacks {', '.join(missing)}"
        )


def capture_feature_layer(
    tower: nn.Module,
    pixel_values: torch.Tensor,
    feature_layer: int = -2,
    interpolate_pos_encoding: bool = False,
) -> FeatureLayerCapture:
    """Run ``tower`` through the feature layer only and capture hidden states, CLS attention and keys.

    Args:
        tower: a transformers ``CLIPVisionModel`` (``embeddings``, ``pre_layrnorm``, ``encoder.layers``).
        pixel_values: ``(B, 3, H, W)``; cast to the patch embedding's dtype as the stock tower does.
        feature_layer: HF ``hidden_states`` index, e.g. -2 as in LLaVA-1.5.
        interpolate_pos_encoding: passed to the embeddings, as the stock tower does.

    Returns:
        :class:`FeatureLayerCapture`.
    """
    check_vision_tower(tower)
    layers = tower.encoder.layers
    index = resolve_feature_layer(feature_layer, len(layers))

    hidden = tower.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
    hidden = tower.pre_layrnorm(hidden)
    # Positional hidden state: gradient checkpointing with use_reentrant=True only tracks
    # positional tensor arguments. CLIP vision attention takes no mask.
    for layer in layers[: index - 1]:
        hidden = layer(hidden, None)

    feature = layers[index - 1]
    attn = feature.self_attn
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(_module, _inputs, output):
            seen.setdefault(name, output)

        return hook

    handles = [attn.q_proj.register_forward_hook(keep("q")), attn.k_proj.register_forward_hook(keep("k"))]
    try:
        hidden = feature(hidden, None)
    finally:
        for handle in handles:
            handle.remove()
    if "q" not in seen or "k" not in seen:
        raise RuntimeError(
            "visionzip: the feature layer did not call self_attn.q_proj/k_proj; unsupported tower"
        )

    batch, num_tokens, _ = hidden.shape
    num_heads, head_dim = attn.num_heads, attn.head_dim
    with torch.no_grad():
        keys = seen["k"].detach().view(batch, num_tokens, num_heads, head_dim)
        cls_query = seen["q"].detach()[:, 0].view(batch, num_heads, 1, head_dim)
        # (B, H, 1, d) @ (B, H, d, N): the CLS row only, in float32 as eager attention's softmax.
        logits = cls_query.float() @ keys.float().permute(0, 2, 3, 1) * attn.scale
        cls_attention = logits.softmax(dim=-1).sum(dim=1).squeeze(1)
        # Averaged in float32: the keys only decide merge targets, by cosine, which a bf16 mean
        # would already have rounded.
        head_mean_keys = keys.float().mean(dim=2)
    return FeatureLayerCapture(hidden=hidden, cls_attention=cls_attention, keys=head_mean_keys)
