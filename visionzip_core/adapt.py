"""VisionZip on a model instance and its processor, for every supported family (llava-hf format).

Nothing here patches a library class: the model's family (:mod:`visionzip_core.families`) adapts
the instance, e.g. LLaVA-1.5 binds a replacement ``get_image_features`` on its ``LlavaModel``.
The settings are recorded as a dict at ``model.config.visionzip`` so that they travel with
``save_pretrained``; :func:`load_visionzip_model` reads them back and re-applies them.

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
from pathlib import Path
from typing import Any

from torch import nn

from visionzip_core.config import CONFIG_KEY, VisionZipConfig, config_from_arguments, read_visionzip_config
from visionzip_core.families import family_for, num_image_tokens


def visionzip(
    model: nn.Module,
    dominant: int | None = None,
    contextual: int | None = None,
    feature_layer: int | None = None,
    keep_cls: bool = True,
    merge: str = "paper",
    config: VisionZipConfig | None = None,
    dominant_ratio: float | None = None,
    contextual_ratio: float | None = None,
) -> nn.Module:
    """Make a model instance feed ``dominant + contextual`` visual tokens per image (or crop) to its LLM.

    Args:
        model: a supported model (e.g. ``LlavaForConditionalGeneration`` or ``LlavaModel``),
            optionally wrapped by peft; may be loaded under DeepSpeed ZeRO-3. Adapted in place (no
            class is patched).
        dominant, contextual, feature_layer, keep_cls, merge: see :class:`VisionZipConfig`.
            ``feature_layer`` defaults to the family's own (-2 for LLaVA, the last block for
            Qwen2.5-VL).
        dominant_ratio, contextual_ratio: the split as fractions of each image's tokens, instead
            of ``dominant``/``contextual`` (families whose token count follows the image size).
        config: a ready :class:`VisionZipConfig` instead of the keyword settings.

    Returns:
        The same ``model``. Its ``config.visionzip`` records the settings and
        ``config.image_seq_length`` the new token count. Calling again re-configures.

    Raises:
        ValueError: unsupported model class (the message lists the supported families), invalid
            settings, or a split that does not fit the tower.
    """
    family = family_for(model)
    if config is not None and not isinstance(config, VisionZipConfig):
        raise ValueError(f"visionzip(config=...): a VisionZipConfig, not {type(config).__name__}")
    if config is None:
        ratios = dominant_ratio is not None or contextual_ratio is not None
        if not ratios and (dominant is None or contextual is None):
            raise ValueError(
                "visionzip: pass dominant= and contextual= (or dominant_ratio= and contextual_ratio=), "
                "or config=VisionZipConfig(...)"
            )
        counts = {} if dominant is None else {"dominant": dominant}
        counts.update({} if contextual is None else {"contextual": contextual})
        config = config_from_arguments(
            "visionzip",
            **counts,
            feature_layer=family.default_feature_layer if feature_layer is None else feature_layer,
            keep_cls=keep_cls,
            merge=merge,
            dominant_ratio=dominant_ratio,
            contextual_ratio=contextual_ratio,
        )
    family.apply(model, config)
    for cfg in family.configs(model):
        setattr(cfg, CONFIG_KEY, config.model_dump(exclude_none=True))  # ratios only when given
        if hasattr(cfg, "image_seq_length") and not config.uses_ratios:  # llava-hf configs have it
            cfg.image_seq_length = config.tokens_per_image
    return model


def remove_visionzip(model: nn.Module) -> nn.Module:
    """Undo :func:`visionzip`: the stock image features, config key removed. Returns ``model``."""
    family = family_for(model)
    family.remove(model)
    for cfg in family.configs(model):
        if hasattr(cfg, CONFIG_KEY):
            delattr(cfg, CONFIG_KEY)
        if hasattr(cfg, "image_seq_length"):
            cfg.image_seq_length = num_image_tokens(cfg)
    return model


def load_visionzip_model(path: str | os.PathLike, **from_pretrained_kwargs: Any) -> nn.Module:
    """The model saved in ``path`` (its family read from config.json), with the recorded settings re-applied.

    ``trust_remote_code`` is never turned on here; pass it yourself only for code you trust.

    The weights are checked first (:func:`visionzip_core.weight_checks.load_checked`): a missing,
    unexpected or non-finite tensor, or an unreadable file, is refused instead of loaded.

    Raises:
        WeightsError: unusable weights (one line naming the file and tensor).
        ValueError: an unsupported model, or the checkpoint records no VisionZip settings.
    """
    family = family_for(_model_type(Path(path) / "config.json"))
    model = family.load(str(path), **from_pretrained_kwargs)
    config = read_visionzip_config(model.config)
    if config is None:
        raise ValueError(
            f"{path}: config.json records no '{CONFIG_KEY}' settings; load it with from_pretrained and call "
            "visionzip(model, dominant=..., contextual=...)"
        )
    return visionzip(model, config=config)


def visionzip_processor(processor: Any, config: Any) -> Any:
    """Make ``processor`` expand each image placeholder to the compressed token count. Returns it, adapted in place.

    Args:
        processor: the model family's processor (e.g. ``LlavaProcessor``).
        config: the model's config, from which :func:`num_image_tokens` reads the count, or a
            :class:`VisionZipConfig`.

    The count is not stored in ``processor_config.json``; after ``processor.save_pretrained(out)``
    reload with :func:`load_visionzip_processor`, which reads the model config saved beside it.
    """
    if isinstance(config, VisionZipConfig):
        return family_for(processor).adapt_processor(processor, config)
    return family_for(processor).adapt_processor(processor, read_visionzip_config(config), config)


def load_visionzip_processor(path: str | os.PathLike, model_config: Any = None, **kwargs: Any) -> Any:
    """The processor saved in ``path``, expanding each image placeholder to the model's token count.

    Args:
        path: processor folder.
        model_config: the model config (or :class:`VisionZipConfig`); by default ``path/config.json``
            (the llava-hf layout keeps model and processor in one folder).
    """
    config_file = Path(path) / "config.json"
    if model_config is None:
        if not config_file.is_file():
            raise ValueError(f"{config_file} not found; pass model_config= to load_visionzip_processor")
        model_config = family_for(_model_type(config_file)).config_from_file(str(config_file))
    if isinstance(model_config, VisionZipConfig):
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(path, **kwargs)
    else:
        processor = family_for(model_config).load_processor(str(path), **kwargs)
    return visionzip_processor(processor, model_config)


def _model_type(config_file: Path) -> str:
    try:
        return json.loads(config_file.read_text())["model_type"]
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{config_file}: cannot read the model type ({type(err).__name__}: {err})") from None
