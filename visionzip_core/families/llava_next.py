"""LLaVA-NeXT (llava-hf ``LlavaNextForConditionalGeneration``): anyres, a base crop plus tiles.

Rule, per the authors' ``visionzip/llava_arch.py`` (``prepare_inputs_labels_for_multimodal_visionzip``
and ``restore_image_features_sorted``): every crop, the base image and each anyres tile alike, is
compressed on its own with the LLaVA-1.5 rule (CLS attention and head-averaged keys of CLIP layer
-2, captured under SDPA), so each crop becomes ``dominant + contextual`` tokens and an image with
``n`` crops becomes ``n * (dominant + contextual)``, whatever its size. In the LLM sequence:

1. the base crop's tokens as LLaVA-1.5 orders them (CLS, dominant patches in raster order, then
   the contextual tokens);
2. the tiles' dominant patches in raster order over the whole tiled grid (row by row across tile
   boundaries, as the stock model lays out the tile grid), not tile by tile;
3. the tiles' CLS tokens, in tile order (when ``keep_cls``);
4. the tiles' contextual tokens, tile by tile, each in target order.

No unpadding and no ``image_newline``: the kept tokens no longer form a grid, so there are no rows
to end, and the count must not depend on the padding. The authors' restore step hard-codes 576
patches per crop (24 x 24); here the grid side comes from the config, so any tower size works.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn
from transformers import LlavaNextForConditionalGeneration, LlavaNextModel, LlavaNextProcessor
from transformers.image_processing_utils import select_best_resolution
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from visionzip_core.algorithm import compress_selected
from visionzip_core.capture import check_vision_tower, resolve_feature_layer
from visionzip_core.config import VisionZipConfig
from visionzip_core.data.images import ImageLayout
from visionzip_core.families.base import ImageTokenSelection
from visionzip_core.families.llava import (
    Llava15,
    _forward_with_vision_in_graph,
    active_settings,
    capture_and_select,
    patches_per_image,
)
from visionzip_core.tokenizer_files import save_pretrained_faithfully
from visionzip_core.weight_checks import load_checked

_ACTIVE = "_visionzip_active"


def find_llava_next_model(model: nn.Module) -> LlavaNextModel:
    """The ``LlavaNextModel`` inside ``model`` (itself, the ForConditionalGeneration, or a PEFT wrapper)."""
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    if isinstance(inner, LlavaNextForConditionalGeneration):
        return inner.model
    if isinstance(inner, LlavaNextModel):
        return inner
    raise ValueError(
        f"visionzip: the llava-next family takes LlavaNextForConditionalGeneration or LlavaNextModel "
        f"(optionally wrapped by peft); got {type(model).__name__}"
    )


def crops_per_image(config: Any, image_size: tuple[int, int]) -> int:
    """Crops the anyres processor cuts an image of ``image_size`` (H, W) into: base + tiles."""
    return image_size_to_num_patches(
        image_size=list(image_size),
        grid_pinpoints=config.image_grid_pinpoints,
        patch_size=config.vision_config.image_size,
    )


def tile_grid(config: Any, image_size: tuple[int, int]) -> tuple[int, int]:
    """``(rows, cols)`` of tiles for an image of ``image_size`` (H, W)."""
    height, width = select_best_resolution(list(image_size), config.image_grid_pinpoints)
    side = config.vision_config.image_size
    return height // side, width // side


def layout_image(
    compressed: torch.Tensor,
    dominant_idx: torch.Tensor,
    grid: tuple[int, int],
    side: int,
    vz: VisionZipConfig,
    cls: bool = True,
) -> torch.Tensor:
    """One image's tokens in the LLM sequence, from its crops' compressed tokens.

    Args:
        compressed: ``(n_crops, D + K, H)`` per crop: dominant tokens in raster order (CLS first
            when kept), then contextual; crop 0 is the base image, crops 1.. the tiles row-major.
        dominant_idx: ``(n_crops, D)`` the dominant tokens' indices in each crop (CLS = 0,
            patch ``p`` at ``p``), sorted ascending, as :func:`select_dominant_tokens` returns them.
        grid: ``(rows, cols)`` of tiles; ``rows * cols == n_crops - 1``.
        side: patches per crop side (24 for CLIP-L/336).
        cls: whether token 0 of a crop is CLS (CLIP); without one (SigLIP) patch ``p`` is token
            ``p`` and there are no CLS tokens to place, whatever ``vz.keep_cls`` says.

    Returns:
        ``(n_crops * (D + K), H)``: base crop, tiles' dominant patches in raster order over the whole
        tiled grid, tiles' CLS tokens, tiles' contextual tokens.
    """
    rows, cols = grid
    tiles = compressed[1:]
    if tiles.shape[0] != rows * cols:
        raise ValueError(f"{tiles.shape[0]} tiles for a {rows} x {cols} grid")
    d = dominant_idx.shape[1]
    keep_cls = cls and vz.keep_cls
    first = 1 if keep_cls else 0  # dominant slots 0.. of each crop; slot 0 is CLS when kept
    patch = dominant_idx[1:, first:] - int(cls)  # (T, D') patch numbers in each tile
    tile = torch.arange(rows * cols, device=patch.device)[:, None]
    y = (tile // cols) * side + patch // side
    x = (tile % cols) * side + patch % side
    order = (y * (cols * side) + x).flatten().argsort()
    dominant = tiles[:, first:d].flatten(0, 1)[order]
    parts = [compressed[0], dominant]
    if keep_cls:
        parts.append(tiles[:, 0])
    parts.append(tiles[:, d:].flatten(0, 1))
    return torch.cat(parts, dim=0)


def _flat_crops(
    config: Any, pixel_values: torch.Tensor, image_sizes: Any
) -> tuple[torch.Tensor, list[tuple[int, int]], list[int]]:
    """``(crops, sizes, crops_per_image)``: every image's crops in one ``(n, C, H, W)`` batch, each
    image's ``(H, W)`` and its crop count."""
    sizes = [
        tuple(int(v) for v in s)
        for s in (image_sizes.tolist() if torch.is_tensor(image_sizes) else image_sizes)
    ]
    crops = [crops_per_image(config, s) for s in sizes]
    if pixel_values.dim() == 5:  # (images, max crops, C, H, W), padded to the batch's largest
        pixel_values = torch.cat([pv[:n] for pv, n in zip(pixel_values, crops)], dim=0)
    return pixel_values, sizes, crops


def _visionzip_get_image_features(
    self: LlavaNextModel,
    pixel_values: torch.Tensor,
    image_sizes: torch.Tensor,
    vision_feature_layer: int | list[int] | None = None,
    vision_feature_select_strategy: str | None = None,
    **kwargs: Any,
) -> BaseModelOutputWithPooling | tuple:
    """``LlavaNextModel.get_image_features`` with VisionZip: ``n_crops * (dominant + contextual)``
    tokens per image, laid out as :func:`layout_image` says. Same signature and return type."""
    vz: VisionZipConfig = getattr(self, _ACTIVE)
    num_layers = len(self.vision_tower.encoder.layers)
    if vision_feature_layer is not None and (
        not isinstance(vision_feature_layer, int)
        or resolve_feature_layer(vision_feature_layer, num_layers)
        != resolve_feature_layer(vz.feature_layer, num_layers)
    ):
        raise ValueError(
            f"vision_feature_layer={vision_feature_layer!r} conflicts with visionzip.feature_layer={vz.feature_layer}"
        )
    return_dict = kwargs.pop("return_dict", True)
    pixel_values, sizes, crops = _flat_crops(self.config, pixel_values, image_sizes)
    captured, selection = capture_and_select(self.vision_tower, pixel_values, vz)
    compressed = self.multi_modal_projector(compress_selected(captured.hidden, selection, vz.merge))
    dominant_idx = selection.dominant
    side = self.config.vision_config.image_size // self.config.vision_config.patch_size
    features, start = [], 0
    for size, n in zip(sizes, crops):
        grid = tile_grid(self.config, size)
        features.append(
            layout_image(compressed[start : start + n], dominant_idx[start : start + n], grid, side, vz)
        )
        start += n
    output = BaseModelOutputWithPooling(last_hidden_state=captured.hidden, pooler_output=features)
    return output if return_dict else output.to_tuple()


def _replace_image_token(self: LlavaNextProcessor, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
    size = image_inputs["image_sizes"][image_idx]
    size = size.tolist() if hasattr(size, "tolist") else size
    return self.image_token * (self._visionzip_crops(size) * self._visionzip_tokens)


def _num_multimodal_tokens(self: LlavaNextProcessor, image_sizes=None, **kwargs: Any):
    from transformers.processing_utils import MultiModalData

    if image_sizes is None:
        return MultiModalData()
    counts = [self._visionzip_crops(size) * self._visionzip_tokens for size in image_sizes]
    return MultiModalData(num_image_tokens=counts, num_image_patches=[1] * len(counts))


def _processor_crops(self: LlavaNextProcessor, image_size) -> int:
    side = (
        self.image_processor.crop_size["height"]
        if self.image_processor.crop_size
        else self.image_processor.size["shortest_edge"]
    )
    return image_size_to_num_patches(list(image_size), self.image_processor.image_grid_pinpoints, side)


def _blank_image(self: LlavaNextModel, device: torch.device) -> dict[str, torch.Tensor]:
    """A blank square image of one crop's side, cut into its crops, as ``get_image_features`` kwargs."""
    vision = self.config.vision_config
    side = vision.image_size
    n = crops_per_image(self.config, (side, side))
    pixels = torch.zeros(n, vision.num_channels, side, side, dtype=self.vision_tower.dtype, device=device)
    return {"pixel_values": pixels, "image_sizes": torch.tensor([[side, side]], device=device)}


def default_grid_pinpoints(side: int) -> list[list[int]]:
    """LLaVA-NeXT's five tilings (1x2, 2x1, 2x2, 3x1, 1x3 crops of ``side``): [[336, 672], ...] at 336."""
    return [[side, 2 * side], [2 * side, side], [2 * side, 2 * side], [3 * side, side], [side, 3 * side]]


class LlavaNext(Llava15):
    name = "llava-next"
    inference_aspect_ratio = "anyres"
    model_classes = ("LlavaNextForConditionalGeneration", "LlavaNextModel")
    processor_classes = ("LlavaNextProcessor",)
    model_types = ("llava_next",)
    assembles = False  # stage 1 of LLaVA-NeXT is LLaVA-1.5's: train it with the llava-1.5 family
    reuses_stage1 = True
    count_depends_on_size = True
    aspect_ratios = ("anyres", "pad", "resize", "crop")  # anyres: tiled as llava-v1.6 trains
    # Benchmarks feed a square 672 px image: it picks the 2 x 2 tiling, so it is cut into 5 crops
    # (base + 4 tiles), the common case for llava-v1.6 at 336 px crops.
    bench_image = (672, 672)
    # Visual tokens per crop (the paper's 640 / 320 / 160 for a 5-crop image), split in the proportion
    # of the paper's 54 + 10; 576 is the stock model (every patch of every crop, unpadded, one newline
    # per row).
    bench_budgets = {576: None, 128: (108, 20), 64: (54, 10), 32: (27, 5)}
    simulation = {
        "size": "llava-next-7b",
        "micro_batch": 4,
        "batch_source": "4 per GPU: LLaVA-NeXT scripts/train/finetune_clip.sh (per-device 4, zero3, gradient "
        "checkpointing, bf16, CLIP tuned); configs/llava-next-7b/finetune.yaml: 4 x accumulation 4 x 8 GPUs = 128",
        "modes": ("finetune", "lora", "finetune_vision"),
        "calibrate": (576, 32),
    }

    def image_layout(self, image_processor, video_processor=None):
        return ImageLayout(tiles=True)  # anyres: a base crop and a grid of tiles per image

    def load(self, path: str, check_files: bool = True, **from_pretrained_kwargs: Any) -> nn.Module:
        return load_checked(LlavaNextForConditionalGeneration, path, check_files, **from_pretrained_kwargs)

    def load_processor(self, path: str, **kwargs: Any):
        return LlavaNextProcessor.from_pretrained(path, **kwargs)

    def config_from_dict(self, data: dict) -> Any:
        from transformers import LlavaNextConfig

        return LlavaNextConfig.from_dict(data)

    def assemble(self, *args, **kwargs):
        raise NotImplementedError(
            "llava-next: stage 1 is LLaVA-1.5's (train.mode=pretrain builds a llava-1.5 model); "
            "scripts/next_from_stage1.py turns its export into a LLaVA-NeXT folder for stage 2"
        )

    def from_stage1(
        self, stage1: str, out: str, grid_pinpoints: list[list[int]] | None = None, seed: int = 0
    ) -> nn.Module:
        """A LLaVA-NeXT folder in ``out`` from a LLaVA-1.5 folder (a stage-1 export): stage 2's start.

        LLaVA-NeXT's stage 1 is LLaVA-1.5's (the same CLIP tower, projector and LLM; the LLaVA-NeXT
        recipe starts stage 2 from the LLaVA-1.5 pretrained projector). The tensors carry over under
        the same names; ``image_newline``, which LLaVA-1.5 does not have, starts as LLaVA-NeXT
        initialises it (normal, std ``1/sqrt(hidden)``). The image processor keeps the source's
        normalisation and adds the tilings (llava-v1.6's five unless ``grid_pinpoints``). Returns the model.
        """
        from pathlib import Path

        from transformers import AutoProcessor

        source = Llava15().load(stage1)
        src_config = source.config
        side = src_config.vision_config.image_size
        config = self.build_config(
            src_config.vision_config,
            src_config.text_config,
            src_config.image_token_id,
            tie_word_embeddings=bool(getattr(src_config, "tie_word_embeddings", False)),
            grid_pinpoints=grid_pinpoints,
        )
        config.vision_feature_layer = src_config.vision_feature_layer
        config.vision_feature_select_strategy = src_config.vision_feature_select_strategy
        config.projector_hidden_act = src_config.projector_hidden_act
        with torch.device("meta"):
            model = LlavaNextForConditionalGeneration(config)
        missing, unexpected = model.load_state_dict(source.state_dict(), strict=False, assign=True)
        if unexpected or set(missing) != {"model.image_newline"}:
            raise ValueError(
                f"{stage1}: not a LLaVA-1.5 folder ({missing[:3]} missing, {unexpected[:3]} unexpected)"
            )
        hidden = config.text_config.hidden_size
        generator = torch.Generator().manual_seed(seed)
        dtype = source.model.multi_modal_projector.linear_1.weight.dtype
        newline = torch.randn(hidden, generator=generator) / hidden**0.5
        model.model.image_newline = nn.Parameter(newline.to(dtype))
        model.generation_config = source.generation_config
        model.tie_weights()
        processor = AutoProcessor.from_pretrained(stage1)
        stock = processor.image_processor
        image_processor = self.build_image_processor(side, config.image_grid_pinpoints)
        image_processor.image_mean, image_processor.image_std = stock.image_mean, stock.image_std
        next_processor = self.build_processor(
            image_processor,
            processor.tokenizer,
            config.vision_config,
            chat_template=getattr(processor, "chat_template", None),
        )
        Path(out).mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        save_pretrained_faithfully(next_processor, out)
        return model

    def assemble_processor(self, *args, **kwargs):
        raise NotImplementedError("llava-next: stage 1 is LLaVA-1.5's")

    # --- building from parts (tiny test models, benchmarks) ---------------------------------------
    def build_config(
        self,
        vision_config: Any,
        text_config: Any,
        image_token_id: int,
        tie_word_embeddings: bool = False,
        grid_pinpoints: list[list[int]] | None = None,
    ):
        """A ``LlavaNextConfig`` with llava-v1.6's settings: feature layer -2, CLS dropped, a 2-layer
        GELU projector, the five 1x2..3x1 tilings of the crop side unless ``grid_pinpoints`` is given."""
        from transformers import LlavaNextConfig

        return LlavaNextConfig(
            vision_config=vision_config.to_dict(),
            text_config=text_config.to_dict(),
            image_token_id=image_token_id,
            projector_hidden_act="gelu",
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            image_grid_pinpoints=grid_pinpoints or default_grid_pinpoints(vision_config.image_size),
            image_seq_length=patches_per_image(vision_config),
            tie_word_embeddings=tie_word_embeddings,
        )

    def random_model(self, config: Any, dtype: torch.dtype | None = None) -> nn.Module:
        if dtype is None:
            return LlavaNextForConditionalGeneration(config)
        return LlavaNextForConditionalGeneration._from_config(config, dtype=dtype)

    def token_plan(
        self, config: Any, vz: VisionZipConfig | None, image_size: tuple[int, int] | None = None
    ) -> tuple[int, int, int]:
        crops = crops_per_image(config, image_size)
        if vz is None:  # every patch of every crop through the projector ("default": CLS dropped)
            return (
                crops,
                crops * (self.tower_tokens(config) - 1),
                self.stock_tokens_per_image(config, image_size),
            )
        n = self.compressed_tokens_per_image(config, vz, image_size)
        return crops, n, n

    def image_processor_for(self, config: Any, side: int):
        return self.build_image_processor(side, config.image_grid_pinpoints)

    def build_image_processor(self, side: int, grid_pinpoints: list[list[int]]):
        """llava-v1.6's image processor (CLIP normalisation, anyres tiling) for crops of ``side``."""
        from transformers import LlavaNextImageProcessorPil

        return LlavaNextImageProcessorPil(
            size={"shortest_edge": side},
            crop_size={"height": side, "width": side},
            image_grid_pinpoints=grid_pinpoints,
        )

    def build_processor(
        self, image_processor, tokenizer, vision_config: Any, chat_template: str | None = None
    ):
        return LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=vision_config.patch_size,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=chat_template,
        )

    # --- visual tokens ---------------------------------------------------------------------------
    def stock_tokens_per_image(self, config: Any, image_size: tuple[int, int] | None = None) -> int:
        """The stock count for ``image_size`` (H, W): base crop + unpadded tile grid + one newline
        per row (transformers' LlavaNextProcessor formula); the base crop alone without a size."""
        base = patches_per_image(config.vision_config)
        strategy_extra = 0 if getattr(config, "vision_feature_select_strategy", "default") == "default" else 1
        if image_size is None:
            return base + strategy_extra
        side = config.vision_config.image_size // config.vision_config.patch_size
        rows, cols = tile_grid(config, image_size)
        unpadded, newlines = LlavaNextProcessor._get_unpadded_features(
            None, image_size[0], image_size[1], side, side, rows, cols
        )
        return base + strategy_extra + unpadded + newlines

    def compressed_tokens_per_image(
        self, config: Any, vz: VisionZipConfig, image_size: tuple[int, int] | None = None
    ) -> int:
        if image_size is None:
            raise ValueError(
                "llava-next: the visual token count depends on the image size; pass image_size=(H, W)"
            )
        return crops_per_image(config, image_size) * vz.tokens_per_image

    # --- instance adaptation ---------------------------------------------------------------------
    def check_supported(self, model: nn.Module) -> None:
        find_llava_next_model(model)

    def apply(self, model: nn.Module, vz: VisionZipConfig) -> None:
        inner = find_llava_next_model(model)
        check_vision_tower(inner.vision_tower)
        self._check_layer_and_fit(inner.config, vz)
        setattr(inner, _ACTIVE, vz)
        inner.get_image_features = types.MethodType(_visionzip_get_image_features, inner)

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
        vz.check_fits(self.tower_tokens(cfg))

    def select_image_tokens(
        self, model: nn.Module, pixel_values: torch.Tensor, image_sizes: Any = None
    ) -> list[ImageTokenSelection]:
        inner = find_llava_next_model(model)
        vz = active_settings(inner, self.name)
        if image_sizes is None:
            raise ValueError("llava-next: select_image_tokens needs the processor's image_sizes")
        pixel_values, sizes, crops = _flat_crops(inner.config, pixel_values, image_sizes)
        _, selection = capture_and_select(inner.vision_tower, pixel_values, vz)
        side = inner.config.vision_config.image_size // inner.config.vision_config.patch_size
        images, start = [], 0
        for size, n in zip(sizes, crops):
            part = selection.rows(start, start + n)
            images.append(
                ImageTokenSelection(
                    pixel_values[start : start + n], part, tile_grid(inner.config, size), side
                )
            )
            start += n
        return images

    def remove(self, model: nn.Module) -> None:
        inner = find_llava_next_model(model)
        inner.__dict__.pop("get_image_features", None)
        inner.__dict__.pop(_ACTIVE, None)

    def configs(self, model: nn.Module) -> list[Any]:
        inner = find_llava_next_model(model)
        return list({id(c): c for c in (inner.config, getattr(model, "config", inner.config))}.values())

    def adapt_processor(self, processor, vz: VisionZipConfig | None, config: Any = None):
        """Each image expands to its crops times ``dominant + contextual``; ``vz=None`` restores the
        stock count (the processor's own formula)."""
        if not isinstance(processor, LlavaNextProcessor):
            raise ValueError(
                f"visionzip_processor: the llava-next family takes LlavaNextProcessor; got {type(processor).__name__}"
            )
        if vz is None:
            for name in (
                "replace_image_token",
                "_get_num_multimodal_tokens",
                "_visionzip_crops",
                "_visionzip_tokens",
            ):
                processor.__dict__.pop(name, None)
            return processor
        processor._visionzip_tokens = vz.tokens_per_image
        processor._visionzip_crops = types.MethodType(_processor_crops, processor)
        processor.replace_image_token = types.MethodType(_replace_image_token, processor)
        processor._get_num_multimodal_tokens = types.MethodType(_num_multimodal_tokens, processor)
        return processor

    def keep_vision_in_graph(self, model: nn.Module) -> None:
        """As LLaVA-1.5's (see there), with one blank image cut into the crops of its size."""
        inner = find_llava_next_model(model)
        inner._visionzip_blank_image = types.MethodType(_blank_image, inner)
        inner.forward = types.MethodType(_forward_with_vision_in_graph, inner)

    def unused_params(self, model: nn.Module) -> set[str]:
        """``image_newline`` when VisionZip is on: the compressed layout has no rows to end."""
        if getattr(find_llava_next_model(model), _ACTIVE, None) is None:
            return set()
        return {name for name, _ in model.named_parameters() if name.endswith("image_newline")}

    def module_group(self, param_name: str) -> str:
        if "image_newline" in param_name:
            return "projector"  # stock NeXT trains it with the projector; VisionZip's layout never uses it
        return super().module_group(param_name)
