"""LLaVA-OneVision (llava-hf ``LlavaOnevisionForConditionalGeneration``): a SigLIP tower without CLS,
``anyres_max_9`` tiling, a Qwen2 LLM, and videos pooled 2x2 per frame.

**Score (no CLS).** SigLIP has no CLS token, so there is no CLS row to rank patches by. The authors'
only CLS-free release, their Qwen2.5-VL code (VisionZip commit 68993a3,
``Qwen2_5_VL/qwen2_5vl_visionzip.py`` L604-615), ranks by the attention each token *receives*:
``softmax(q k^T / sqrt(d))`` of one full-attention block, averaged over heads, summed over queries.
Their LLaVA rule (``visionzip/clip_encoder.py`` L43-53 at commit 3151f6d) reads the attention of the
*feature layer* (the layer whose hidden states the projector takes, ``hidden_states[-2]`` with
``attentions[-2]``) and takes keys averaged over heads (``visionzip/utils.py`` L23-24, L89). Here the
two are combined: per crop, the attention each patch receives in the feature layer (the last of the
tower's 26 layers, ``vision_feature_layer=-1``, ``full`` strategy: every one of the 729 tokens is a
patch), from that layer's own ``q_proj``/``k_proj`` outputs (SigLIP has no rotary), averaged over
heads and summed over queries, chunked over queries so no ``N x N`` map per head is held. The
dominant tokens are the top ``dominant`` patches; the rest merge into ``contextual`` tokens by the
head-averaged keys (uniform-stride targets, target + mean of members), as for LLaVA-1.5. Selection
runs on the feature-layer hidden states before the projector, as for LLaVA-1.5 and NeXT.

**Tiled images (one image in the sample).** Every crop (the base image and each tile) keeps
``dominant + contextual`` tokens; the image is laid out as LLaVA-NeXT's
(:func:`~visionzip_core.families.llava_next.layout_image` without CLS): base crop (dominant in
raster order, then contextual), the tiles' dominant patches in raster order over the whole tile grid,
the tiles' contextual tokens tile by tile. **No unpadding, no** ``image_newline`` **and no
``anyres_max`` downsampling** for them. Reasons:

1. it is the authors' LLaVA-NeXT behaviour: ``restore_image_features_sorted``
   (``visionzip/llava_arch.py`` L42-81 at 3151f6d) puts kept tokens back in raster order and builds a
   newline-expanded grid it never uses (L66-67), and the ``unpad`` branch (L115-116) never calls
   ``unpad_image``; this project's LLaVA-NeXT family does the same, and OneVision is its successor;
2. newlines end rows and bilinear downsampling resamples a dense grid: a sparse kept set has
   neither, and interpolating between kept tokens would mix in dropped ones;
3. the count, ``crops * (dominant + contextual)``, follows from the image size alone, before any
   pixel is seen, and does not depend on the letterbox padding;
4. ``anyres_max_9`` caps an image near 9 crops' worth of tokens; per-crop VisionZip caps it harder
   (a 6 x 6-tile image: about 7.4k stock tokens, 37 * 64 = 2368 at 54 + 10).

The cost, known: letterbox padding inside the tiles is not removed, so padded patches compete for
dominant slots (their received attention is usually low) and can be merged into contextual tokens.

**One-crop images (samples with several images).** The stock model does not tile them
(``batch_num_images > 1``): one padded-to-square crop, then one ``image_newline`` that separates it
from what follows. They keep ``dominant + contextual`` tokens plus that newline, as the stock model
and processor do and as the authors keep their one-crop branch (``llava_arch.py`` L124-128).

**Videos.** The stock model projects each frame's 729 tokens and pools them bilinearly to 14 x 14
(``apply_pooling``), then ends the video with one newline. Here each frame is pooled as stock (the LLM
was trained on pooled frames), its received-attention map and keys are pooled by the same bilinear
call, and ``dominant + contextual`` of the 196 pooled tokens are kept per frame: a video becomes
``frames * (dominant + contextual) + 1`` tokens, and the budget must fit 196. Frames are taken as
given (the stock video processor samples none either): a video of ``T`` frame files is ``T`` frames.

``vz.keep_cls`` means nothing here (there is no CLS) and is ignored. The budget is counts per crop
(``takes_ratios`` is False): a crop always has 729 tokens.

**Training and the commands.** The trainer lays images out as the processor does: tiled when alone
in their sample, one crop and the newline each in a sample with several (the data pipeline passes
``batch_num_images``), as the authors' training data loader does (LLaVA-NeXT ``llava/train/train.py``,
``LazySupervisedDataset.__getitem__``: several images of a sample are processed with ``pad``, one
crop each); it takes videos as ``messages``
samples with a ``{"type": "video", "video": [frame files]}`` part, each ``<video>`` expanded to the
count above (the stock processor's count with VisionZip off). Its forward calls the tower and the
projector once per batch, images and frames together (:func:`_forward_in_graph`), so that ranks
drawing different kinds stay in step under ZeRO-3. The commands (``generate``, ``evaluate``) take
videos through the processor, as the library does.
"""

from __future__ import annotations

import json
import math
import re
import types
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
from transformers.processing_utils import MultiModalData

from visionzip_core.algorithm import TokenSelection, compress_selected, select_by_scores
from visionzip_core.capture import resolve_feature_layer
from visionzip_core.config import VisionZipConfig
from visionzip_core.data.images import ImageLayout
from visionzip_core.families.base import ImageTokenSelection
from visionzip_core.families.llava import active_settings
from visionzip_core.families.llava_next import (
    LlavaNext,
    _blank_image,
    crops_per_image,
    layout_image,
    tile_grid,
)
from visionzip_core.families.onevision_bench import (
    ONEVISION_SIZES,
    onevision_pinpoints,
    onevision_step_flops,
    onevision_synthetic_batch,
)
from visionzip_core.families.onevision_processing import (
    FrameSize,
    LlavaOnevisionProcessor,
    OnevisionVideoProcessor,
    load_onevision_processor,
)
from visionzip_core.families.qwen2_5_vl import Qwen2_5VL
from visionzip_core.weight_checks import load_checked

_ACTIVE = "_visionzip_active"
# Query rows per chunk of the score computation: batch x heads x chunk x N floats at a time.
_SCORE_CHUNK_ELEMENTS = 1 << 26


def find_onevision_model(model: nn.Module) -> LlavaOnevisionModel:
    """The ``LlavaOnevisionModel`` inside ``model`` (itself, the ForConditionalGeneration, or a PEFT wrapper)."""
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    if isinstance(inner, LlavaOnevisionForConditionalGeneration):
        return inner.model
    if isinstance(inner, LlavaOnevisionModel):
        return inner
    raise ValueError(
        "visionzip: the llava-onevision family takes LlavaOnevisionForConditionalGeneration or "
        f"LlavaOnevisionModel (optionally wrapped by peft); got {type(model).__name__}"
    )


def patch_side(config: Any) -> int:
    """Patches per crop side (27 for SigLIP-so400m at 384 px / 14 px)."""
    return config.vision_config.image_size // config.vision_config.patch_size


def pooled_side(config: Any) -> int:
    """Tokens per side of a video frame after the stock 2x2 bilinear pooling: ``ceil(side / 2)``."""
    return math.ceil(patch_side(config) / 2)


# --- capture: the feature layer's hidden states, received-attention scores and keys -----------------


def capture_received_attention(
    tower: nn.Module, pixel_values: torch.Tensor, feature_layer: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run a SigLIP tower through the feature layer only; capture what VisionZip needs there.

    Args:
        tower: transformers' ``SiglipVisionModel`` (``embeddings``, ``encoder.layers``).
        pixel_values: ``(B, 3, H, W)``, crops or frames.
        feature_layer: HF ``hidden_states`` index (-1: the last layer).

    Returns:
        ``(hidden (B, N, C), scores (B, N), keys (B, N, d))``: the feature layer's output (==
        ``hidden_states[feature_layer]``, before ``post_layernorm``); the attention each token
        receives there, averaged over heads and summed over queries (float32, detached); its keys
        averaged over heads (float32, detached).
    """
    layers = tower.encoder.layers
    index = resolve_feature_layer(feature_layer, len(layers))
    hidden = tower.embeddings(pixel_values)
    # Positional arguments: gradient checkpointing with use_reentrant=True tracks those only.
    for layer in layers[: index - 1]:
        hidden = layer(hidden, None)
    attn = layers[index - 1].self_attn
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(_module, _inputs, output):
            seen.setdefault(name, output)

        return hook

    handles = [attn.q_proj.register_forward_hook(keep("q")), attn.k_proj.register_forward_hook(keep("k"))]
    try:
        hidden = layers[index - 1](hidden, None)
    finally:
        for handle in handles:
            handle.remove()
    if "q" not in seen or "k" not in seen:
        raise RuntimeError(
            "visionzip: the feature layer did not call self_attn.q_proj/k_proj; unsupported tower"
        )
    batch, tokens, _ = hidden.shape
    heads, dim = attn.num_heads, attn.head_dim
    with torch.no_grad():
        q = seen["q"].detach().float().view(batch, tokens, heads, dim).transpose(1, 2)  # (B, h, N, d)
        k = seen["k"].detach().float().view(batch, tokens, heads, dim).transpose(1, 2)
        scores = torch.zeros(batch, tokens, dtype=torch.float32, device=q.device)
        chunk = max(1, _SCORE_CHUNK_ELEMENTS // max(1, batch * heads * tokens))
        for start in range(0, tokens, chunk):
            logits = q[:, :, start : start + chunk] @ k.transpose(2, 3) * attn.scale
            scores += logits.softmax(dim=-1).mean(dim=1).sum(dim=1)
        keys = k.mean(dim=1)
    return hidden, scores, keys


def select_crops(tower: nn.Module, pixel_values: torch.Tensor, vz: VisionZipConfig):
    """``(hidden, selection)`` of a batch of crops: the one path the adapted forward and
    :meth:`LlavaOnevision.select_image_tokens` both take."""
    hidden, scores, keys = capture_received_attention(tower, pixel_values, vz.feature_layer)
    return hidden, select_by_scores(scores, keys, vz.dominant, vz.contextual)


def _check_layer_argument(self: LlavaOnevisionModel, vision_feature_layer: Any, vz: VisionZipConfig) -> None:
    num_layers = len(self.vision_tower.encoder.layers)
    if vision_feature_layer is not None and (
        not isinstance(vision_feature_layer, int)
        or resolve_feature_layer(vision_feature_layer, num_layers)
        != resolve_feature_layer(vz.feature_layer, num_layers)
    ):
        raise ValueError(
            f"vision_feature_layer={vision_feature_layer!r} conflicts with visionzip.feature_layer={vz.feature_layer}"
        )


def image_crops(config: Any, image_sizes: Any, batch_num_images: Any = None) -> tuple[list, list[int]]:
    """``(sizes, crops)``: each image's ``(H, W)`` and how many crops the processor cut it into: the
    anyres tiling for an image alone in its sample (``batch_num_images`` None: every image), one
    padded-to-square crop for an image of a sample with several (the stock rule)."""
    sizes = [
        tuple(int(v) for v in s)
        for s in (image_sizes.tolist() if torch.is_tensor(image_sizes) else image_sizes)
    ]
    if batch_num_images is None:
        tiled = [True] * len(sizes)
    else:
        counts = batch_num_images.tolist() if torch.is_tensor(batch_num_images) else list(batch_num_images)
        tiled = [int(n) == 1 for n in counts for _ in range(int(n))]
    if len(tiled) != len(sizes):
        raise ValueError(
            f"visionzip: batch_num_images counts {len(tiled)} images but image_sizes has {len(sizes)}"
        )
    return sizes, [crops_per_image(config, s) if t else 1 for s, t in zip(sizes, tiled)]


def _visionzip_get_image_features(
    self: LlavaOnevisionModel,
    pixel_values: torch.Tensor,
    image_sizes: torch.Tensor,
    vision_feature_layer: int | list[int] | None = None,
    vision_feature_select_strategy: str | None = None,
    vision_aspect_ratio: str | None = None,
    batch_num_images: torch.Tensor | None = None,
    **kwargs: Any,
) -> BaseModelOutputWithPooling | tuple:
    """``LlavaOnevisionModel.get_image_features`` with VisionZip. Same signature and return type;
    ``pooler_output`` holds one tensor per image: ``crops * (D + K)`` tokens for a tiled image
    (:func:`layout_image`), ``D + K + 1`` (the newline last) for a one-crop image."""
    vz: VisionZipConfig = getattr(self, _ACTIVE)
    _check_layer_argument(self, vision_feature_layer, vz)
    return_dict = kwargs.pop("return_dict", True)
    sizes, crops = image_crops(self.config, image_sizes, batch_num_images)
    if pixel_values.dim() == 5:  # (images, max crops, C, H, W), padded to the batch's largest
        pixel_values = torch.cat([pv[:n] for pv, n in zip(pixel_values, crops)], dim=0)
    hidden, selection = select_crops(self.vision_tower, pixel_values, vz)
    compressed = self.multi_modal_projector(compress_selected(hidden, selection, vz.merge))
    features = _lay_out_images(self, compressed, selection, sizes, crops, vz)
    output = BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=features)
    return output if return_dict else output.to_tuple()


def _lay_out_images(
    self: LlavaOnevisionModel,
    compressed: torch.Tensor,
    selection: TokenSelection,
    sizes: list,
    crops: list[int],
    vz: VisionZipConfig,
) -> list[torch.Tensor]:
    """Each image's features from its crops' projected kept tokens ``compressed`` ``(crops, D + K, H)``:
    a tiled image laid out by :func:`layout_image`, a one-crop image followed by the newline."""
    side = patch_side(self.config)
    features, start = [], 0
    for size, n in zip(sizes, crops):
        if n == 1:
            newline = self.image_newline[None].to(compressed.dtype)
            features.append(torch.cat([compressed[start], newline]))
        else:
            grid = tile_grid(self.config, size)
            part = slice(start, start + n)
            features.append(
                layout_image(compressed[part], selection.dominant[part], grid, side, vz, cls=False)
            )
        start += n
    return features


def _video_selection(self: LlavaOnevisionModel, frames: torch.Tensor, vz: VisionZipConfig):
    """``(pooled features (F, P, H), selection)`` of a batch of frames: the tower to the feature
    layer, the projector, the stock pooling; scores and keys pooled by the same call."""
    hidden, scores, keys = capture_received_attention(self.vision_tower, frames, vz.feature_layer)
    return _select_pooled(self, self.multi_modal_projector(hidden), scores, keys, vz)


def _select_pooled(
    self: LlavaOnevisionModel,
    projected: torch.Tensor,
    scores: torch.Tensor,
    keys: torch.Tensor,
    vz: VisionZipConfig,
):
    """``(pooled (F, P, H), selection)``: frames' projected features ``(F, N, H)`` pooled as stock, and
    VisionZip's choice among the pooled tokens, by scores ``(F, N)`` and keys ``(F, N, d)`` pooled by
    the same bilinear call."""
    pooled = self.apply_pooling(projected)
    pooled_scores = self.apply_pooling(scores[..., None])[..., 0]
    pooled_keys = self.apply_pooling(keys)
    count = pooled.shape[1]
    dominant, contextual = vz.split_for(count, f"a video frame ({count} tokens after the 2x2 pooling)")
    return pooled, select_by_scores(pooled_scores, pooled_keys, dominant, contextual)


def _visionzip_get_video_features(
    self: LlavaOnevisionModel,
    pixel_values_videos: torch.Tensor,
    vision_feature_layer: int | list[int] | None = None,
    vision_feature_select_strategy: str | None = None,
    **kwargs: Any,
) -> BaseModelOutputWithPooling | tuple:
    """``get_video_features`` with VisionZip: ``(videos, frames * (D + K) + 1, H)``, each frame's
    kept tokens (dominant in raster order, then contextual), one newline after the video."""
    vz: VisionZipConfig = getattr(self, _ACTIVE)
    _check_layer_argument(self, vision_feature_layer, vz)
    return_dict = kwargs.pop("return_dict", True)
    videos, frames = pixel_values_videos.shape[:2]
    pooled, selection = _video_selection(self, pixel_values_videos.flatten(0, 1), vz)
    tokens = compress_selected(pooled, selection, vz.merge).reshape(videos, -1, pooled.shape[-1])
    newline = self.image_newline[None, None].expand(videos, 1, -1).to(tokens.dtype)
    output = BaseModelOutputWithPooling(
        last_hidden_state=pooled, pooler_output=torch.cat([tokens, newline], dim=1)
    )
    return output if return_dict else output.to_tuple()


# --- training: one tower call per batch --------------------------------------------------------------


def _forward_in_graph(
    self: LlavaOnevisionModel,
    input_ids: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    image_sizes: torch.Tensor | None = None,
    pixel_values_videos: torch.Tensor | None = None,
    video_frames: torch.Tensor | None = None,
    batch_num_images: torch.Tensor | None = None,
    **kwargs: Any,
):
    """``LlavaOnevisionModel.forward`` as the trainer runs it (:meth:`LlavaOnevision.keep_vision_in_graph`).

    Every batch calls the tower once and the projector once, whatever it holds: the images' crops and
    the videos' frames go through together, and a batch with neither runs one blank image and adds its
    features times zero. The stock forward calls the tower once per kind and not at all for text, and
    ZeRO-3 gathers parameters per module call: ranks holding different kinds would issue mismatched
    collectives. With VisionZip on, images keep ``D + K`` per crop (selected before the projector, as
    :func:`_visionzip_get_image_features`), frames ``D + K`` of their pooled tokens (after it, as
    :func:`_visionzip_get_video_features`); off, the stock features.

    ``pixel_values_videos``: ``(videos, frames, C, H, W)`` as the processor gives it, or the frames of
    every video back to back ``(sum of frames, C, H, W)`` with ``video_frames`` ``(videos,)`` their
    counts, as the data pipeline gives it (videos of different lengths in one batch).
    Embeddings given, or precomputed ``mm_encoder_outputs``: the stock forward, unchanged.
    """
    vz: VisionZipConfig | None = getattr(self, _ACTIVE, None)
    if vz is not None:
        _check_layer_argument(self, kwargs.get("vision_feature_layer"), vz)
    for name in (
        "vision_feature_layer",
        "vision_feature_select_strategy",
        "vision_aspect_ratio",
        "image_sizes_videos",
    ):
        kwargs.pop(name, None)  # the config's are used, as the trainer and generate leave them unset
    if (
        input_ids is None
        or kwargs.get("inputs_embeds") is not None
        or kwargs.get("mm_encoder_outputs") is not None
    ):
        return type(self).forward(
            self,
            input_ids,
            pixel_values,
            image_sizes,
            pixel_values_videos,
            batch_num_images=batch_num_images,
            **kwargs,
        )
    kwargs.pop("inputs_embeds", None)
    kwargs.pop("mm_encoder_outputs", None)
    embeds = self.get_input_embeddings()(input_ids)
    parts, sizes, crops = [], [], []
    if pixel_values is not None:
        sizes, crops = image_crops(self.config, image_sizes, batch_num_images)
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([pv[:n] for pv, n in zip(pixel_values, crops)], dim=0)
        parts.append(pixel_values.to(self.vision_tower.dtype))
    frames: list[int] = []
    if pixel_values_videos is not None:
        if pixel_values_videos.dim() == 5:
            frames = [pixel_values_videos.shape[1]] * pixel_values_videos.shape[0]
            pixel_values_videos = pixel_values_videos.flatten(0, 1)
        elif video_frames is None:
            raise ValueError("visionzip: pixel_values_videos of one frame per row need video_frames")
        else:  # the trainer leaves the counts on the host (training/dataloaders.py HOST_COUNTS)
            frames = [int(n) for n in video_frames.tolist()]
        parts.append(pixel_values_videos.to(self.vision_tower.dtype))
    blank = not parts
    if blank:
        blank_image = _blank_image(self, input_ids.device)
        sizes, crops = image_crops(self.config, blank_image["image_sizes"])
        parts.append(blank_image["pixel_values"])
    pixels = torch.cat(parts) if len(parts) > 1 else parts[0]
    n_crops = sum(crops)
    if vz is None:
        layer = self.config.vision_feature_layer
        hidden = self.vision_tower(pixels, output_hidden_states=True).hidden_states[layer]
        if self.config.vision_feature_select_strategy == "default":  # a tower with CLS: dropped
            hidden = hidden[:, 1:]
        image_hidden, scores, keys = hidden[:n_crops], None, None
    else:
        hidden, scores, keys = capture_received_attention(self.vision_tower, pixels, vz.feature_layer)
        image_selection = select_by_scores(scores[:n_crops], keys[:n_crops], vz.dominant, vz.contextual)
        image_hidden = compress_selected(hidden[:n_crops], image_selection, vz.merge)
    # One projector call over the kept image tokens and every frame token (it acts per token).
    tokens = [image_hidden.flatten(0, 1), hidden[n_crops:].flatten(0, 1)]
    projected = self.multi_modal_projector(torch.cat(tokens))
    image_part, video_part = projected.split([tokens[0].shape[0], tokens[1].shape[0]])
    image_part = image_part.view(n_crops, image_hidden.shape[1], projected.shape[-1])
    if not crops:  # videos only
        image_features = []
    elif vz is None:
        image_features, _ = self.pack_image_features(
            list(image_part.split(crops)),
            torch.as_tensor(sizes, device=pixels.device),
            image_newline=self.image_newline,
            vision_aspect_ratio=self.config.vision_aspect_ratio,
        )
    else:
        image_features = _lay_out_images(self, image_part, image_selection, sizes, crops, vz)
    video_features = []
    if frames:
        video_part = video_part.view(sum(frames), hidden.shape[1], projected.shape[-1])
        if vz is None:
            pooled = self.apply_pooling(video_part)
        else:
            pooled, selection = _select_pooled(self, video_part, scores[n_crops:], keys[n_crops:], vz)
            pooled = compress_selected(pooled, selection, vz.merge)
        newline = self.image_newline[None].to(pooled.dtype)
        video_features = [torch.cat([v.flatten(0, 1), newline]) for v in pooled.split(frames)]
    if blank:
        embeds = embeds + torch.stack([f.sum() for f in image_features]).sum().to(embeds.dtype) * 0.0
    else:
        image = torch.cat(image_features).to(embeds.dtype) if image_features else None
        video = torch.cat(video_features).to(embeds.dtype) if video_features else None
        image_mask, video_mask = self.get_placeholder_mask(
            input_ids, inputs_embeds=embeds, image_features=image, video_features=video
        )
        if image is not None:
            embeds = embeds.masked_scatter(image_mask, image)
        if video is not None:
            embeds = embeds.masked_scatter(video_mask, video)
    return type(self).forward(self, None, inputs_embeds=embeds, **kwargs)


# --- the processor ----------------------------------------------------------------------------------


def _tiled_count(self: LlavaOnevisionProcessor, image_size) -> int:
    side = self.image_processor.size["height"]
    return crops_per_image_pinpoints(self.image_processor.image_grid_pinpoints, side, image_size)


def crops_per_image_pinpoints(pinpoints: list, side: int, image_size) -> int:
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    return image_size_to_num_patches(list(int(v) for v in image_size), pinpoints, side)


def _replace_image_token(
    self: LlavaOnevisionProcessor, image_inputs: dict, image_idx: int, **kwargs: Any
) -> str:
    cumulative, multi = 0, False
    for n in image_inputs["batch_num_images"]:
        if image_idx < cumulative + n:
            multi = n != 1
            break
        cumulative += n
    per_crop = self._visionzip.tokens_per_image
    if multi:
        return self.image_token * (per_crop + 1)
    size = image_inputs["image_sizes"][image_idx]
    size = size.tolist() if hasattr(size, "tolist") else size
    return self.image_token * (_tiled_count(self, size) * per_crop)


def _frame_split(self: LlavaOnevisionProcessor) -> int:
    pooled = math.ceil(int(math.sqrt(self.num_image_tokens)) / 2) ** 2
    return sum(self._visionzip.split_for(pooled, f"a video frame ({pooled} tokens after the 2x2 pooling)"))


def _replace_video_token(
    self: LlavaOnevisionProcessor, video_inputs: dict, video_idx: int, **kwargs: Any
) -> str:
    video = video_inputs["pixel_values_videos"][video_idx]
    frames = len(video) if isinstance(video, (list, tuple)) else video.shape[0]
    return self.video_token * (frames * _frame_split(self) + 1)


def _num_multimodal_tokens(self: LlavaOnevisionProcessor, image_sizes=None, video_sizes=None, **kwargs: Any):
    data = {}
    if image_sizes is not None:
        per_crop = self._visionzip.tokens_per_image
        data["num_image_tokens"] = [_tiled_count(self, size) * per_crop for size in image_sizes]
        data["num_image_patches"] = [1] * len(image_sizes)
    if video_sizes is not None:
        data["num_video_tokens"] = [int(t) * _frame_split(self) + 1 for t, _, _ in video_sizes]
    return MultiModalData(**data)


# --- the download layout (tiny folders for tests) ---------------------------------------------------

# The chat template llava-hf ships in chat_template.json: every image and video of a turn first, then
# its text; assistant text marked for generation.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% endgeneration %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% endif %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def to_4x_key(name: str) -> str:
    """A transformers 5 ``LlavaOnevisionForConditionalGeneration`` key as the 4.45 download names it."""
    for new, old in (
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.image_newline", "image_newline"),
    ):
        if name.startswith(new):
            return old + name[len(new) :]
    raise ValueError(f"unexpected LLaVA-OneVision key {name}")


def tiny_pinpoints(side: int) -> list[list[int]]:
    """Tilings up to 3 x 3 crops of ``side`` (the download has 36, up to 6 x 6 of 384 px)."""
    return [[r * side, c * side] for r in (1, 2, 3) for c in (1, 2, 3)]


# --- the family -------------------------------------------------------------------------------------


class LlavaOnevision(LlavaNext):
    name = "llava-onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel")
    processor_classes = ("LlavaOnevisionProcessor",)
    model_types = ("llava_onevision",)
    video_token = "<video>"
    default_feature_layer = -1  # the llava-hf conversion keeps 26 SigLIP layers and reads the last
    default_budget = {"dominant": 54, "contextual": 10, "feature_layer": -1}
    uses_chat_template = True
    takes_video = True  # every frame resized to one crop, pooled 2x2 (see the module's "Videos")
    selected_video_tokens = "pooled tokens"  # a frame's selection runs after the 2x2 pooling
    # Trained on its chat template (Qwen2's ChatML), each image tiled by its own processor.
    data_defaults = {"template": "chat_template", "image_placement": "keep", "image_aspect_ratio": "anyres"}
    templates = ("chat_template",)
    tiny_tokenizer = "qwen2-bpe"
    bench_sizes = ONEVISION_SIZES
    # Benchmarks feed a square 768 px image: the 2 x 2 tiling of 384 px crops, so 5 crops (base + 4
    # tiles) and 729 + 54 x 54 + 54 = 3699 stock tokens (unpadded, no downsampling under anyres_max_9).
    bench_image = (768, 768)
    # Visual tokens per crop -> (dominant, contextual), as LLaVA-NeXT's table (the paper's 54 + 10
    # proportion); 729 is the stock model (every patch of every crop, unpadded, newlines).
    bench_budgets = {729: None, 128: (108, 20), 64: (54, 10), 32: (27, 5)}
    bench_prompt_tokens = 1  # <|im_start|> before the text
    # Its SigLIP tower, the unpadding and the anyres_max_9 downsampling run on meta (sizes from the CPU
    # image_sizes), so the whole step is simulated, tower included, and calibrated against a real one.
    simulation = {
        "size": "llava-onevision-7b",
        "micro_batch": 1,
        "batch_source": "1 per GPU: LLaVA-NeXT scripts/train/finetune_ov.sh (per-device 1, zero3, gradient "
        "checkpointing, bf16, SigLIP tuned); configs/llava-onevision-qwen2-7b-ov-hf/finetune.yaml: 1 x "
        "accumulation 32 x 8 GPUs = 256",
        "modes": ("finetune_vision", "finetune", "lora"),
        "calibrate": (729, 32),
    }

    # --- benchmarks ------------------------------------------------------------------------------
    def bench_config(self, size, tokenizer) -> Any:
        """A ``llava_onevision`` config of ``size``'s shapes (the released 36 tilings of its crop side,
        ``anyres_max_9``), with the tiny tokenizer's ids for pad, bos and eos, and ``<image>`` /
        ``<video>`` at the ids :meth:`bench_processor` adds them at (right after its vocabulary)."""
        text = {
            **size.text,
            "bos_token_id": tokenizer.convert_tokens_to_ids("<|im_start|>"),
            "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
            "pad_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        }
        return self.build_config(
            size.vision,
            text,
            len(tokenizer),
            len(tokenizer) + 1,
            image_grid_pinpoints=onevision_pinpoints(size.vision["image_size"]),
            vision_aspect_ratio="anyres_max_9",
            tie_word_embeddings=False,
        )

    def bench_processor(self, model: nn.Module, size, tokenizer):
        """The processor built from parts: ``tokenizer`` with ``<image>`` and ``<video>`` added (at the
        ids :meth:`bench_config` gave the model), the family's chat template, SigLIP's image settings
        with the model's tilings."""
        tokenizer.add_special_tokens(
            {"additional_special_tokens": ["<image>", "<video>"]}, replace_extra_special_tokens=False
        )
        tokenizer.model_max_length = 32768
        config = model.config
        side = config.vision_config.image_size
        image_id = tokenizer.convert_tokens_to_ids("<image>")
        if image_id != config.image_token_id:
            raise RuntimeError(
                f"{self.name}: <image> is {image_id} in the tokenizer, {config.image_token_id} in the model"
            )
        return LlavaOnevisionProcessor(
            image_processor=self.image_processor_for(config, side),
            tokenizer=tokenizer,
            video_processor=OnevisionVideoProcessor(
                size={"height": side, "width": side}, image_mean=[0.5] * 3, image_std=[0.5] * 3
            ),
            chat_template=CHAT_TEMPLATE,
            num_image_tokens=patch_side(config) ** 2,
            vision_feature_select_strategy="full",
            vision_aspect_ratio=config.vision_aspect_ratio,
        )

    def bench_messages(self, question: str) -> list[dict]:
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]

    def bench_batch(self, size, config: Any, plan: Any, device="cpu", seed: int = 0):
        return onevision_synthetic_batch(size, config, plan, self.bench_image, device, seed=seed)

    def step_flops(self, size, config: Any, parts, plan, split, *, samples, seq_len, logits_positions=None):
        return onevision_step_flops(
            config, parts, plan, split, samples=samples, seq_len=seq_len, logits_positions=logits_positions
        )

    def prompt(
        self, processor, question: str, images: int, videos: int = 0, system: str | None = None
    ) -> str:
        """The first user turn rendered by the processor's chat template (images, then videos, then
        the question), with the generation prompt."""
        return Qwen2_5VL.prompt(self, processor, question, images, videos, system)

    def image_layout(self, image_processor, video_processor=None):
        """Tiled images; video frames each resized to the video processor's one size, read one by one
        (no temporal patch), handed to the model as frames (:class:`~.onevision_processing.FrameSize`)."""
        video = None if video_processor is None else FrameSize.of(video_processor)
        return ImageLayout(tiles=True, video=video, video_temporal_patch=1, several_one_crop=True)

    def several_image_tokens(self, config: Any, vz: VisionZipConfig | None) -> int | None:
        """One crop and the newline (see the module's "One-crop images")."""
        return (self.tower_tokens(config) if vz is None else vz.tokens_per_image) + 1

    # --- loading ---------------------------------------------------------------------------------
    def load(self, path: str, check_files: bool = True, **from_pretrained_kwargs: Any) -> nn.Module:
        return load_checked(
            LlavaOnevisionForConditionalGeneration, path, check_files, **from_pretrained_kwargs
        )

    def load_processor(self, path: str, trust_remote_code: bool = False, config: Any = None, **kwargs: Any):
        # Built from PIL/numpy parts: AutoProcessor would import torchvision for the video processor.
        return load_onevision_processor(path)

    def config_from_dict(self, data: dict) -> Any:
        from transformers import LlavaOnevisionConfig

        return LlavaOnevisionConfig.from_dict(data)

    def assemble(self, *args, **kwargs):
        raise NotImplementedError("llava-onevision: no stage-1 assembly; start from a released checkpoint")

    def from_stage1(self, *args, **kwargs):
        raise NotImplementedError("llava-onevision: no stage-1 assembly; start from a released checkpoint")

    # --- visual tokens ---------------------------------------------------------------------------
    def tower_tokens(self, config: Any) -> int:
        return patch_side(config) ** 2  # SigLIP: patches only, no CLS

    def stock_tokens_per_image(self, config: Any, image_size: tuple[int, int] | None = None) -> int:
        """The stock count of an image alone in its sample (tiled: base crop, unpadded and possibly
        downsampled tile grid, one newline per row, transformers' processor formula); without a
        size, a one-crop image of a several-image sample (its crop and one newline)."""
        from transformers.models.llava_onevision.processing_llava_onevision import (
            LlavaOnevisionProcessor as Stock,
        )

        base = self.tower_tokens(config)
        if image_size is None:
            return base + 1
        side = patch_side(config)
        rows, cols = tile_grid(config, image_size)
        bound = types.SimpleNamespace(
            vision_aspect_ratio=getattr(config, "vision_aspect_ratio", "anyres_max_9")
        )
        unpadded, newlines = Stock._get_unpadded_features(
            bound, image_size[0], image_size[1], side, side, rows, cols
        )
        return base + unpadded + newlines

    def compressed_tokens_per_image(
        self, config: Any, vz: VisionZipConfig, image_size: tuple[int, int] | None = None
    ) -> int:
        if image_size is None:
            raise ValueError(
                "llava-onevision: the visual token count depends on the image size; pass image_size=(H, W)"
            )
        return crops_per_image(config, image_size) * vz.tokens_per_image

    def stock_tokens_per_video(self, config: Any, video_size: tuple[int, int, int]) -> int:
        """Tokens of a video of ``video_size`` (frames, H, W): pooled frames and one newline."""
        return int(video_size[0]) * pooled_side(config) ** 2 + 1

    def compressed_tokens_per_video(
        self, config: Any, vz: VisionZipConfig, video_size: tuple[int, int, int]
    ) -> int:
        pooled = pooled_side(config) ** 2
        return (
            int(video_size[0])
            * sum(vz.split_for(pooled, f"a video frame ({pooled} tokens after the 2x2 pooling)"))
            + 1
        )

    def token_plan(
        self, config: Any, vz: VisionZipConfig | None, image_size: tuple[int, int] | None = None
    ) -> tuple[int, int, int]:
        crops = crops_per_image(config, image_size)
        if vz is None:
            return crops, crops * self.tower_tokens(config), self.stock_tokens_per_image(config, image_size)
        n = self.compressed_tokens_per_image(config, vz, image_size)
        return crops, n, n

    def feature_layer(self, config: Any) -> int:
        return getattr(config, "vision_feature_layer", self.default_feature_layer)

    # --- instance adaptation ---------------------------------------------------------------------
    def check_supported(self, model: nn.Module) -> None:
        find_onevision_model(model)

    def _check_settings(self, cfg: Any, vz: VisionZipConfig) -> None:
        if vz.uses_ratios:
            raise ValueError(
                "visionzip.dominant_ratio: llava-onevision takes counts per crop (dominant, contextual): every crop has "
                f"{self.tower_tokens(cfg)} tokens"
            )
        if getattr(cfg, "vision_feature_select_strategy", "full") != "full":
            raise ValueError(
                f"model.config.vision_feature_select_strategy={cfg.vision_feature_select_strategy!r}: a SigLIP tower "
                "has no CLS to drop; visionzip needs 'full'"
            )
        self._check_layer_and_fit(cfg, vz)

    def _check_layer_and_fit(self, cfg: Any, vz: VisionZipConfig) -> None:
        layer = cfg.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError(
                f"model.config.vision_feature_layer={layer!r} selects several layers; visionzip supports one"
            )
        n = cfg.vision_config.num_hidden_layers
        if resolve_feature_layer(vz.feature_layer, n) != resolve_feature_layer(layer, n):
            raise ValueError(
                f"visionzip.feature_layer={vz.feature_layer} differs from model.config.vision_feature_layer={layer}; "
                f"pass feature_layer={layer}"
            )
        vz.check_fits(self.tower_tokens(cfg), has_cls=False)

    def apply(self, model: nn.Module, vz: VisionZipConfig) -> None:
        inner = find_onevision_model(model)
        self._check_settings(inner.config, vz)
        setattr(inner, _ACTIVE, vz)
        inner.get_image_features = types.MethodType(_visionzip_get_image_features, inner)
        inner.get_video_features = types.MethodType(_visionzip_get_video_features, inner)

    def select_image_tokens(
        self, model: nn.Module, pixel_values: torch.Tensor, image_sizes: Any = None
    ) -> list[ImageTokenSelection]:
        """Per image (each tiled, as an image alone in its sample), its crops' selections."""
        inner = find_onevision_model(model)
        vz = active_settings(inner, self.name)
        if image_sizes is None:
            raise ValueError("llava-onevision: select_image_tokens needs the processor's image_sizes")
        sizes, crops = image_crops(inner.config, image_sizes)
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([pv[:n] for pv, n in zip(pixel_values, crops)], dim=0)
        _, selection = select_crops(inner.vision_tower, pixel_values, vz)
        side = patch_side(inner.config)
        images, start = [], 0
        for size, n in zip(sizes, crops):
            part: TokenSelection = selection.rows(start, start + n)
            images.append(
                ImageTokenSelection(
                    pixel_values[start : start + n], part, tile_grid(inner.config, size), side, cls=False
                )
            )
            start += n
        return images

    def select_video_tokens(
        self, model: nn.Module, pixel_values_videos: torch.Tensor, video_frames: torch.Tensor, **_: Any
    ) -> list[list[ImageTokenSelection]]:
        """Per video, per frame (a frame group is one frame), what the adapted forward keeps of its
        pooled tokens (a ``pooled_side`` square, each about 2 x 2 patches of the frame), selected by the
        calls :func:`_visionzip_get_video_features` makes. ``pixel_values_videos``: the frames of every
        video back to back, ``video_frames`` their counts (the data pipeline's layout)."""
        inner = find_onevision_model(model)
        vz = active_settings(inner, self.name)
        _, selection = _video_selection(inner, pixel_values_videos, vz)
        side = pooled_side(inner.config)
        videos, start = [], 0
        for n in video_frames.tolist():
            videos.append(
                [
                    ImageTokenSelection(
                        pixel_values_videos[f : f + 1], selection.rows(f, f + 1), (0, 0), side, cls=False
                    )
                    for f in range(start, start + n)
                ]
            )
            start += n
        return videos

    def remove(self, model: nn.Module) -> None:
        inner = find_onevision_model(model)
        for name in ("get_image_features", "get_video_features", _ACTIVE):
            inner.__dict__.pop(name, None)

    def configs(self, model: nn.Module) -> list[Any]:
        inner = find_onevision_model(model)
        return list({id(c): c for c in (inner.config, getattr(model, "config", inner.config))}.values())

    def adapt_processor(self, processor, vz: VisionZipConfig | None, config: Any = None):
        """Each tiled image expands to its crops times ``dominant + contextual``, each image of a
        several-image sample to ``dominant + contextual + 1``, each video to ``frames * (dominant +
        contextual) + 1``; ``vz=None`` restores the stock counts."""
        if type(processor).__name__ not in self.processor_classes:
            raise ValueError(
                f"visionzip_processor: the llava-onevision family takes LlavaOnevisionProcessor; got {type(processor).__name__}"
            )
        names = ("replace_image_token", "replace_video_token", "_get_num_multimodal_tokens", "_visionzip")
        if vz is None:
            for name in names:
                processor.__dict__.pop(name, None)
            return processor
        processor._visionzip = vz
        processor.replace_image_token = types.MethodType(_replace_image_token, processor)
        processor.replace_video_token = types.MethodType(_replace_video_token, processor)
        processor._get_num_multimodal_tokens = types.MethodType(_num_multimodal_tokens, processor)
        return processor

    def keep_vision_in_graph(self, model: nn.Module) -> None:
        """One tower call and one projector call per batch, whatever it holds (:func:`_forward_in_graph`):
        images and videos together, one blank image for a text-only batch."""
        inner = find_onevision_model(model)
        inner.forward = types.MethodType(_forward_in_graph, inner)

    def unused_params(self, model: nn.Module) -> set[str]:
        """``image_newline`` when VisionZip is on: a tiled image's compressed layout has no newline.
        A video, and each image of a several-image sample, still end with it, as released: it stays
        frozen, since only batches holding those would give it a gradient (ZeRO-2 reduces the same
        gradients on every rank)."""
        if getattr(find_onevision_model(model), _ACTIVE, None) is None:
            return set()
        return {name for name, _ in model.named_parameters() if name.endswith("image_newline")}

    def unused_vision_params(self, model: nn.Module) -> set[str]:
        """LLaVA's (layers after the feature layer, ``post_layernorm``) and SigLIP's pooling ``head``."""
        unused = super().unused_vision_params(model)
        head = re.compile(r"vision_tower\.(?:.*\.)?head\.")
        return unused | {name for name, _ in model.named_parameters() if head.search(name)}

    # --- building from parts (tiny test models) -----------------------------------------------------
    def build_config(
        self, vision_config: dict, text_config: dict, image_token_id: int, video_token_id: int, **extra
    ):
        from transformers import LlavaOnevisionConfig

        return LlavaOnevisionConfig(
            vision_config=vision_config,
            text_config=text_config,
            image_token_id=image_token_id,
            video_token_id=video_token_id,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            **extra,
        )

    def random_model(self, config: Any, dtype: torch.dtype | None = None) -> nn.Module:
        if dtype is None:
            return LlavaOnevisionForConditionalGeneration(config)
        return LlavaOnevisionForConditionalGeneration._from_config(config, dtype=dtype)

    def image_processor_for(self, config: Any, side: int):
        return LlavaOnevisionImageProcessorPil(
            size={"height": side, "width": side},
            image_grid_pinpoints=config.image_grid_pinpoints,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        )

    def write_tiny(
        self, tokenizer: Any, out_dir, seed: int = 0, image_size: int = 64, patch_size: int = 8
    ) -> Path:
        """A tiny random LLaVA-OneVision laid out like ``llava-hf/llava-onevision-qwen2-7b-ov-hf``
        (saved by transformers 4.45): ``config.json`` with 4.x keys (``image_token_index``,
        ``video_token_index``, text ``torch_dtype``/``rope_theta``), two safetensors shards with the
        4.x weight names plus the index, ``generation_config.json``, the Qwen2 tokenizer files with
        ``<image>``/``<video>`` added, ``chat_template.json``, ``preprocessor_config.json``,
        ``processor_config.json`` and ``video_processor/preprocessor_config.json``.

        Shapes: a 2-layer SigLIP of width 32 on ``image_size`` px crops of ``patch_size`` px patches
        (8 x 8 = 64 patches, no CLS), tilings up to 3 x 3 with ``anyres_max_2`` (so a 2 x 2-tile image
        is downsampled by the stock model), a 2-layer Qwen2 of width 64."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tokenizer.add_special_tokens(
            {"additional_special_tokens": ["<image>", "<video>"]}, replace_extra_special_tokens=False
        )
        image_id, video_id = tokenizer.convert_tokens_to_ids(["<image>", "<video>"])
        vocab = -(-len(tokenizer) // 64) * 64
        eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        bos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        text = {
            "model_type": "qwen2",
            "vocab_size": vocab,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-6,
            "torch_dtype": "float32",
            "tie_word_embeddings": False,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "architectures": ["Qwen2ForCausalLM"],
        }
        vision = {
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": patch_size,
            "vision_use_head": False,
        }
        pinpoints = tiny_pinpoints(image_size)
        config_4x = {
            "architectures": ["LlavaOnevisionForConditionalGeneration"],
            "model_type": "llava_onevision",
            "image_token_index": image_id,
            "video_token_index": video_id,
            "projector_hidden_act": "gelu",
            "vision_feature_layer": -1,
            "vision_feature_select_strategy": "full",
            "vision_aspect_ratio": "anyres_max_2",
            "image_grid_pinpoints": pinpoints,
            "use_image_newline_parameter": True,
            "tie_word_embeddings": False,
            "torch_dtype": "float32",
            "transformers_version": "4.45.0.dev0",
            "text_config": text,
            "vision_config": vision,
        }
        (out / "config.json").write_text(json.dumps(config_4x, indent=2))
        config = self.config_from_file(str(out / "config.json"))
        torch.manual_seed(seed)
        model = self.random_model(config).eval()
        state = {to_4x_key(k): v.detach().contiguous() for k, v in model.state_dict().items()}
        names = sorted(state)
        half = len(names) // 2
        shards = {
            "model-00001-of-00002.safetensors": names[:half],
            "model-00002-of-00002.safetensors": names[half:],
        }
        weight_map = {}
        for file, keys in shards.items():
            save_file({k: state[k] for k in keys}, out / file, metadata={"format": "pt"})
            weight_map.update({k: file for k in keys})
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        generation = {
            "_from_model_config": True,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "transformers_version": "4.45.0.dev0",
        }
        (out / "generation_config.json").write_text(json.dumps(generation, indent=2))

        tokenizer.save_pretrained(out)
        tokenizer.backend_tokenizer.model.save(
            str(out)
        )  # vocab.json + merges.txt, as the download ships them
        tok_config = json.loads((out / "tokenizer_config.json").read_text())
        tok_config.pop("chat_template", None)  # the download keeps it in chat_template.json
        tok_config.update(tokenizer_class="Qwen2Tokenizer", processor_class="LlavaOnevisionProcessor")
        (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
        (out / "chat_template.jinja").unlink(missing_ok=True)
        (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))
        (out / "added_tokens.json").write_text(
            json.dumps({"<image>": image_id, "<video>": video_id}, indent=2)
        )
        special = {
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<image>", "<video>"],
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
        }
        if not (out / "special_tokens_map.json").is_file():  # 4.45 writes it; transformers 5 does not
            (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
        image_settings = {
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_pad": True,
            "do_rescale": True,
            "do_resize": True,
            "image_grid_pinpoints": pinpoints,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "resample": 3,
            "rescale_factor": 1 / 255,
            "size": {"height": image_size, "width": image_size},
        }
        preprocessor = {
            **image_settings,
            "image_processor_type": "LlavaOnevisionImageProcessor",
            "processor_class": "LlavaOnevisionProcessor",
        }
        (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
        video = {
            k: image_settings[k]
            for k in (
                "do_convert_rgb",
                "do_normalize",
                "do_rescale",
                "do_resize",
                "image_mean",
                "image_std",
                "resample",
                "rescale_factor",
                "size",
            )
        }
        (out / "video_processor").mkdir(exist_ok=True)
        (out / "video_processor" / "preprocessor_config.json").write_text(
            json.dumps(
                {
                    **video,
                    "image_processor_type": "LlavaOnevisionVideoProcessor",
                    "processor_class": "LlavaOnevisionProcessor",
                },
                indent=2,
            )
        )
        processor_config = {
            "image_token": "<image>",
            "num_image_tokens": (image_size // patch_size) ** 2,
            "processor_class": "LlavaOnevisionProcessor",
            "video_token": "<video>",
            "vision_feature_select_strategy": "full",
            # The download leaves it out (the class default, anyres_max_9, is its model's); the tiny
            # model's differs, and the stock processor must count as its model packs.
            "vision_aspect_ratio": config_4x["vision_aspect_ratio"],
        }
        (out / "processor_config.json").write_text(json.dumps(processor_config, indent=2))
        return out

    def tiny_model(self, tokenizer: Any, seed: int = 0, **shape: Any):
        """The tiny folder's model and processor, loaded back (the folder is written to a temporary place)."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            folder = self.write_tiny(tokenizer, Path(tmp) / "model", seed, **shape)
            return self.load(str(folder)).eval(), self.load_processor(str(folder))


__all__ = ["LlavaOnevision", "OnevisionVideoProcessor", "capture_received_attention", "find_onevision_model"]
