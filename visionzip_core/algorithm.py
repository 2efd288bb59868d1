"""VisionZip token selection and merging as pure, batched tensor functions.

Shapes use ``B`` images, ``N`` tower tokens (CLS at index 0, then patches in raster order),
``C`` hidden size, ``Ck`` key size (one head's size: keys are averaged over heads), ``D`` dominant
tokens, ``R`` remaining tokens and ``K`` contextual tokens.

Every function is vectorised over the batch (no Python loop over images or tokens), keeps the
dtype and device of ``hidden``, and is differentiable with respect to ``hidden``. Attention scores
and keys only decide *which* tokens are kept and *where* they merge (top-k and argmax), so no
gradient flows through them, exactly as in the paper.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from visionzip_core.config import VisionZipConfig

MergeRule = Literal["paper", "mean"]


def select_dominant_tokens(cls_attention: torch.Tensor, dominant: int, keep_cls: bool = True) -> torch.Tensor:
    """Indices of the dominant tokens, sorted ascending (raster order, CLS first when kept).

    Args:
        cls_attention: ``(B, N)`` attention of the CLS query to every token (CLS included at 0),
            summed over heads.
        dominant: tokens to keep, ``D``. With ``keep_cls`` these are CLS plus the ``D - 1``
            most-attended patches; without it, the ``D`` most-attended patches (CLS is then
            neither dominant nor part of the remainder).
        keep_cls: whether CLS is the first dominant token (the paper keeps it).

    Returns:
        ``(B, D)`` int64 indices into the ``N`` tokens.
    """
    if cls_attention.dim() != 2:
        raise ValueError(f"cls_attention must be (B, N), got shape {tuple(cls_attention.shape)}")
    num_patches = cls_attention.shape[1] - 1
    top = dominant - 1 if keep_cls else dominant
    if dominant < 1 or top > num_patches:
        raise ValueError(
            f"dominant={dominant} must be in [1, {num_patches + int(keep_cls)}] for {num_patches} patches "
            f"(keep_cls={keep_cls})"
        )
    # Offset by one: scores are ranked over patches only, CLS is handled separately.
    patch_idx = cls_attention[:, 1:].topk(top, dim=1).indices + 1
    if keep_cls:
        cls_idx = patch_idx.new_zeros(patch_idx.shape[0], 1)
        patch_idx = torch.cat([cls_idx, patch_idx], dim=1)
    return patch_idx.sort(dim=1).values


def remaining_token_indices(
    dominant_idx: torch.Tensor, num_tokens: int, keep_cls: bool = True
) -> torch.Tensor:
    """Indices of the tokens left after dominant selection, in raster order.

    Args:
        dominant_idx: ``(B, D)`` from :func:`select_dominant_tokens`.
        num_tokens: ``N``, CLS included.
        keep_cls: as given to :func:`select_dominant_tokens`; without it CLS is dropped from the
            remainder too.

    Returns:
        ``(B, R)`` int64 indices with ``R = N - D - (0 if keep_cls else 1)``.
    """
    batch, dominant = dominant_idx.shape
    remaining = num_tokens - dominant - (0 if keep_cls else 1)
    position = torch.arange(num_tokens, device=dominant_idx.device).expand(batch, num_tokens)
    # Push the dropped tokens past the end, then a sort keeps the rest in raster order with a
    # static output shape (no boolean masking with data-dependent sizes).
    dropped = torch.zeros(batch, num_tokens, dtype=torch.long, device=dominant_idx.device)
    dropped.scatter_(1, dominant_idx, 1)
    if not keep_cls:
        dropped[:, 0] = 1
    order = (position + dropped * num_tokens).sort(dim=1).values
    return order[:, :remaining]


def contextual_target_positions(
    remaining: int, contextual: int, device: torch.device | None = None
) -> torch.Tensor:
    """Positions (among the ``R`` remaining tokens) of the merge targets: a uniform stride.

    ``step = max(1, R // K)``; targets are the first ``K`` of ``arange(0, R, step)``.
    Returns a ``(K,)`` int64 tensor.
    """
    step = max(1, remaining // contextual)
    return torch.arange(0, remaining, step, device=device)[:contextual]


def merge_contextual_tokens(
    hidden: torch.Tensor, keys: torch.Tensor, contextual: int, merge: MergeRule = "paper"
) -> torch.Tensor:
    """Merge the remaining tokens into ``contextual`` tokens by key similarity.

    Keys are L2-normalised; ``K`` targets are taken at a uniform stride (see
    :func:`contextual_target_positions`); every other token joins its most cosine-similar target.

    Args:
        hidden: ``(B, R, C)`` hidden states of the remaining tokens, in raster order.
        keys: ``(B, R, Ck)`` their head-averaged keys at the feature layer.
        contextual: ``K``, number of merged tokens (0 gives an empty ``(B, 0, C)``).
        merge: ``"paper"``: target + mean of the tokens assigned to it (the target alone when none
            are); ``"mean"``: mean over the target and its assigned tokens.

    Returns:
        ``(B, K, C)`` in target order, dtype of ``hidden``.
    """
    batch, remaining, channels = hidden.shape
    if keys.shape[:2] != hidden.shape[:2]:
        raise ValueError(f"keys {tuple(keys.shape)} and hidden {tuple(hidden.shape)} disagree on (B, R)")
    if contextual < 0 or contextual > remaining:
        raise ValueError(f"contextual={contextual} must be in [0, {remaining}] (remaining tokens)")
    if merge not in ("paper", "mean"):
        raise ValueError(f"merge={merge!r} must be 'paper' or 'mean'")
    if contextual == 0:
        return hidden.new_zeros(batch, 0, channels)

    # Targets depend only on (R, K), never on the data, so both index sets have static sizes.
    target_pos = contextual_target_positions(remaining, contextual, hidden.device)
    # Sorting instead of nonzero() keeps this free of a device-to-host sync.
    position = torch.arange(remaining, device=hidden.device)
    is_target = torch.zeros(remaining, dtype=torch.long, device=hidden.device).index_fill_(0, target_pos, 1)
    other_pos = (position + is_target * remaining).sort().values[: remaining - contextual]

    unit_keys = F.normalize(keys, dim=-1)
    similarity = torch.bmm(unit_keys[:, other_pos], unit_keys[:, target_pos].transpose(1, 2))  # (B, R-K, K)
    assign = F.one_hot(similarity.argmax(dim=2), contextual).to(hidden.dtype)  # (B, R-K, K)
    counts = assign.sum(dim=1).unsqueeze(-1)  # (B, K, 1)
    assigned_sum = torch.bmm(assign.transpose(1, 2), hidden[:, other_pos])  # (B, K, C)
    target_hidden = hidden[:, target_pos]
    if merge == "paper":
        return target_hidden + assigned_sum / counts.clamp(min=1)
    return (target_hidden + assigned_sum) / (counts + 1)


def visionzip_compress(
    hidden: torch.Tensor, cls_attention: torch.Tensor, keys: torch.Tensor, config: VisionZipConfig
) -> torch.Tensor:
    """Compress one feature layer's tokens to ``dominant + contextual`` per image.

    Args:
        hidden: ``(B, N, C)`` feature-layer hidden states (CLS at 0, patches in raster order).
        cls_attention: ``(B, N)`` CLS attention row at that layer, summed over heads.
        keys: ``(B, N, Ck)`` head-averaged keys at that layer.
        config: the split and options.

    Returns:
        ``(B, D + K, C)``: dominant tokens in raster order (CLS first when kept), then the
        contextual tokens in target order; dtype and device of ``hidden``.
    """
    batch, num_tokens, channels = hidden.shape
    if cls_attention.shape != (batch, num_tokens) or keys.shape[:2] != (batch, num_tokens):
        raise ValueError(
            f"shape mismatch: hidden {tuple(hidden.shape)}, cls_attention {tuple(cls_attention.shape)}, "
            f"keys {tuple(keys.shape)}; expected (B, N, C), (B, N), (B, N, Ck)"
        )
    config.check_fits(num_tokens)
    dominant_idx = select_dominant_tokens(cls_attention, config.dominant, config.keep_cls)
    dominant = hidden.gather(1, dominant_idx.unsqueeze(-1).expand(-1, -1, channels))
    if config.contextual == 0:
        return dominant
    rest_idx = remaining_token_indices(dominant_idx, num_tokens, config.keep_cls)
    rest_hidden = hidden.gather(1, rest_idx.unsqueeze(-1).expand(-1, -1, channels))
    rest_keys = keys.gather(1, rest_idx.unsqueeze(-1).expand(-1, -1, keys.shape[-1]))
    contextual = merge_contextual_tokens(rest_hidden, rest_keys, config.contextual, config.merge)
    return torch.cat([dominant, contextual], dim=1)
