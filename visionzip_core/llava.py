"""VisionZip on transformers LLaVA (llava-hf format), by adapting model and processor instances.

Nothing here patches a library class. :func:`visionzip` binds a replacement ``get_image_features``
on the model's ``LlavaModel`` *instance*; both ``LlavaModel.forward`` and
``LlavaForConditionalGeneration.get_image_features`` call ``self.model.get_image_features``, so
``forward`` and ``generate`` pick it up. The settings are recorded as a dict at
``model.config.visionzip`` so that they travel with ``save_pretrained``;
:func:`load_visionzip_model` reads them back and re-applies them.

Usage::

    model = visionzip(LlavaForConditionalGeneration.from_pretrained(path), dominant=54, contextual=10)
    processor = visionzip_processor(LlavaProcessor.from_pretrained(path), model.config)
    model.save_pretrained(out); processor.save_pretrained(out)
    model = load_visionzip_model(out)            # compression re-applied
    processor = load_visionzip_processor(out)    # reads out/config.json for the token count
    model = remove_visionzip(model)              # back to the stock model
"""

from __future__ import annotations

import json
import os
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration, LlavaModel, LlavaProcessor
from transformers.modeling_outputs import BaseModelOutputWithPooling

from visionzip_core.algorithm import visionzip_compress
from visionzip_core.capture import capture_feature_layer, check_vision_tower, resolve_feature_layer
from visionzip_core.config import CONFIG_KEY, VisionZipConfig, num_image_tokens, read_visionzip_config
from visionzip_core.weight_checks import load_checked

SUPPORTED_MODELS = ("LlavaForConditionalGeneration", "LlavaModel")

# Attribute on the LlavaModel instance holding the active settings (the bound method reads it).
_ACTIVE = "_visionzip_active"


def find_llava_model(model: nn.Module) -> LlavaModel:
    """The ``LlavaModel`` inside ``model`` (itself, a ``LlavaForConditionalGeneration``, or a PEFT wrapper)."""
    inner = model
    # PEFT: PeftModel -> LoraModel (or another tuner) -> the transformers model.
    get_base = getattr(inner, "get_base_model", None)
    if callable(get_base):
        inner = get_base()
    if isinstance(inner, LlavaForConditionalGeneration):
        return inner.model
    if isinstance(inner, LlavaModel):
        return inner
    raise ValueError(
        f"visionzip supports {', '.join(SUPPORTED_MODELS)} (optionally wrapped by peft); got {type(model).__name__}"
    )


def _stock_tokens(llava_config: Any) -> int:
    vision = llava_config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 + 1


def _check_model(llava: LlavaModel, config: VisionZipConfig) -> None:
    cfg = llava.config
    check_vision_tower(llava.vision_tower)
    model_layer = cfg.vision_feature_layer
    if not isinstance(model_layer, int):
        raise ValueError(
            f"model.config.vision_feature_layer={model_layer!r} selects several layers; "
            "visionzip supports a single feature layer"
        )
    num_layers = cfg.vision_config.num_hidden_layers
    chosen = resolve_feature_layer(config.feature_layer, num_layers)
    if chosen != resolve_feature_layer(model_layer, num_layers):
        raise ValueError(
            f"visionzip.feature_layer={config.feature_layer} differs from model.config.vision_feature_layer="
            f"{model_layer}, the layer the projector was trained on; pass feature_layer={model_layer}"
        )
    config.check_fits(_stock_tokens(cfg))


def _visionzip_get_image_features(
    self: LlavaModel,
    pixel_values: torch.Tensor,
    vision_feature_layer: int | list[int] | None = None,
    vision_feature_select_strategy: str | None = None,
    image_sizes: torch.Tensor | None = None,
    **kwargs: Any,
) -> BaseModelOutputWithPooling | tuple:
    """``LlavaModel.get_image_features`` with VisionZip: ``dominant + contextual`` tokens per image.

    Same signature and return type as the stock method. ``pooler_output`` is a list with one
    ``(dominant + contextual, text_hidden)`` tensor per image; ``last_hidden_state`` is the
    uncompressed feature-layer output ``(B, N, C)`` (the tower stops there), ``hidden_states`` is
    None. ``vision_feature_select_strategy`` is ignored: ``keep_cls`` decides about CLS.
    """
    config: VisionZipConfig = getattr(self, _ACTIVE)
    num_layers = len(self.vision_tower.encoder.layers)
    if vision_feature_layer is not None and (
        not isinstance(vision_feature_layer, int)
        or resolve_feature_layer(vision_feature_layer, num_layers)
        != resolve_feature_layer(config.feature_layer, num_layers)
    ):
        raise ValueError(
            f"vision_feature_layer={vision_feature_layer!r} conflicts with visionzip.feature_layer="
            f"{config.feature_layer}; call visionzip(model, feature_layer=...) to change it"
        )
    if image_sizes is not None:
        raise ValueError(
            "visionzip: image_sizes (any-resolution tiling) is not supported for LLaVA-1.5 towers"
        )
    return_dict = kwargs.pop("return_dict", True)
    captured = capture_feature_layer(
        self.vision_tower,
        pixel_values,
        config.feature_layer,
        interpolate_pos_encoding=bool(kwargs.get("interpolate_pos_encoding", False)),
    )
    compressed = visionzip_compress(captured.hidden, captured.cls_attention, captured.keys, config)
    image_features = self.multi_modal_projector(compressed)
    output = BaseModelOutputWithPooling(last_hidden_state=captured.hidden, pooler_output=list(image_features))
    return output if return_dict else output.to_tuple()


def visionzip(
    model: nn.Module,
    dominant: int | None = None,
    contextual: int | None = None,
    feature_layer: int = -2,
    keep_cls: bool = True,
    merge: str = "paper",
    config: VisionZipConfig | None = None,
) -> nn.Module:
    """Make a LLaVA model instance feed ``dominant + contextual`` visual tokens per image to its LLM.

    Args:
        model: ``LlavaForConditionalGeneration`` or ``LlavaModel``, optionally wrapped by peft;
            may be loaded under DeepSpeed ZeRO-3. Adapted in place (no class is patched).
        dominant, contextual, feature_layer, keep_cls, merge: see :class:`VisionZipConfig`.
        config: a ready :class:`VisionZipConfig` instead of the keyword settings.

    Returns:
        The same ``model``. Its ``config.visionzip`` records the settings and
        ``config.image_seq_length`` the new token count. Calling again re-configures.

    Raises:
        ValueError: unsupported model class, invalid settings, or a split that does not fit the tower.
    """
    if config is None:
        if dominant is None or contextual is None:
            raise ValueError("visionzip: pass dominant= and contextual=, or config=VisionZipConfig(...)")
        config = VisionZipConfig(
            dominant=dominant,
            contextual=contextual,
            feature_layer=feature_layer,
            keep_cls=keep_cls,
            merge=merge,
        )
    llava = find_llava_model(model)
    _check_model(llava, config)
    setattr(llava, _ACTIVE, config)
    llava.get_image_features = types.MethodType(_visionzip_get_image_features, llava)
    for cfg in {id(c): c for c in (llava.config, getattr(model, "config", llava.config))}.values():
        setattr(cfg, CONFIG_KEY, config.model_dump())
        cfg.image_seq_length = config.tokens_per_image
    return model


def remove_visionzip(model: nn.Module) -> nn.Module:
    """Undo :func:`visionzip`: the stock ``get_image_features``, config key removed. Returns ``model``."""
    llava = find_llava_model(model)
    llava.__dict__.pop("get_image_features", None)
    llava.__dict__.pop(_ACTIVE, None)
    for cfg in {id(c): c for c in (llava.config, getattr(model, "config", llava.config))}.values():
        if hasattr(cfg, CONFIG_KEY):
            delattr(cfg, CONFIG_KEY)
        cfg.image_seq_length = num_image_tokens(cfg)
    return model


def load_visionzip_model(
    path: str | os.PathLike, **from_pretrained_kwargs: Any
) -> LlavaForConditionalGeneration:
    """``LlavaForConditionalGeneration.from_pretrained(path, **kwargs)``, then re-apply the recorded settings.

    ``trust_remote_code`` is never turned on here; pass it yourself only for code you trust.

    The weights are checked first (:func:`visionzip_core.weight_checks.load_checked`): a missing,
    unexpected or non-finite tensor, or an unreadable file, is refused instead of loaded.

    Raises:
        WeightsError: unusable weights (one line naming the file and tensor).
        ValueError: the checkpoint records no VisionZip settings.
    """
    model = load_checked(LlavaForConditionalGeneration, path, **from_pretrained_kwargs)
    config = read_visionzip_config(model.config)
    if config is None:
        raise ValueError(
            f"{path}: config.json records no '{CONFIG_KEY}' settings; load it with from_pretrained and call "
            "visionzip(model, dominant=..., contextual=...)"
        )
    return visionzip(model, config=config)


def _visionzip_replace_image_token(
    self: LlavaProcessor, image_inputs: dict, image_idx: int, **kwargs: Any
) -> str:
    return self.image_token * self._visionzip_tokens


def _visionzip_num_multimodal_tokens(self: LlavaProcessor, image_sizes=None, **kwargs: Any):
    from transformers.processing_utils import MultiModalData

    if image_sizes is None:
        return MultiModalData()
    count = len(image_sizes)
    return MultiModalData(num_image_tokens=[self._visionzip_tokens] * count, num_image_patches=[1] * count)


def visionzip_processor(processor: LlavaProcessor, config: Any) -> LlavaProcessor:
    """Make ``processor`` expand each ``<image>`` to the compressed token count. Returns it, adapted in place.

    Args:
        processor: a ``LlavaProcessor``.
        config: the model's (Llava) config, from which :func:`num_image_tokens` reads the count, or a
            :class:`VisionZipConfig`.

    The count is not stored in ``processor_config.json``; after ``processor.save_pretrained(out)``
    reload with :func:`load_visionzip_processor`, which reads the model config saved beside it.
    """
    if not isinstance(processor, LlavaProcessor):
        raise ValueError(f"visionzip_processor supports LlavaProcessor; got {type(processor).__name__}")
    tokens = config.tokens_per_image if isinstance(config, VisionZipConfig) else num_image_tokens(config)
    processor._visionzip_tokens = tokens
    processor.replace_image_token = types.MethodType(_visionzip_replace_image_token, processor)
    processor._get_num_multimodal_tokens = types.MethodType(_visionzip_num_multimodal_tokens, processor)
    return processor


def load_visionzip_processor(
    path: str | os.PathLike, model_config: Any = None, **kwargs: Any
) -> LlavaProcessor:
    """``LlavaProcessor.from_pretrained(path)`` expanding ``<image>`` to the model's token count.

    Args:
        path: processor folder.
        model_config: the model config (or :class:`VisionZipConfig`); by default ``path/config.json``
            (the llava-hf layout keeps model and processor in one folder).
    """
    if model_config is None:
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise ValueError(f"{config_file} not found; pass model_config= to load_visionzip_processor")
        from transformers import LlavaConfig

        model_config = LlavaConfig.from_dict(json.loads(config_file.read_text()))
    processor = LlavaProcessor.from_pretrained(path, **kwargs)
    return visionzip_processor(processor, model_config)
