"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): a native-resolution ViT without CLS, windowed
attention in most blocks, a 2x2 patch merger as the projector, and M-RoPE positions in the LLM.

Rule, per the authors' release ``Qwen2_5_VL/qwen2_5vl_visionzip.py`` (VisionZip commit 68993a3,
"Release code for Qwen2.5VL", a modified transformers 4.49 ``modeling_qwen2_5_vl.py``):

- **Block.** The last vision block (``layer_num == len_blocks - 1``), a full-attention block in every
  released size (``fullatt_block_indexes`` ends with ``depth - 1``). Its attention is recomputed
  for that block only; the other blocks keep their kernel.
- **Score replacing CLS attention.** The attention each patch *receives*: softmax(q k^T / sqrt(d))
  with q and k after the vision RoPE, averaged over heads, summed over queries, then averaged over
  the 4 patches of each 2x2 merge unit and put back in raster order (``reverse_indices``).
- **After the merger.** Selection runs on the ``N`` merged tokens (the merger's outputs, in the
  LLM's embedding space); keys are the block's post-RoPE keys averaged over the 4 patches of a unit
  and over heads.
- **Budget.** ``dominant = int(0.65 N)``, ``contextual = max(int(0.05 N), 1)`` hard-coded (70 %
  kept; the README suggests 0.45 for 50 %). Here: ``dominant_ratio``/``contextual_ratio`` with the
  same flooring (:meth:`VisionZipConfig.split_for`), or fixed counts.
- **Contextual tokens.** The non-dominant tokens in raster order, targets at a uniform stride
  (``step = max(1, R // K)``), every other token joins its most cosine-similar target (normalised
  keys), merged as target + mean of its members (``merge="paper"``), in merger-output space.
- **Order.** Kept tokens stay in raster order, dominant and contextual interleaved: the authors
  mask the image run and write each contextual token into its target's slot.
- **M-RoPE positions.** ``get_rope_index`` runs on the *full* sequence and the kept tokens' 3D
  positions are gathered: a dominant token keeps its own (t, h, w), a contextual token takes its
  target's, and the text after an image keeps its stock positions (the gap stays). Decoding then
  continues at the stock model's positions (``rope_deltas`` of the full sequence).

Where the reference is defective, its selection is kept and the defect fixed:

- it is batch-size-1 only (``img_mask`` from row 0, all image tokens taken as one contiguous run:
  VisionZip issue #26, "657 vs 655" for two images) and its budget and top-k run over every image
  of the call at once. Here each image (and each 2-frame temporal group of a video) has its own
  budget and selection, and any batch works;
- its flash-attention recompute ignores ``cu_seqlens`` (scores mix across images); here the scores
  are per attention segment, as its eager path computes them, chunked over queries so no
  ``H x N x N`` map is ever held;
- it leaves videos uncompressed (and crashes on them); here a video is compressed per temporal
  group with the same rule;
- it prunes inside the model, so ``input_ids``, labels and the attention mask keep the full length
  and are cut by mask; here the processor (:meth:`Qwen2_5VL.adapt_processor`) emits exactly the
  compressed count of ``<|image_pad|>``/``<|video_pad|>`` per image or video, so labels, masks,
  padding and the KV cache all have one length, and the positions are recomputed for that
  sequence (:func:`_visionzip_rope_index`) with the reference's values.

Because the kept set depends on the pixels, ``generate`` (which prepares positions before any
vision forward) gets the right text positions and ``rope_deltas`` up front (they do not depend on
which tokens are kept), and the image tokens' own positions are filled in by the prefill forward.
"""

from __future__ import annotations

import inspect
import itertools
import json
import re
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLModel,
    Qwen2VLForConditionalGeneration,
    Qwen2VLModel,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures
from transformers.vision_utils import get_vision_window_index

from visionzip_core.algorithm import compress_in_place_order, select_by_scores
from visionzip_core.capture import resolve_feature_layer
from visionzip_core.config import VisionZipConfig
from visionzip_core.data.images import ImageLayout
from visionzip_core.families.base import LORA_TARGETS, ImageTokenSelection, ModelFamily
from visionzip_core.families.qwen_bench import QWEN_SIZES, qwen_step_flops, qwen_synthetic_batch
from visionzip_core.families.qwen_downloads import qwen_preprocessor_config, write_tiny_folder
from visionzip_core.families.qwen_processing import NativeResize, load_qwen_processor
from visionzip_core.weight_checks import load_checked

PROJECTOR = "merger"
_ACTIVE = "_visionzip_active"
_KEPT = "_visionzip_kept"
# "frame_group" on an adapted inner model whose processor writes one video run per frame group.
_VIDEO_RUNS = "_visionzip_video_runs"
# True on an adapted inner model whose stock forward refuses input_ids with inputs_embeds.
_EMBEDS_ONLY = "_visionzip_embeds_only"
_IDS = "_visionzip_input_ids"
# Query rows per chunk of the score computation: heads x chunk x segment floats at a time.
_SCORE_CHUNK_ELEMENTS = 1 << 26


def find_qwen_model(
    model: nn.Module, inner_classes: tuple[type, ...] = (Qwen2_5_VLModel, Qwen2VLModel)
) -> Qwen2_5_VLModel | Qwen2VLModel:
    """The inner model (one of ``inner_classes``, the families' ``*Model`` classes) inside ``model``:
    itself, its ForConditionalGeneration (whose ``.model`` it is), or a PEFT wrapper of either."""
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    if isinstance(inner, inner_classes):
        return inner
    if isinstance(getattr(inner, "model", None), inner_classes):
        return inner.model
    names = ", ".join(c.__name__.replace("Model", "ForConditionalGeneration") for c in inner_classes)
    raise ValueError(
        f"visionzip: this qwen family takes {names} or their inner models (optionally wrapped by peft); "
        f"got {type(model).__name__}"
    )


def _unit(vision_config: Any) -> int:
    """Pixels per merged token side: ``patch_size * spatial_merge_size`` (28)."""
    return vision_config.patch_size * vision_config.spatial_merge_size


def merged_grid(vision_config: Any, image_size: tuple[int, int]) -> tuple[int, int]:
    """``(rows, cols)`` of merged tokens for an image the processor resized to ``image_size`` (H, W)."""
    if image_size is None:
        raise ValueError("qwen2.5-vl: the visual-token count depends on the image size; pass it")
    unit = _unit(vision_config)
    height, width = (int(v) for v in image_size)
    if height % unit or width % unit or height < unit or width < unit:
        raise ValueError(
            f"qwen2.5-vl: an image of {height}x{width} px (height x width) was not resized by the processor (sides must be "
            f"positive multiples of {unit})"
        )
    return height // unit, width // unit


def temporal_groups(vision_config: Any, frames: int) -> int:
    """Temporal groups of a video of ``frames`` frames (padded to a multiple of temporal_patch_size)."""
    step = vision_config.temporal_patch_size
    return -(-int(frames) // step)


def compressed_count(vz: VisionZipConfig, grid_thw: Any, merge: int, what: str) -> int:
    """Tokens VisionZip keeps of an image or video of patch grid ``grid_thw`` (t, h, w): each temporal
    group of ``h * w / merge**2`` merged tokens is split on its own."""
    t, h, w = (int(v) for v in grid_thw)
    dominant, contextual = vz.split_for(h * w // merge**2, what)
    return t * (dominant + contextual)


# --- capture: the last block's received-attention scores and keys ------------------------------------


class _LastBlockCapture:
    """Hooks on one vision block's attention: its rotary tables and its ``qkv`` output, from which
    :meth:`scores_and_keys` computes the reference's scores without a second attention kernel run
    and without materialising any ``N x N`` map."""

    def __init__(self, block: nn.Module):
        self.attn = block.attn
        self.position_embeddings: Any = None
        self.qkv: torch.Tensor | None = None
        self.armed = False
        self._handles = [
            self.attn.register_forward_pre_hook(self._pre, with_kwargs=True),
            self.attn.qkv.register_forward_hook(self._qkv),
        ]

    def _pre(self, module, args, kwargs):
        if self.armed:  # a gradient-checkpointing recompute in backward must not overwrite it
            self.position_embeddings = kwargs.get("position_embeddings")

    def _qkv(self, module, args, output):
        if self.armed:
            self.qkv = output.detach()
            self.armed = False

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    @torch.no_grad()
    def scores_and_keys(self, bounds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores (S,), keys (S, Ck))`` per patch, in the tower's (window) order, float32.

        ``bounds``: the full-attention segments' cumulative bounds (one segment per frame group of
        each image or video), read on the host from the grids, so the device is never asked.
        ``scores[j]``: attention patch ``j`` receives within its segment, averaged over heads and
        summed over queries; ``keys``: post-RoPE keys averaged over heads.
        """
        if self.qkv is None:
            raise RuntimeError("visionzip: the last vision block did not run")
        heads = self.attn.num_heads
        seq = self.qkv.shape[0]
        q, k, _ = self.qkv.reshape(seq, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = self.position_embeddings
        # The tower's own rotary function (Qwen2-VL and Qwen2.5-VL each have theirs).
        rotate = sys.modules[type(self.attn).__module__].apply_rotary_pos_emb_vision
        q, k = rotate(q, k, cos, sin)
        q, k = q.float().transpose(0, 1), k.float().transpose(0, 1)  # (heads, S, d)
        scores = torch.zeros(seq, dtype=torch.float32, device=q.device)
        for start, stop in zip(bounds[:-1], bounds[1:]):
            length = stop - start
            keys_seg = k[:, start:stop]
            chunk = max(1, _SCORE_CHUNK_ELEMENTS // max(1, heads * length))
            for q0 in range(start, stop, chunk):
                logits = q[:, q0 : min(q0 + chunk, stop)] @ keys_seg.transpose(1, 2) * self.attn.scaling
                scores[start:stop] += logits.softmax(dim=-1).mean(dim=0).sum(dim=0)
        return scores, k.mean(dim=0)


def _segment_bounds(host_grid: list[list[int]]) -> list[int]:
    """Cumulative patch bounds of the full-attention segments: one per frame group of each item."""
    bounds = [0]
    for t, h, w in host_grid:
        for _ in range(t):
            bounds.append(bounds[-1] + h * w)
    return bounds


def _vision_scores(
    inner: Qwen2_5_VLModel,
    pixel_values: torch.Tensor,
    grid_thw: torch.Tensor,
    host_grid: list[list[int]] | None = None,
):
    """Run the stock tower once; return ``(merged (sum N, H * (1 + L)), scores (sum N,), keys (sum N, Ck))``
    per merged token in raster order (the merger's output order). ``host_grid``: ``grid_thw.tolist()``
    when the caller already read it.

    A tower with DeepStack (Qwen3-VL) also returns ``L`` per-level merger outputs with the same rows;
    they are concatenated to the main merger output along the channels, so that one selection and
    one merge (per-channel linear: target + mean of members) act on every level alike and
    :func:`split_levels` takes them apart again. ``L = 0`` otherwise."""
    host_grid = grid_thw.tolist() if host_grid is None else host_grid
    visual = inner.visual
    unit = visual.spatial_merge_size**2
    tower_kwargs: dict[str, torch.Tensor] = {}
    reverse = None
    if getattr(visual, "window_size", None):  # Qwen2.5-VL runs its blocks in window order
        # Computed once, from the host grids, and handed to the tower (which would compute the same
        # itself): the scores are put back in raster order with it.
        window_index, cu_window_seqlens = get_vision_window_index(
            torch.tensor(host_grid, dtype=torch.long),
            spatial_merge_size=visual.spatial_merge_size,
            window_size=visual.window_size,
            patch_size=visual.patch_size,
        )
        window_index = window_index.to(pixel_values.device, non_blocking=True)
        tower_kwargs = {
            "window_index": window_index,
            "cu_window_seqlens": cu_window_seqlens.to(pixel_values.device, non_blocking=True),
        }
        reverse = torch.argsort(window_index)
    capture = _LastBlockCapture(visual.blocks[-1])
    try:
        capture.armed = True
        merged = _stacked(visual(pixel_values.type(visual.dtype), grid_thw=grid_thw, **tower_kwargs))
        scores, keys = capture.scores_and_keys(_segment_bounds(host_grid))
    finally:
        capture.armed = False
        capture.remove()
    scores = scores.view(-1, unit).mean(dim=1)
    keys = keys.view(-1, unit, keys.shape[-1]).mean(dim=1)
    if reverse is not None:
        scores, keys = scores[reverse], keys[reverse]
    return merged, scores, keys


def _stacked(tower_output) -> torch.Tensor:
    """``(sum N, H * (1 + L))``: the merger output and every DeepStack level's, side by side."""
    levels = getattr(tower_output, "deepstack_features", None) or []
    merged = tower_output.pooler_output
    return torch.cat([merged, *levels], dim=-1) if levels else merged


def deepstack_levels(inner: nn.Module) -> int:
    """How many DeepStack levels the tower feeds the LLM (0 without DeepStack)."""
    return len(getattr(inner.visual, "deepstack_merger_list", None) or ())


def split_levels(features: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """``(n, H * (1 + L))`` -> ``[(n, H)] * (1 + L)``: the main features, then each DeepStack level."""
    return list(features.chunk(1 + levels, dim=-1)) if levels else [features]


def compress_vision(
    inner: Qwen2_5_VLModel,
    pixel_values: torch.Tensor,
    grid_thw: torch.Tensor,
    kind: str = "image",
    host_grid: list[list[int]] | None = None,
    names: list[str] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """VisionZip on a batch of images (or videos, or both) of any sizes, in one tower call.

    Args:
        pixel_values: the items' patches, concatenated; grid_thw: ``(items, 3)``.
        kind: what the items are, for error messages (``names`` overrides it per item).
        host_grid: ``grid_thw.tolist()`` when the caller already read it (one host read per forward).

    Returns:
        ``(features, kept, merged)``: per item, ``(n_kept, H)`` compressed merger outputs in raster
        order and ``(n_kept,)`` the merged-token index each stands at (contextual tokens at their
        target's); ``merged`` the uncompressed ``(sum N, H)`` merger outputs.

    Every temporal group is split on its own; groups of one size are selected together, as one
    batch, so the device work grows with the number of distinct sizes, and no value is read back.
    """
    vz: VisionZipConfig = getattr(inner, _ACTIVE)
    vision = inner.config.vision_config
    merge = vision.spatial_merge_size
    host_grid = grid_thw.tolist() if host_grid is None else host_grid
    names = names or [f"{kind} {i}" for i in range(len(host_grid))]
    merged, scores, keys = _vision_scores(inner, pixel_values, grid_thw, host_grid)
    # Host bookkeeping from the grids: (item, first merged token, frame group) per temporal group.
    groups, by_split, offset = [], {}, 0
    for i, (t, h, w) in enumerate(host_grid):
        size = h * w // merge**2
        split = vz.split_for(size, f"{names[i]} ({h * vision.patch_size}x{w * vision.patch_size} px)")
        for g in range(t):
            by_split.setdefault((size, *split), []).append(len(groups))
            groups.append((i, offset, g * size))
            offset += size
    tokens_of: list[torch.Tensor] = [None] * len(groups)
    places_of: list[torch.Tensor] = [None] * len(groups)
    for (size, dominant, contextual), members in by_split.items():
        starts = torch.tensor([groups[j][1] for j in members], device=merged.device)
        index = starts[:, None] + torch.arange(size, device=merged.device)  # (G, size)
        selection = select_by_scores(scores[index], keys[index], dominant, contextual)
        tokens, where = compress_in_place_order(merged[index], selection, vz.merge)
        for row, j in enumerate(members):
            tokens_of[j], places_of[j] = tokens[row], where[row] + groups[j][2]
    features, kept = [], []
    for i in range(len(host_grid)):
        mine = [j for j, group in enumerate(groups) if group[0] == i]
        features.append(torch.cat([tokens_of[j] for j in mine]))
        kept.append(torch.cat([places_of[j] for j in mine]))
    return features, kept, merged


# --- what the selection looks like (scripts/show_tokens.py) ------------------------------------------


def patches_to_pictures(vision_config: Any, rows: torch.Tensor, grid_thw: Any) -> torch.Tensor:
    """The processor's patch rows of one image or video back to pictures: ``(t, 3, H, W)``, the first
    frame of each temporal group, still normalised.

    Args:
        rows: ``(t * h * w, C * T * P * P)`` in the processors' order: rows (t, h-block, w-block,
            h-in-merge, w-in-merge), columns (channel, frame-in-group, pixel row, pixel column).
        grid_thw: ``(t, h, w)`` in patches.
    """
    t, h, w = (int(v) for v in grid_thw)
    m, p = vision_config.spatial_merge_size, vision_config.patch_size
    temporal = vision_config.temporal_patch_size
    x = rows.reshape(t, h // m, w // m, m, m, -1, temporal, p, p)[..., 0, :, :]  # first frame of a group
    # (t, hb, wb, hm, wm, C, ph, pw) -> (t, C, hb, hm, ph, wb, wm, pw)
    return x.permute(0, 5, 1, 3, 6, 2, 4, 7).reshape(t, -1, h * p, w * p)


def select_tokens(
    inner: Qwen2_5_VLModel, pixel_values: torch.Tensor, grid_thw: torch.Tensor, kind: str = "image"
) -> list[list[ImageTokenSelection]]:
    """Per image (or video), per temporal group, what the adapted forward keeps: the scores, split and
    selection calls of :func:`compress_vision`, on the merged tokens of the resized picture."""
    vz: VisionZipConfig = getattr(inner, _ACTIVE)
    vision = inner.config.vision_config
    merge = vision.spatial_merge_size
    _, scores, keys = _vision_scores(inner, pixel_values, grid_thw)
    out, offset, row = [], 0, 0
    for i, (t, h, w) in enumerate(grid_thw.tolist()):
        group = h * w // merge**2
        size = f"{h * vision.patch_size}x{w * vision.patch_size} px (height x width)"
        dominant, contextual = vz.split_for(group, f"{kind} {i} ({size})")
        pictures = patches_to_pictures(vision, pixel_values[row : row + t * h * w], (t, h, w))
        row += t * h * w
        groups = []
        for g in range(t):
            span = slice(offset, offset + group)
            selection = select_by_scores(scores[None, span], keys[None, span], dominant, contextual)
            groups.append(
                ImageTokenSelection(
                    pictures[g : g + 1], selection, (0, 0), h // merge, (h // merge, w // merge), cls=False
                )
            )
            offset += group
        out.append(groups)
    return out


# --- the adapted model's methods ---------------------------------------------------------------------


def _encoder_output(merged, features, levels: int) -> BaseModelOutputWithPooling:
    """The stock ``get_*_features`` output: ``pooler_output`` one tensor per item, and with DeepStack
    ``deepstack_features`` one tuple per level of one tensor per item (same rows, same order)."""
    if not levels:
        return BaseModelOutputWithPooling(last_hidden_state=merged, pooler_output=tuple(features))
    per_item = [split_levels(f, levels) for f in features]
    return BaseModelOutputWithDeepstackFeatures(
        last_hidden_state=split_levels(merged, levels)[0],
        pooler_output=tuple(parts[0] for parts in per_item),
        deepstack_features=[tuple(parts[1 + level] for parts in per_item) for level in range(levels)],
    )


def _pooled(merged, features, kept, grid_thw, host_grid, levels: int = 0) -> BaseModelOutputWithPooling:
    output = _encoder_output(merged, features, levels)
    # Where each kept token stands travels with the features: generate computes them before its
    # first forward and hands them in as mm_encoder_outputs, and the positions need them.
    object.__setattr__(output, _KEPT, (kept, grid_thw, host_grid))
    return output


def _features(self: Qwen2_5_VLModel, pixel_values, grid_thw, kind: str, **kwargs):
    host_grid = grid_thw.tolist()
    features, kept, merged = compress_vision(self, pixel_values, grid_thw, kind, host_grid)
    output = _pooled(merged, features, kept, grid_thw, host_grid, deepstack_levels(self))
    return output if kwargs.get("return_dict", True) else output.to_tuple()


def _visionzip_get_image_features(self, pixel_values, image_grid_thw=None, **kwargs):
    """``get_image_features`` with VisionZip: ``pooler_output`` holds one ``(n_kept, H)`` tensor per
    image; ``last_hidden_state`` the uncompressed merger outputs."""
    return _features(self, pixel_values, image_grid_thw, "image", **kwargs)


def _visionzip_get_video_features(self, pixel_values_videos, video_grid_thw=None, **kwargs):
    """``get_video_features`` with VisionZip, per temporal group of each video."""
    return _features(self, pixel_values_videos, video_grid_thw, "video", **kwargs)


def _vision_inputs(self, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw):
    """``(kinds, pixels, grid, host_grid)``: the images then the videos of a batch as one tower input.

    ``kinds`` lists ``(kind, items)`` in that order; ``host_grid`` is the forward's one host read of
    the grids.
    """
    kinds, pixels, grids = [], [], []
    for kind, values, grid in (
        ("image", pixel_values, image_grid_thw),
        ("video", pixel_values_videos, video_grid_thw),
    ):
        if values is not None:
            kinds.append((kind, grid.shape[0]))
            pixels.append(values.type(self.visual.dtype))
            grids.append(grid)
    grid = grids[0] if len(grids) == 1 else torch.cat(grids)
    pixels = pixels[0] if len(pixels) == 1 else torch.cat(pixels)
    return kinds, pixels, grid, grid.tolist()


def _compressed_vision(self, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw) -> dict:
    """``mm_encoder_outputs`` of a batch's images and videos, compressed, from one tower call."""
    kinds, pixels, grid, host_grid = _vision_inputs(
        self, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw
    )
    names = [f"{kind} {i}" for kind, count in kinds for i in range(count)]
    features, kept, merged = compress_vision(self, pixels, grid, host_grid=host_grid, names=names)
    encoded, start = {}, 0
    for kind, count in kinds:
        span = slice(start, start + count)
        own_grid = image_grid_thw if kind == "image" else video_grid_thw
        encoded[kind] = _pooled(
            merged, features[span], kept[span], own_grid, host_grid[span], deepstack_levels(self)
        )
        start += count
    return encoded


def _stock_vision(self, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw) -> dict:
    """``mm_encoder_outputs`` of a batch's images and videos, as the stock model computes them, from
    one tower call instead of one per kind."""
    kinds, pixels, grid, host_grid = _vision_inputs(
        self, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw
    )
    merged = _stacked(self.visual(pixels, grid_thw=grid))
    merge = self.visual.spatial_merge_size**2
    per_item = torch.split(merged, [t * h * w // merge for t, h, w in host_grid])
    encoded, start = {}, 0
    for kind, count in kinds:
        encoded[kind] = _encoder_output(merged, per_item[start : start + count], deepstack_levels(self))
        start += count
    return encoded


def token_types(config: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """``mm_token_type_ids`` from ``input_ids``: 1 on ``<|image_pad|>``, 2 on ``<|video_pad|>``."""
    # torch.where, not masked assignment: a boolean-mask write is a host sync on a GPU.
    video = (input_ids == config.video_token_id).to(torch.int32) * 2
    return torch.where(input_ids == config.image_token_id, 1, video).to(torch.int32)


def _visionzip_rope_index(
    self: Qwen2_5_VLModel,
    input_ids: torch.LongTensor,
    mm_token_type_ids: torch.Tensor | None = None,
    image_grid_thw: torch.LongTensor | None = None,
    video_grid_thw: torch.LongTensor | None = None,
    second_per_grid_ts: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``get_rope_index`` for compressed runs: ``(position_ids (3, B, L), rope_deltas (B, 1))``.

    Each image (video) run must hold exactly its compressed count. Its tokens take the stock 3D
    positions of the merged tokens they stand at (:data:`_KEPT`, set by the vision forward); before
    the vision forward has run (``generate`` prepares positions first) they take placeholder
    positions, which the prefill forward replaces. Text positions are the stock model's: they do
    not depend on which tokens are kept.

    The run layout is read to the host once for the whole batch (token types with padding marked);
    the grids come from the vision forward's own read. The kept tokens' positions are gathered on
    the device, so nothing here reads back per row or per image.
    """
    vz: VisionZipConfig = getattr(self, _ACTIVE)
    config = self.config
    vision = config.vision_config
    merge = vision.spatial_merge_size
    device = input_ids.device
    if mm_token_type_ids is None:
        mm_token_type_ids = token_types(config, input_ids)
    kept = self.__dict__.get(_KEPT) or {}
    grids = {
        1: kept["image"][2]
        if "image" in kept
        else ([] if image_grid_thw is None else image_grid_thw.tolist()),
        2: kept["video"][2]
        if "video" in kept
        else ([] if video_grid_thw is None else video_grid_thw.tolist()),
    }
    if getattr(self, _VIDEO_RUNS, None) == "frame_group":
        grids[2], kept = _frame_group_runs(vz, merge, grids[2], kept)
    if second_per_grid_ts is None:
        seconds = [1.0] * len(grids[2])
    else:
        seconds = (
            second_per_grid_ts.tolist()
            if isinstance(second_per_grid_ts, torch.Tensor)
            else list(second_per_grid_ts)
        )
    layout = mm_token_type_ids.to(torch.long)
    if attention_mask is not None and attention_mask.dim() == 2:
        layout = layout.masked_fill(attention_mask == 0, -1)
    rows = layout.tolist()  # the one host read of the runs
    names = {1: ("image", "<|image_pad|>"), 2: ("video", "<|video_pad|>")}
    per_second = getattr(vision, "tokens_per_second", None)  # Qwen2-VL: frame groups 1 apart
    used = {1: 0, 2: 0}
    length = input_ids.shape[1]
    host_positions = torch.zeros(3, len(rows), length, dtype=torch.long)
    # Vision runs whose kept places live on the device: their full position tables (host), where
    # their tokens go (flat row * L + column), and the kept places.
    tables, destinations, places = [], [], []
    table_size = 0
    for row, kinds in enumerate(rows):
        columns = [c for c, kind in enumerate(kinds) if kind >= 0]
        current, at = 0, 0
        for kind, group in itertools.groupby(kind for kind in kinds if kind >= 0):
            run = len(list(group))
            cols = columns[at : at + run]
            at += run
            if kind == 0:
                host_positions[:, row, cols] = torch.arange(current, current + run)
                current += run
                continue
            name, token = names[kind]
            index = used[kind]
            used[kind] += 1
            if index >= len(grids[kind]):
                raise ValueError(
                    f"visionzip: input_ids hold more {token} runs than the {len(grids[kind])} {name}(s) "
                    f"given (row {row}); every {name} needs its own placeholder run"
                )
            grid = grids[kind][index]
            expected = compressed_count(vz, grid, merge, f"{name} {index}")
            if run != expected:
                raise ValueError(
                    f"visionzip: {name} {index} has {run} {token} tokens but VisionZip keeps {expected} of "
                    f"its grid {tuple(grid)}; build the inputs with visionzip_processor(processor, model.config)"
                )
            interval = per_second * seconds[index] if kind == 2 and per_second else 1
            full = _grid_positions(grid, merge, current, interval)  # (3, t * h * w / merge**2), host
            if name in kept:
                tables.append(full)
                destinations.extend(row * length + c for c in cols)
                places.append(kept[name][0][index] + table_size)
                table_size += full.shape[1]
            else:  # before the vision forward: placeholder positions
                host_positions[:, row, cols] = full[:, :run]
            current += max(grid[1], grid[2]) // merge
    position_ids = host_positions.to(device=device, dtype=input_ids.dtype, non_blocking=True)
    if tables:
        table = torch.cat(tables, dim=1).to(device, non_blocking=True)
        where = torch.tensor(destinations, device=device)
        position_ids.view(3, -1)[:, where] = table[:, torch.cat(places).to(device)].to(position_ids.dtype)
    for kind, (name, token) in names.items():
        if used[kind] < len(grids[kind]):
            raise ValueError(
                f"visionzip: {len(grids[kind])} {name}(s) given but input_ids hold {used[kind]} {token} runs"
            )
    # rope_deltas on the device: the last position of each row, past the row's own token count.
    valid = layout >= 0
    last = position_ids.masked_fill(~valid[None], -1).amax(dim=(0, 2)) + 1
    deltas = torch.where(valid.any(dim=1), last - valid.sum(dim=1), torch.zeros_like(last))
    return position_ids, deltas.unsqueeze(1)


def _frame_group_runs(vz: VisionZipConfig, merge: int, grids: list, kept: dict) -> tuple[list, dict]:
    """Videos as one placeholder run per frame group (Qwen3-VL, Qwen3.5: timestamps separate them):
    ``(grids, kept)`` with each video's ``(t, h, w)`` split into ``t`` grids ``(1, h, w)`` and its
    kept places into each group's own (indices within the group). Sizes come from the host grids;
    the places are split on the device without reading them."""
    group_grids, group_places = [], []
    places = kept["video"][0] if "video" in kept else None
    for index, (t, h, w) in enumerate(grids):
        size = h * w // merge**2
        count = sum(vz.split_for(size, f"video {index}"))
        group_grids.extend([[1, h, w]] * t)
        if places is not None:
            group_places.extend(p - g * size for g, p in enumerate(places[index].split(count)))
    if places is not None:
        kept = {**kept, "video": (group_places, *kept["video"][1:])}
    return group_grids, kept


def _grid_positions(grid: list[int], merge: int, start: int, interval: float) -> torch.Tensor:
    """``(3, t * h * w / merge**2)`` stock (t, h, w) positions of one image or video's merged tokens,
    computed on the host from its grid (as ``get_vision_position_ids``)."""
    t, h, w = grid[0], grid[1] // merge, grid[2] // merge
    temporal = (torch.arange(t) * interval).long() + start
    rows = torch.arange(h) + start
    cols = torch.arange(w) + start
    return torch.stack(torch.meshgrid(temporal, rows, cols, indexing="ij")).reshape(3, -1)


def _timing(forward, second_per_grid_ts) -> dict:
    """``second_per_grid_ts`` for a forward that takes it (Qwen2.5-VL's; Qwen2-VL's does not)."""
    if "second_per_grid_ts" not in inspect.signature(forward).parameters:
        return {}
    return {"second_per_grid_ts": second_per_grid_ts}


def _visionzip_forward(
    self: Qwen2_5_VLModel,
    input_ids=None,
    attention_mask=None,
    position_ids=None,
    past_key_values=None,
    inputs_embeds=None,
    use_cache=None,
    pixel_values=None,
    pixel_values_videos=None,
    image_grid_thw=None,
    video_grid_thw=None,
    mm_token_type_ids=None,
    second_per_grid_ts=None,
    mm_encoder_outputs=None,
    **kwargs,
):
    """``Qwen2_5_VLModel.forward`` with VisionZip: the token embedding, then one tower call over the
    batch's images and videos (compressed), then the positions of the tokens kept (replacing any 3D
    positions passed in, e.g. the ones ``generate`` prepared before the pixels were seen), then the
    stock forward on those.

    Under ZeRO-3 every module call gathers parameters with a collective, so every rank must call
    the same modules in the same order whatever its micro-batch holds: embedding, tower, language
    model, with one tower call for images and videos together, and (when the vision path is kept
    in the graph) a blank image for a text-only batch.
    """
    stock = type(self).forward
    decoding = past_key_values is not None and past_key_values.get_seq_length() > 0
    encoded = {kind: out for kind, out in (mm_encoder_outputs or {}).items() if out is not None}

    given_embeds = inputs_embeds

    def run_stock(positions, encoder_outputs, embeds):
        return _call_stock(
            self,
            stock,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            past_key_values=past_key_values,
            inputs_embeds=embeds,
            use_cache=use_cache,
            mm_token_type_ids=mm_token_type_ids,
            mm_encoder_outputs=encoder_outputs,
            **_timing(stock, second_per_grid_ts),
            **kwargs,
        )

    if decoding:
        return run_stock(position_ids, mm_encoder_outputs, inputs_embeds)
    if inputs_embeds is None and input_ids is not None:
        inputs_embeds = self.get_input_embeddings()(input_ids)
    if pixel_values is not None or pixel_values_videos is not None:
        encoded.update(
            _compressed_vision(self, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        )
    if not encoded:
        if getattr(self, "_visionzip_graph", False) and inputs_embeds is not None:
            inputs_embeds, position_ids = _with_blank_vision(
                self, inputs_embeds, attention_mask, position_ids
            )
            return run_stock(position_ids, None, inputs_embeds)
        # Without the graph rule: the caller's inputs as given (the stock forward embeds the ids and
        # computes the text positions itself, never from a stale rope_deltas).
        return run_stock(position_ids, None, given_embeds)
    if input_ids is None:
        raise ValueError(
            "visionzip: qwen2.5-vl needs input_ids with pixel values (the placeholder runs say where the "
            "compressed tokens go)"
        )
    kept = {}
    for kind, out in encoded.items():
        if not hasattr(out, _KEPT):
            raise ValueError(
                f"visionzip: mm_encoder_outputs['{kind}'] did not come from the adapted model's "
                f"get_{kind}_features (the kept tokens' places are missing)"
            )
        kept[kind] = getattr(out, _KEPT)
        if kind == "image" and image_grid_thw is None:  # generate keeps the grids with the features
            image_grid_thw = kept[kind][1]
        if kind == "video" and video_grid_thw is None:
            video_grid_thw = kept[kind][1]
    if mm_token_type_ids is None:
        mm_token_type_ids = token_types(self.config, input_ids)
    self.__dict__[_KEPT] = kept
    try:
        vision_positions, deltas = self.get_rope_index(
            input_ids,
            mm_token_type_ids=mm_token_type_ids,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            second_per_grid_ts=second_per_grid_ts,
            attention_mask=attention_mask,
        )
    finally:
        self.__dict__.pop(_KEPT, None)
    vision_positions = vision_positions.to(input_ids.device)
    if position_ids is not None and position_ids.dim() == 3 and position_ids.shape[0] == 4:
        position_ids = torch.cat([position_ids[:1], vision_positions.to(position_ids.dtype)])
    elif position_ids is not None and position_ids.dim() == 2:  # text positions given: keep them as row 0
        position_ids = torch.cat([position_ids[None], vision_positions.to(position_ids.dtype)])
    else:
        position_ids = vision_positions
    self.rope_deltas = deltas
    return run_stock(position_ids, encoded, inputs_embeds)


def _call_stock(self, stock, input_ids=None, inputs_embeds=None, **kwargs):
    """``stock(self, ...)``; for a stock forward that takes input ids or embeddings but not both
    (Qwen3-VL's, flagged :data:`_EMBEDS_ONLY`), the embeddings computed here go in alone and the ids
    reach :func:`_placeholder_mask` on the side, so the placeholders are still found by id, without
    another embedding call (under ZeRO-3 every rank must call the same modules)."""
    if input_ids is None or inputs_embeds is None or not getattr(self, _EMBEDS_ONLY, False):
        return stock(self, input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)
    self.__dict__[_IDS] = input_ids
    try:
        return stock(self, input_ids=None, inputs_embeds=inputs_embeds, **kwargs)
    finally:
        self.__dict__.pop(_IDS, None)


def _placeholder_mask(self, input_ids, inputs_embeds, *args, **kwargs):
    """``get_placeholder_mask`` reading the ids :func:`_call_stock` set aside."""
    if input_ids is None:
        input_ids = self.__dict__.get(_IDS)
    return type(self).get_placeholder_mask(self, input_ids, inputs_embeds, *args, **kwargs)


def _blank_image(self: Qwen2_5_VLModel, device: torch.device) -> dict[str, torch.Tensor]:
    """The smallest blank image one merge unit per side allows, as tower inputs: 2x2 merged tokens."""
    vision = self.config.vision_config
    side = 2 * vision.spatial_merge_size  # patches per side
    width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    pixel_values = torch.zeros(side * side, width, dtype=self.visual.dtype, device=device)
    return {"pixel_values": pixel_values, "grid_thw": torch.tensor([[1, side, side]], device=device)}


def _with_blank_vision(self, inputs_embeds, attention_mask, position_ids):
    """A text-only batch also runs the tower and merger on one blank image, times zero (see
    :meth:`Qwen2_5VL.keep_vision_in_graph`), after the embedding as an image batch does. The stock
    uncompressed tower: the blank image may be smaller than the budget, and only the modules'
    participation matters here. Returns ``(inputs_embeds, position_ids)``."""
    blank = self._visionzip_blank_image(inputs_embeds.device)
    # Every DeepStack level too: its merger must get a (zero) gradient on a text-only rank as well.
    merged = _stacked(self.visual(blank["pixel_values"], grid_thw=blank["grid_thw"]))
    inputs_embeds = inputs_embeds + merged.sum().to(inputs_embeds.dtype) * 0.0
    if position_ids is None:  # explicit text positions: a stale rope_deltas must not shift them
        batch, length = inputs_embeds.shape[:2]
        if attention_mask is not None and attention_mask.dim() == 2:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        else:
            position_ids = torch.arange(length, device=inputs_embeds.device).expand(batch, length)
    return inputs_embeds, position_ids


# --- the processor ----------------------------------------------------------------------------------


def _replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
    grid = image_inputs["image_grid_thw"][image_idx]
    merge = self.image_processor.merge_size
    return self.image_token * compressed_count(self._visionzip, grid, merge, f"image {image_idx}")


def _replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs: Any) -> str:
    grid = video_inputs["video_grid_thw"][video_idx]
    merge = self.video_processor.merge_size
    return self.video_token * compressed_count(self._visionzip, grid, merge, f"video {video_idx}")


def _num_multimodal_tokens(self, image_sizes=None, video_sizes=None, **kwargs: Any):
    """The stock counts of merged tokens, each split as VisionZip does."""
    stock = type(self)._get_num_multimodal_tokens(self, image_sizes, video_sizes, **kwargs)
    vz: VisionZipConfig = self._visionzip
    if "num_image_tokens" in stock:
        stock["num_image_tokens"] = [sum(vz.split_for(n, "an image")) for n in stock["num_image_tokens"]]
    if "num_video_tokens" in stock:
        step = self.video_processor.temporal_patch_size
        counts = []
        for n, size in zip(stock["num_video_tokens"], video_sizes):
            groups = -(-int(size[0]) // step)
            counts.append(groups * sum(vz.split_for(n // groups, "a video frame group")))
        stock["num_video_tokens"] = counts
    return stock


# --- the family -------------------------------------------------------------------------------------


class Qwen2_5VL(ModelFamily):
    name = "qwen2.5-vl"
    model_classes = ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel")
    processor_classes = ("Qwen2_5_VLProcessor",)
    model_types = ("qwen2_5_vl",)
    #: The class ``load`` and ``random_model`` build (its ``config_class`` reads config.json).
    model_class = Qwen2_5_VLForConditionalGeneration
    #: The inner ``*Model`` classes :meth:`find_model` accepts (the adapter acts on the inner model).
    inner_classes: tuple[type, ...] = (Qwen2_5_VLModel, Qwen2VLModel)
    #: How the processor lays a video out: "video" = one placeholder run per video; "frame_group" =
    #: one run per frame group, timestamps between them (Qwen3-VL's processor).
    video_runs = "video"
    #: Whether the inner model's stock forward refuses ``input_ids`` together with ``inputs_embeds``.
    embeds_only = False
    image_token = "<|image_pad|>"
    video_token = "<|video_pad|>"
    lora_targets = LORA_TARGETS
    count_depends_on_size = True
    default_feature_layer = -1  # the merger reads the last block, whose attention the rule uses
    takes_video = True
    uses_chat_template = True
    inference_aspect_ratio = "native"
    default_budget = {"dominant_ratio": 0.45, "contextual_ratio": 0.05, "feature_layer": -1}  # authors' 50 %
    takes_ratios = True
    selected_tokens = "merged tokens"  # selection runs on the merger's outputs, one per 2 x 2 patches
    # Trained on HF messages rendered by its chat template, images where each message puts them,
    # each at its native resolution (its processor resizes keeping the aspect ratio).
    data_defaults = {"template": "chat_template", "image_placement": "keep", "image_aspect_ratio": "native"}
    templates = ("chat_template",)
    aspect_ratios = ("native", "pad")
    sample_formats = ("messages",)
    bench_sizes = QWEN_SIZES
    bench_prompt_tokens = 2  # <|vision_start|> and <|vision_end|> around the image's tokens
    tiny_budget = {"dominant_ratio": 0.5, "contextual_ratio": 0.1}
    # Benchmarks feed 448 x 448 px = 32 x 32 patches = 16 x 16 = 256 merged tokens (inside the
    # processor's default min/max pixels, so it is not resized).
    bench_image = (448, 448)
    # Its tower's rotary and window indices are computed from CPU grid sizes that meet meta tensors.
    vision_runs_on_meta = False
    simulation = {
        "size": "qwen2.5-vl-7b",
        "micro_batch": 4,
        "batch_source": "4 per GPU: configs/qwen2.5-vl-7b/lora.yaml (4 x accumulation 4 x 8 GPUs = 128, "
        "gradient checkpointing, bf16)",
        "modes": ("lora", "projector"),
        "calibrate": None,  # the real step runs the tower the meta step stands in for
    }
    # Fractions of each image's merged tokens, keyed by the percent kept, as (dominant_ratio,
    # contextual_ratio); 100 is the stock model. 70 = the authors' default (0.65 + 0.05), 50 = their
    # README's 0.45 + 0.05.
    bench_budgets = {100: None, 70: (0.65, 0.05), 50: (0.45, 0.05), 25: (0.20, 0.05)}

    # --- benchmarks ------------------------------------------------------------------------------
    def bench_config(self, size, tokenizer) -> Any:
        """A ``qwen2_5_vl`` config of ``size``'s shapes with ``tokenizer``'s special ids."""
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in self._BENCH_TOKENS}
        text = {
            **size.text,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        }
        data = {
            "model_type": self.model_types[0],
            "text_config": text,
            "vision_config": size.vision,
            "image_token_id": ids["<|image_pad|>"],
            "video_token_id": ids["<|video_pad|>"],
            "vision_start_token_id": ids["<|vision_start|>"],
            "vision_end_token_id": ids["<|vision_end|>"],
            "vision_token_id": ids["<|vision_pad|>"],
            "tie_word_embeddings": False,
        }
        return self.config_from_dict(data)

    _BENCH_TOKENS = (
        "<|endoftext|>",
        "<|im_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|vision_pad|>",
    )

    def bench_processor(self, model: nn.Module, size, tokenizer):
        """The family's processor class read from a folder as from a download: ``tokenizer`` and its
        chat template, Qwen2.5-VL-7B-Instruct's image settings (min_pixels 56 x 56, max_pixels
        28 x 28 x 16384, so a 448 px benchmark image keeps its size)."""
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder)
            tokenizer.model_max_length = 32768
            tokenizer.save_pretrained(out)
            (out / "chat_template.jinja").unlink(missing_ok=True)
            (out / "chat_template.json").write_text(json.dumps({"chat_template": tokenizer.chat_template}))
            preprocessor = qwen_preprocessor_config(
                56 * 56, 28 * 28 * 16384
            )  # Qwen2.5-VL-7B-Instruct's bounds
            (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
            return self.load_processor(str(out))

    def bench_messages(self, question: str) -> list[dict]:
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]

    def bench_batch(self, size, config: Any, plan: Any, device="cpu", seed: int = 0):
        return qwen_synthetic_batch(size, config, plan.llm, device, seed=seed)

    def step_flops(self, size, config: Any, parts, plan, split, *, samples, seq_len, logits_positions=None):
        return qwen_step_flops(
            config,
            parts,
            num_images=samples,
            image_hw=size.image,
            seq_len=seq_len,
            image_tokens=plan.llm,
            split=split,
            logits_positions=logits_positions,
        )

    def simulation_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss from the frozen tower's output on (:meth:`stand_in_vision`): the tower's
        working set (``vision_working_set`` bytes) is allocated and freed first, as its forward would,
        then the merger (trainable), the gather of the kept tokens, the scatter into the text
        embeddings and the language model with its LM head and loss."""
        inner = self.find_model(model)
        input_ids = batch["input_ids"]
        embeds = inner.get_input_embeddings()(input_ids)
        working = torch.empty(batch["vision_working_set"], dtype=torch.uint8, device=embeds.device)
        del working
        features = inner.visual.merger(batch["vision_output"])
        features = features.index_select(0, batch["kept_index"]).to(embeds.dtype)
        image_positions = (input_ids == inner.config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(image_positions, features)
        return model(
            inputs_embeds=embeds,
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            labels=batch["labels"],
        ).loss

    def stand_in_vision(
        self, config: Any, batch: dict[str, torch.Tensor], plan: Any
    ) -> dict[str, torch.Tensor]:
        """Its tower's rotary and window indices come from CPU grid sizes, so the meta step starts
        after the tower:

        - ``vision_output``: ``(patches, vision_hidden)``, the frozen tower's output before the
          merger (no gradient: the tower is frozen and pixels need none);
        - ``kept_index``: ``(images * plan.llm,)`` rows of the merger's output the LLM receives
          (compression gathers them; stock keeps every row);
        - ``position_ids``: ``(3, B, S)`` M-RoPE positions (a plain count on each axis: the same
          bytes as the image-aware ones, which need the grids on the CPU).
        """
        images, seq_len = batch["input_ids"].shape
        merged = plan.projected  # merged tokens per image, all through the merger
        per_image = torch.arange(plan.llm) * merged // plan.llm  # spread over the image, as selection is
        kept = (torch.arange(images)[:, None] * merged + per_image[None]).reshape(-1)
        pixels = batch["pixel_values"]
        return {
            "vision_output": torch.zeros(
                pixels.shape[0], config.vision_config.hidden_size, dtype=pixels.dtype
            ),
            "kept_index": kept,
            "position_ids": torch.arange(seq_len).view(1, 1, -1).expand(3, images, -1).contiguous(),
        }

    def vision_probe(self, config: Any, dtype: torch.dtype, attn_implementation: str) -> tuple:
        """Its tower of these widths with two blocks (one windowed, one with full attention, the
        two kinds it has), frozen, on one window of patches (a 112 px image). Blocks run one after
        another without a graph, so two stand for all of them; the peak per patch is the same for
        1, 4 or 16 windows (checked when this was written: 44,178 bytes per patch for the 7B's
        widths in bf16 at 112, 224 and 448 px)."""
        data = json.loads(config.vision_config.to_json_string())
        data.update(depth=2, fullatt_block_indexes=[1])
        vision = AutoConfig.for_model(**data)  # the vision config's own model_type
        vision._attn_implementation = attn_implementation
        tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(vision, dtype=dtype)
        tower.requires_grad_(False)
        side = vision.window_size // vision.patch_size
        width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        pixels = torch.zeros(side * side, width, dtype=dtype)
        return tower, pixels, {"grid_thw": torch.tensor([[1, side, side]])}, side * side

    def prompt(
        self, processor, question: str, images: int, videos: int = 0, system: str | None = None
    ) -> str:
        """The first user turn rendered by the processor's chat template (images, then videos, then
        the question), with the generation prompt; ``system`` None keeps the template's own."""
        content = [{"type": "image"}] * images + [{"type": "video"}] * videos
        messages = [] if not system else [{"role": "system", "content": system}]
        messages.append({"role": "user", "content": [*content, {"type": "text", "text": question}]})
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def counted_image_sizes(self, config: Any, inputs: Any, images: list) -> list[tuple[int, int]]:
        """The sizes the processor resized the images to (``image_grid_thw`` x patch size)."""
        patch = config.vision_config.patch_size
        return [(int(h) * patch, int(w) * patch) for _, h, w in inputs["image_grid_thw"].tolist()]

    # --- loading ---------------------------------------------------------------------------------
    def load(self, path: str, check_files: bool = True, **from_pretrained_kwargs: Any) -> nn.Module:
        return load_checked(self.model_class, path, check_files, **from_pretrained_kwargs)

    def image_layout(self, image_processor, video_processor=None):
        """Native resolution: each image (and video frame) keeps its aspect ratio, resized by the
        processor to multiples of ``patch_size * merge_size`` (:class:`~.qwen_processing.NativeResize`)."""
        video = None if video_processor is None else NativeResize.of(video_processor)
        return ImageLayout(native=NativeResize.of(image_processor), video=video)

    def packing_refusal(self, config: Any) -> str | None:
        """3-D M-RoPE positions are computed from a whole row, not per packed sample."""
        return "M-RoPE positions per sample"

    def load_processor(self, path: str, trust_remote_code: bool = False, config: Any = None, **kwargs: Any):
        # Built from PIL/numpy parts: AutoProcessor would import torchvision for the video processor.
        # No remote code is involved; the folder's config is not needed.
        return load_qwen_processor(path, **kwargs)

    def config_from_dict(self, data: dict) -> Any:
        return self.model_class.config_class.from_dict(data)

    def random_model(self, config: Any, dtype: torch.dtype | None = None) -> nn.Module:
        if dtype is None:
            return self.model_class(config)
        return self.model_class._from_config(config, dtype=dtype)

    def token_plan(
        self, config: Any, vz: VisionZipConfig | None, image_size: tuple[int, int] | None = None
    ) -> tuple[int, int, int]:
        # Compression runs after the merger: the merger sees every token.
        stock = self.stock_tokens_per_image(config, image_size)
        if vz is None:
            return 1, stock, stock
        return 1, stock, self.compressed_tokens_per_image(config, vz, image_size)

    # A tiny folder speaks a Qwen2-style tokenizer and is written in the 4.x download layout.
    tiny_tokenizer = "qwen2-bpe"

    def write_tiny(self, tokenizer: Any, out_dir, seed: int = 0, vision_depth: int = 4) -> Path:
        """:func:`~visionzip_core.families.qwen_downloads.write_tiny_folder` (``vision_depth`` blocks)."""
        return write_tiny_folder(self, tokenizer, out_dir, seed, vision_depth)

    # --- visual tokens ---------------------------------------------------------------------------
    def tower_tokens(self, config: Any) -> int:
        """No fixed count: every image has its own, checked against the split when it is cut
        (:meth:`VisionZipConfig.split_for` names the image that is too small)."""
        return 2**31 - 1

    def stock_tokens_per_image(self, config: Any, image_size: tuple[int, int] | None = None) -> int:
        rows, cols = merged_grid(config.vision_config, image_size)
        return rows * cols

    def compressed_tokens_per_image(
        self, config: Any, vz: VisionZipConfig, image_size: tuple[int, int] | None = None
    ) -> int:
        rows, cols = merged_grid(config.vision_config, image_size)
        return sum(
            vz.split_for(rows * cols, f"an image of {image_size[0]}x{image_size[1]} px (height x width)")
        )

    def stock_tokens_per_video(self, config: Any, video_size: tuple[int, int, int]) -> int:
        """Tokens of a video of ``video_size`` (frames, H, W) as resized by the processor."""
        rows, cols = merged_grid(config.vision_config, video_size[1:])
        return temporal_groups(config.vision_config, video_size[0]) * rows * cols

    def compressed_tokens_per_video(
        self, config: Any, vz: VisionZipConfig, video_size: tuple[int, int, int]
    ) -> int:
        rows, cols = merged_grid(config.vision_config, video_size[1:])
        split = sum(
            vz.split_for(rows * cols, f"a video of {video_size[1]}x{video_size[2]} px (height x width)")
        )
        return temporal_groups(config.vision_config, video_size[0]) * split

    def feature_layer(self, config: Any) -> int:
        return -1

    def vision_layers(self, config: Any) -> int:
        return getattr(config, "vision_config", config).depth

    # --- instance adaptation ---------------------------------------------------------------------
    def find_model(self, model: nn.Module) -> nn.Module:
        """The inner model the adapter acts on (see :func:`find_qwen_model`)."""
        return find_qwen_model(model, self.inner_classes)

    def _adapt_stock_call(self, inner: nn.Module) -> None:
        if self.embeds_only:
            setattr(inner, _EMBEDS_ONLY, True)
            inner.get_placeholder_mask = types.MethodType(_placeholder_mask, inner)

    def check_supported(self, model: nn.Module) -> None:
        self.find_model(model)

    def check_settings(self, config: Any, vz: VisionZipConfig) -> None:
        depth = self.vision_layers(config)
        if resolve_feature_layer(vz.feature_layer, depth) != depth:  # hidden_states index of the last block
            raise ValueError(
                f"visionzip.feature_layer={vz.feature_layer}: qwen2.5-vl's merger reads the last vision block, "
                f"whose attention VisionZip uses; use -1 (block {depth - 1})"
            )

    def apply(self, model: nn.Module, vz: VisionZipConfig) -> None:
        inner = self.find_model(model)
        self.check_settings(inner.config, vz)
        setattr(inner, _ACTIVE, vz)
        setattr(inner, _VIDEO_RUNS, self.video_runs)
        self._adapt_stock_call(inner)
        inner.get_image_features = types.MethodType(_visionzip_get_image_features, inner)
        inner.get_video_features = types.MethodType(_visionzip_get_video_features, inner)
        inner.get_rope_index = types.MethodType(_visionzip_rope_index, inner)
        inner.forward = types.MethodType(_visionzip_forward, inner)
        inner._visionzip_blank_image = types.MethodType(_blank_image, inner)

    def select_image_tokens(
        self, model: nn.Module, pixel_values: torch.Tensor, image_sizes: Any = None
    ) -> list[ImageTokenSelection]:
        """Per image, its merged tokens (``rows x cols`` merge units of the resized picture, no CLS)
        as the adapted forward selects them; ``image_sizes`` the resized ``(H, W)`` of each image."""
        inner = self.find_model(model)
        if getattr(inner, _ACTIVE, None) is None:
            raise ValueError(f"{self.name}: select_image_tokens needs a VisionZip-adapted model")
        if image_sizes is None:
            raise ValueError(f"{self.name}: select_image_tokens needs each image's resized size")
        patch = inner.config.vision_config.patch_size
        sizes = torch.as_tensor(image_sizes).long()
        grid = torch.cat([torch.ones_like(sizes[:, :1]), sizes // patch], dim=1)
        return [groups[0] for groups in select_tokens(inner, pixel_values, grid.to(pixel_values.device))]

    def select_video_tokens(
        self, model: nn.Module, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor, **_: Any
    ) -> list[list[ImageTokenSelection]]:
        """Per video, per temporal group (frame group), what the adapted forward keeps of it; each
        group's picture is its first frame (the rest of the data pipeline's video inputs unused)."""
        inner = self.find_model(model)
        if getattr(inner, _ACTIVE, None) is None:
            raise ValueError(f"{self.name}: select_video_tokens needs a VisionZip-adapted model")
        return select_tokens(inner, pixel_values_videos, video_grid_thw, "video")

    def remove(self, model: nn.Module) -> None:
        inner = self.find_model(model)
        adapted = ("get_image_features", "get_video_features", "get_rope_index", "forward")
        for name in (*adapted, "get_placeholder_mask", _ACTIVE, _VIDEO_RUNS, _EMBEDS_ONLY):
            inner.__dict__.pop(name, None)
        inner.__dict__.pop("_visionzip_graph", None)

    def configs(self, model: nn.Module) -> list[Any]:
        inner = self.find_model(model)
        return list({id(c): c for c in (inner.config, getattr(model, "config", inner.config))}.values())

    def adapt_processor(self, processor, vz: VisionZipConfig | None, config: Any = None):
        """``<|image_pad|>`` and ``<|video_pad|>`` runs get VisionZip's count for each image's grid
        (each video's temporal groups); ``vz=None`` restores the stock counts."""
        if type(processor).__name__ not in self.processor_classes:
            raise ValueError(
                f"visionzip_processor: the qwen2.5-vl family takes Qwen2_5_VLProcessor; got {type(processor).__name__}"
            )
        if vz is None:
            for name in (
                "replace_image_token",
                "replace_video_token",
                "_get_num_multimodal_tokens",
                "_visionzip",
            ):
                processor.__dict__.pop(name, None)
            return processor
        processor._visionzip = vz
        processor.replace_image_token = types.MethodType(_replace_image_token, processor)
        processor.replace_video_token = types.MethodType(_replace_video_token, processor)
        processor._get_num_multimodal_tokens = types.MethodType(_num_multimodal_tokens, processor)
        return processor

    def keep_vision_in_graph(self, model: nn.Module) -> None:
        """As LLaVA's (see :meth:`Llava15.keep_vision_in_graph`): a text-only batch runs the tower and
        merger on one blank 56x56 image and adds its features times zero, so every rank calls the
        same modules in the same order and the merger always has a gradient."""
        inner = self.find_model(model)
        if getattr(inner, _ACTIVE, None) is None:  # the stock model: adapt only the forward
            inner._visionzip_blank_image = types.MethodType(_blank_image, inner)
            inner.forward = types.MethodType(_stock_forward_keeping_graph, inner)
            self._adapt_stock_call(inner)
        inner._visionzip_graph = True

    # --- training --------------------------------------------------------------------------------
    def module_group(self, param_name: str) -> str:
        if any(f"visual.{name}" in param_name for name in self.projector_modules()):
            return "projector"
        if "visual." in param_name:
            return "vision"
        return "llm"

    def lora_target_regex(self, targets: tuple[str, ...]) -> str:
        # The ViT's MLP has gate_proj/up_proj/down_proj too: only the language model's layers match.
        names = "|".join(re.escape(t) for t in targets)
        return rf".*language_model.*\.({names})"

    def projector_modules(self) -> list[str]:
        return [PROJECTOR]


def _stock_forward_keeping_graph(
    self,
    input_ids=None,
    attention_mask=None,
    position_ids=None,
    past_key_values=None,
    inputs_embeds=None,
    pixel_values=None,
    pixel_values_videos=None,
    image_grid_thw=None,
    video_grid_thw=None,
    mm_encoder_outputs=None,
    **kwargs,
):
    """The stock forward (VisionZip off) in the module order every batch kind shares (see
    :func:`_visionzip_forward`): embedding, one tower call over images and videos together (a blank
    image for a text-only batch), language model."""
    decoding = past_key_values is not None and past_key_values.get_seq_length() > 0
    if not decoding and mm_encoder_outputs is None:
        if inputs_embeds is None and input_ids is not None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is not None or pixel_values_videos is not None:
            mm_encoder_outputs = _stock_vision(
                self, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw
            )
            pixel_values = pixel_values_videos = None
        elif inputs_embeds is not None:
            inputs_embeds, position_ids = _with_blank_vision(
                self, inputs_embeds, attention_mask, position_ids
            )
    if mm_encoder_outputs is not None and position_ids is None and getattr(self, _EMBEDS_ONLY, False):
        # The stock forward will see embeddings only: it cannot compute the 3-D positions itself.
        types_ = kwargs.get("mm_token_type_ids")
        position_ids = self.compute_3d_position_ids(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            mm_token_type_ids=token_types(self.config, input_ids) if types_ is None else types_,
        )
    return _call_stock(
        self,
        type(self).forward,
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        inputs_embeds=inputs_embeds,
        pixel_values=pixel_values,
        pixel_values_videos=pixel_values_videos,
        image_grid_thw=image_grid_thw,
        video_grid_thw=video_grid_thw,
        mm_encoder_outputs=mm_encoder_outputs,
        **kwargs,
    )


class Qwen2VL(Qwen2_5VL):
    """Qwen2-VL (``Qwen2VLForConditionalGeneration``). The authors released no Qwen2-VL code (their
    README points to a community port that selects before the merger with token 0 as a stand-in
    CLS); the Qwen2.5-VL rule above applies unchanged. Qwen2-VL's blocks all attend in full, so
    there is no window order to undo, and its video positions step 1 per temporal group."""

    name = "qwen2-vl"
    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2VLModel")
    processor_classes = ("Qwen2VLProcessor",)
    model_types = ("qwen2_vl",)
    model_class = Qwen2VLForConditionalGeneration
    bench_sizes = None  # the benchmarks' Qwen sizes are Qwen2.5-VL's
    simulation = None
