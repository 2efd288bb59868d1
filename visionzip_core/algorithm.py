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

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from visionzip_core.config import VisionZipConfig

MergeRule = Literal["paper", "mean"]


@dataclass(frozen=True)
class ContextualAssignment:
    """Where the ``R`` remaining tokens of each image merge (positions index the remaining tokens).

    Attributes:
        targets: ``(K,)`` int64 positions of the merge targets (a uniform stride, the same for
            every image).
        others: ``(R - K,)`` int64 positions of the other tokens, ascending.
        target_of_other: ``(B, R - K)`` int64, the target (``0..K-1``) each of ``others`` joins.
    """

    targets: torch.Tensor
    others: torch.Tensor
    target_of_other: torch.Tensor


@dataclass(frozen=True)
class TokenSelection:
    """Which of the ``N`` tower tokens VisionZip keeps, and where the rest merge, for ``B`` images.

    Attributes:
        dominant: ``(B, D)`` int64 token indices (CLS = 0, patch ``p`` = ``p + 1``), ascending.
        remaining: ``(B, R)`` int64 token indices of the rest, ascending; None when ``K == 0``
            (the rest is discarded).
        contextual: where the remaining tokens merge; None when ``K == 0``.
    """

    dominant: torch.Tensor
    remaining: torch.Tensor | None
    contextual: ContextualAssignment | None

    def group_of_remaining(self) -> torch.Tensor:
        """``(B, R)`` int64: the contextual token (``0..K-1``) each remaining token ends up in."""
        ctx = self.contextual
        batch = self.remaining.shape[0]
        group = torch.empty_like(self.remaining)
        group[:, ctx.targets] = torch.arange(ctx.targets.shape[0], device=group.device).expand(batch, -1)
        group[:, ctx.others] = ctx.target_of_other
        return group

    def rows(self, start: int, stop: int) -> TokenSelection:
        """The selection of images ``start:stop`` of the batch."""
        ctx = self.contextual
        return TokenSelection(
            dominant=self.dominant[start:stop],
            remaining=None if self.remaining is None else self.remaining[start:stop],
            contextual=None
            if ctx is None
            else ContextualAssignment(ctx.targets, ctx.others, ctx.target_of_other[start:stop]),
        )

    def target_tokens(self) -> torch.Tensor | None:
        """``(B, K)`` int64 token indices of the merge targets; None when ``K == 0``."""
        if self.contextual is None:
            return None
        return self.remaining[:, self.contextual.targets]


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
    # Offset by one: scores are ranked over patches only, CLS is handled separately. Ranked in
    # float32, as a bf16 score would tie.
    patch_idx = cls_attention[:, 1:].float().topk(top, dim=1).indices + 1
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


def assign_contextual_tokens(keys: torch.Tensor, contextual: int) -> ContextualAssignment:
    """Where each remaining token merges: ``K`` uniform-stride targets, every other token to its
    most cosine-similar target (keys L2-normalised). Decides only *where*, so no gradient.

    Args:
        keys: ``(B, R, Ck)`` head-averaged keys of the remaining tokens, in raster order (any
            float dtype; normalised and compared in float32).
        contextual: ``K`` in ``[1, R]``.

    Returns:
        :class:`ContextualAssignment`.
    """
    remaining = keys.shape[1]
    # Targets depend only on (R, K), never on the data, so both index sets have static sizes.
    target_pos = contextual_target_positions(remaining, contextual, keys.device)
    # Sorting instead of nonzero() keeps this free of a device-to-host sync.
    position = torch.arange(remaining, device=keys.device)
    is_target = torch.zeros(remaining, dtype=torch.long, device=keys.device).index_fill_(0, target_pos, 1)
    other_pos = (position + is_target * remaining).sort().values[: remaining - contextual]
    with torch.no_grad():
        # float32 whatever the model dtype: in bf16 the cosines of near-parallel keys round to
        # ties, and argmax then drifts between runs and kernels. The matrix is small.
        unit_keys = F.normalize(keys.detach().float(), dim=-1)
        # (B, R-K, K): cosine similarity of every other token to every target
        similarity = torch.bmm(unit_keys[:, other_pos], unit_keys[:, target_pos].transpose(1, 2))
        target_of_other = similarity.argmax(dim=2)
    return ContextualAssignment(targets=target_pos, others=other_pos, target_of_other=target_of_other)


def merge_assigned_tokens(
    hidden: torch.Tensor, assignment: ContextualAssignment, merge: MergeRule = "paper"
) -> torch.Tensor:
    """The ``K`` contextual tokens from ``hidden`` ``(B, R, C)`` (remaining tokens, raster order) and
    where they merge (:func:`assign_contextual_tokens`). Returns ``(B, K, C)`` in target order.

    ``merge``: ``"paper"``: target + mean of the tokens assigned to it (the target alone when none
    are); ``"mean"``: mean over the target and its assigned tokens.
    """
    if merge not in ("paper", "mean"):
        raise ValueError(f"merge={merge!r} must be 'paper' or 'mean'")
    contextual = assignment.targets.shape[0]
    # (B, R-K, K) one-hot by scatter: F.one_hot checks its index range on the host (a sync).
    target_of_other = assignment.target_of_other
    assign = hidden.new_zeros(*target_of_other.shape, contextual)
    assign.scatter_(2, target_of_other.unsqueeze(-1), 1)
    counts = assign.sum(dim=1).unsqueeze(-1)  # (B, K, 1)
    assigned_sum = torch.bmm(assign.transpose(1, 2), hidden[:, assignment.others])  # (B, K, C)
    target_hidden = hidden[:, assignment.targets]
    if merge == "paper":
        return target_hidden + assigned_sum / counts.clamp(min=1)
    return (target_hidden + assigned_sum) / (counts + 1)


def merge_contextual_tokens(
    hidden: torch.Tensor, keys: torch.Tensor, contextual: int, merge: MergeRule = "paper"
) -> torch.Tensor:
    """Merge the remaining tokens into ``contextual`` tokens by key similarity.

    Keys are L2-normalised; ``K`` targets are taken at a uniform stride (see
    :func:`contextual_target_positions`); every other token joins its most cosine-similar target
    (:func:`assign_contextual_tokens`, then :func:`merge_assigned_tokens`).

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
    return merge_assigned_tokens(hidden, assign_contextual_tokens(keys, contextual), merge)


def select_visionzip_tokens(
    cls_attention: torch.Tensor, keys: torch.Tensor, config: VisionZipConfig
) -> TokenSelection:
    """Which tokens VisionZip keeps and where the rest merge; no hidden states needed.

    :func:`visionzip_compress` applies exactly this selection (:func:`compress_selected`), so what
    it returns is what the model feeds its projector; :func:`token_groups` turns it into a map.

    Args:
        cls_attention: ``(B, N)`` CLS attention row at the feature layer, summed over heads.
        keys: ``(B, N, Ck)`` head-averaged keys at that layer.
        config: the split and options.

    Returns:
        :class:`TokenSelection`.
    """
    num_tokens = cls_attention.shape[1]
    config.check_fits(num_tokens)
    dominant_idx = select_dominant_tokens(cls_attention, config.dominant, config.keep_cls)
    if config.contextual == 0:
        return TokenSelection(dominant=dominant_idx, remaining=None, contextual=None)
    rest_idx = remaining_token_indices(dominant_idx, num_tokens, config.keep_cls)
    rest_keys = keys.gather(1, rest_idx.unsqueeze(-1).expand(-1, -1, keys.shape[-1]))
    return TokenSelection(
        dominant=dominant_idx,
        remaining=rest_idx,
        contextual=assign_contextual_tokens(rest_keys, config.contextual),
    )


def compress_selected(
    hidden: torch.Tensor, selection: TokenSelection, merge: MergeRule = "paper"
) -> torch.Tensor:
    """``(B, D + K, C)`` from ``hidden`` ``(B, N, C)`` and a :class:`TokenSelection` of the same batch:
    dominant tokens (raster order, CLS first when kept), then contextual tokens in target order."""
    channels = hidden.shape[-1]
    dominant = hidden.gather(1, selection.dominant.unsqueeze(-1).expand(-1, -1, channels))
    if selection.contextual is None:
        return dominant
    rest_hidden = hidden.gather(1, selection.remaining.unsqueeze(-1).expand(-1, -1, channels))
    contextual = merge_assigned_tokens(rest_hidden, selection.contextual, merge)
    return torch.cat([dominant, contextual], dim=1)


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
    return compress_selected(hidden, select_visionzip_tokens(cls_attention, keys, config), config.merge)


#: :func:`token_groups` code of a dominant token.
DOMINANT = -1
#: :func:`token_groups` code of a token the model discards (CLS without ``keep_cls``, the remainder
#: when ``contextual == 0``).
DROPPED = -2


def token_groups(selection: TokenSelection, num_tokens: int) -> torch.Tensor:
    """What becomes of every tower token: ``(B, N)`` int64, :data:`DOMINANT`, :data:`DROPPED`, or
    ``k`` in ``[0, K)`` for a token merged into contextual token ``k`` (its target included)."""
    batch = selection.dominant.shape[0]
    groups = torch.full((batch, num_tokens), DROPPED, dtype=torch.long, device=selection.dominant.device)
    groups.scatter_(1, selection.dominant, DOMINANT)
    if selection.contextual is not None:
        groups.scatter_(1, selection.remaining, selection.group_of_remaining())
    return groups


def select_by_scores(
    scores: torch.Tensor, keys: torch.Tensor, dominant: int, contextual: int
) -> TokenSelection:
    """VisionZip's choice for a tower without CLS: the ``dominant`` highest-scoring tokens, and the
    rest merged into ``contextual`` tokens by key similarity (uniform-stride targets, as
    :func:`assign_contextual_tokens`).

    Args:
        scores: ``(B, N)`` a score per token standing in for CLS attention (Qwen2.5-VL: the
            attention each token receives, averaged over heads and summed over queries).
        keys: ``(B, N, Ck)`` head-averaged keys.
        dominant: ``D`` in ``[1, N]``; contextual: ``K`` in ``[0, N - D]``.

    Returns:
        :class:`TokenSelection` whose indices are token positions ``0..N-1`` (no CLS offset).
    """
    num_tokens = scores.shape[1]
    if not 1 <= dominant <= num_tokens or not 0 <= contextual <= num_tokens - dominant:
        raise ValueError(
            f"dominant={dominant}, contextual={contextual} do not fit {num_tokens} tokens "
            "(need 1 <= dominant and dominant + contextual <= tokens)"
        )
    dominant_idx = scores.float().topk(dominant, dim=1).indices.sort(dim=1).values
    if contextual == 0:
        return TokenSelection(dominant=dominant_idx, remaining=None, contextual=None)
    rest_idx = remaining_token_indices(dominant_idx, num_tokens, keep_cls=True)
    rest_keys = keys.gather(1, rest_idx.unsqueeze(-1).expand(-1, -1, keys.shape[-1]))
    return TokenSelection(
        dominant=dominant_idx, remaining=rest_idx, contextual=assign_contextual_tokens(rest_keys, contextual)
    )


def compress_in_place_order(
    hidden: torch.Tensor, selection: TokenSelection, merge: MergeRule = "paper"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept tokens in their original order, each contextual token in its target's place.

    This is the layout the authors' Qwen2.5-VL code gives the LLM (a boolean mask over the image
    tokens, the contextual token written into its target's slot), unlike LLaVA's dominant-then-
    contextual order.

    Args:
        hidden: ``(B, N, C)``; selection: a :class:`TokenSelection` of the same batch.

    Returns:
        ``(tokens (B, D + K, C), positions (B, D + K))``: the compressed tokens and the original
        index each one stands at (a dominant token's own, a contextual token's target's), ascending.
    """
    tokens = compress_selected(hidden, selection, merge)
    places = selection.dominant
    if selection.contextual is not None:
        places = torch.cat([places, selection.target_tokens()], dim=1)
    order = places.argsort(dim=1)
    tokens = tokens.gather(1, order.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return tokens, places.gather(1, order)
