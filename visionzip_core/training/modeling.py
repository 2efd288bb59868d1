"""Build the model a training mode needs: load or assemble it, compress, freeze, LoRA, param groups.

Everything here takes the run's :class:`~visionzip_core.training.model_spec.ModelSpec` (resolved
once) and asks its family; nothing names a family.

Modes:
  - ``projector``: a trained model; only the projector trains (VisionZip efficient tuning).
  - ``pretrain``: the stage-1 family's model assembled from a vision folder and a causal-LM folder
    with a fresh projector; only the projector trains (stage 1).
  - ``finetune``: projector + LLM train; the vision tower too with ``train.tune_vision_tower``.
  - ``lora``: LoRA adapters on the LLM's linear layers (never CLIP's, which share the names
    ``q_proj``/``v_proj``: the target is a regex anchored on ``language_model``) and the projector in full.
"""

from __future__ import annotations

import torch
from torch import nn

from visionzip_core import visionzip, visionzip_processor
from visionzip_core.data.templates import tokenizer_of
from visionzip_core.families import ImageTokenCount, family_for, image_token_count, video_token_count
from visionzip_core.training import distributed as dist
from visionzip_core.training.library_warnings import peft_wrapping
from visionzip_core.training.model_spec import ModelSpec
from visionzip_core.training.schema import ConfigError, Settings
from visionzip_core.weight_checks import WeightsError, check_model_files

IMAGE_TOKEN = "<image>"


def resolve_precision(precision: str) -> str:
    """ "auto" -> bf16 on a GPU that has it, else fp32 (CPU bf16 works but is slower than fp32 here)."""
    if precision != "auto":
        return precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def torch_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_processor(settings: Settings, spec: ModelSpec):
    """``(processor, image-token count)`` without loading any weights.

    The count is an :class:`~visionzip_core.families.ImageTokenCount`: ``count((H, W))`` is the
    number of ids an image of that size expands to (the same for every size in some families). The
    processor expands the image placeholder to the compressed count when VisionZip is on. In pretrain
    mode it is assembled from the LLM's tokenizer (placeholder and a pad token added when missing)
    and the vision folder's image processor.
    """
    vz, family = settings.visionzip, spec.family
    if spec.assembled:
        processor = family.assemble_processor(
            spec.vision_path, spec.llm_path, spec.trust_remote_code, spec.config, spec.llm_config
        )
        model_config = None
        stock = ImageTokenCount.constant(family.assembled_image_tokens(spec.config))
    else:
        processor = family.load_processor(
            spec.path, trust_remote_code=spec.trust_remote_code, config=spec.model_config()
        )
        # A chat template kept on the processor (chat_template.json) reaches the tokenizer.
        tokenizer_of(processor)
        model_config = spec.config
        stock = image_token_count(model_config)
    config = vz.core(spec.feature_layer)
    if config is None:
        return processor, stock
    try:
        if not config.uses_ratios:  # a ratio split is checked per image, when each is counted
            config.check_fits(spec.tower_tokens)
    except ValueError as err:
        raise ConfigError(f"the config, for the vision tower of {spec.tower_source}", [str(err)]) from None
    count = (
        ImageTokenCount.constant(config.tokens_per_image)
        if model_config is None
        else image_token_count(model_config, config)
    )
    return visionzip_processor(processor, config), count


def video_tokens(settings: Settings, spec: ModelSpec):
    """``count((T, H, W))``, the ids one video becomes (compressed when VisionZip is on), or None when
    the model takes no video (:class:`visionzip_core.families.VideoTokenCount`). No weights."""
    if spec.assembled or not spec.family.takes_video:
        return None
    return video_token_count(spec.config, settings.visionzip.core(spec.feature_layer))


def dataset_inputs(settings: Settings, spec: ModelSpec, processor) -> dict:
    """What the data pipeline needs to know of the model family, as keyword arguments of
    :func:`visionzip_core.data.build_dataset` (the trainer and ``scripts/check_data.py`` both use
    it, so they count the same samples): its image placeholder, the sample formats it reads, how
    its processor lays out an image, its video processor, placeholder and count when it takes
    video, and ``images_only`` in the projector-only modes (a text-only batch would train nothing).
    No weights."""
    family = spec.family
    count = video_tokens(settings, spec)
    video_processor = processor.video_processor if count is not None else None
    out = {
        "image_token": family.image_token,
        "sample_formats": family.sample_formats,
        "image_layout": family.image_layout(processor.image_processor, video_processor),
        "images_only": settings.train.mode in ("projector", "pretrain"),
    }
    if count is not None:
        out |= {
            "video_processor": video_processor,
            "video_token": family.video_token,
            "video_tokens": count,
        }
    return out


def build_model(
    settings: Settings, spec: ModelSpec, dtype: torch.dtype, processor, for_export: bool = False
) -> nn.Module:
    """Load or assemble the model for ``settings.train.mode``, compressed, frozen and (lora) wrapped.

    ``for_export`` builds the same structure without training switches (used under ZeRO-3 to
    receive gathered weights on rank 0).
    """
    m, family = settings.model, spec.family
    kwargs = {"dtype": dtype, "trust_remote_code": spec.trust_remote_code}
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    if m.quantization != "none" and not for_export:
        kwargs |= quantization_kwargs(m.quantization, dtype, family)
    if spec.assembled:
        model = family.assemble(
            spec.vision_path, spec.llm_path, processor, kwargs, llm_config=spec.llm_config
        )
    else:
        if not for_export:  # export builds on rank 0 alone: no collective there; the files were checked
            check_weight_files(spec.path)
        # The files were checked above (rank 0, once); missing, unexpected or misshapen tensors are refused here.
        model = family.load(spec.path, check_files=False, config=spec.model_config(), **kwargs)
    if settings.visionzip.enabled:
        visionzip(model, config=settings.visionzip.core(spec.feature_layer))
    turn_off_kv_cache(model)
    set_trainable(model, settings)
    if not for_export:
        family.keep_vision_in_graph(model)
    if settings.train.gradient_checkpointing and not for_export:
        # Non-reentrant: works with frozen inputs (projector/LoRA modes) without enable_input_require_grads.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        drop_input_grad_hooks(model)  # now: a second registration (peft's) would orphan these
    if settings.train.mode == "lora":
        model = wrap_lora(model, settings)
        drop_input_grad_hooks(model)
    return model


def turn_off_kv_cache(model: nn.Module) -> None:
    """``use_cache = False`` on every config in the model, not only the top one.

    transformers does not pass the top config's ``use_cache`` down, and stage-1 assembly places a
    language model that keeps its own config object: a cache left on there is built in every
    training forward, and with a cache present transformers no longer reads packed samples'
    bounds from ``position_ids`` (samples of a packed row would attend to each other).
    """
    configs = [model.config, getattr(model.config, "text_config", None)]
    configs += [getattr(m, "config", None) for m in model.modules()]
    for config in configs:
        if config is not None and hasattr(config, "use_cache"):
            config.use_cache = False


QUANTIZATION_NAMES = {"nf4": "4-bit (NF4)", "fp4": "4-bit (FP4)", "int8": "8-bit (LLM.int8)"}


def quantization_kwargs(quantization: str, dtype: torch.dtype, family) -> dict:
    """``from_pretrained`` arguments loading the LLM's linear layers through bitsandbytes.

    Double quantization (the quantization constants quantized too, as in QLoRA); matmuls run in
    ``dtype``. Only the language model is quantized (:meth:`ModelFamily.unquantized_modules`).
    """
    from transformers import BitsAndBytesConfig

    skip = family.unquantized_modules()
    if quantization == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=skip,
        )
    kwargs = {"quantization_config": config}
    if torch.cuda.is_available():  # bitsandbytes quantizes as the weights reach this process's GPU
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    return kwargs


def drop_input_grad_hooks(model: nn.Module) -> None:
    """Remove the hooks that make every input embedding's output require grad.

    transformers (when checkpointing is switched on) and peft register them on every input
    embedding, the vision tower's patch embedding included, for reentrant checkpointing. With a
    frozen tower that makes backward run through all its layers for nothing (about half a GiB
    per GPU at 7B, and the tower's backward time). Non-reentrant checkpointing needs no such hook.
    """
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.disable_input_require_grads()


def check_weight_files(path: str) -> None:
    """Refuse unreadable or non-finite safetensors in ``path`` before they load.

    Rank 0 streams the files once and every rank raises the same :class:`WeightsError`, so a bad
    file stops all processes together instead of leaving some waiting in a collective.
    """
    problem = None
    if dist.is_main():
        try:
            check_model_files(path)
        except WeightsError as err:
            problem = str(err)
    problem = dist.broadcast_object(problem)
    if problem is not None:
        raise WeightsError(problem)


def set_trainable(model: nn.Module, settings: Settings) -> None:
    mode = settings.train.mode
    family = family_for(model)
    unused = family.unused_vision_params(model) if settings.train.tune_vision_tower else set()
    unused |= family.unused_params(model)
    for name, p in model.named_parameters():
        group = family.module_group(name)
        if name in unused:
            p.requires_grad_(False)
        elif mode in ("projector", "pretrain", "lora"):
            p.requires_grad_(group == "projector")
        else:  # finetune
            p.requires_grad_(group != "vision" or (settings.train.tune_vision_tower and name not in unused))


def wrap_lora(model: nn.Module, settings: Settings) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = settings.lora_or_default
    family = family_for(model)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=family.lora_target_regex(tuple(lora.target_modules)),  # the LLM's layers only
        # The projector trains in full and travels inside the adapter.
        modules_to_save=family.projector_modules(),
        task_type="CAUSAL_LM",
    )
    with peft_wrapping():
        return get_peft_model(model, config)


def param_groups(model: nn.Module, settings: Settings) -> tuple[list[dict], list[str]]:
    """Optimizer groups with per-module learning rates; biases and norms get no weight decay.

    Returns ``(groups, names)``; ``names[i]`` labels group ``i`` in logs (``llm``, ``llm/no_decay``).
    """
    optim = settings.optim
    lrs = {"projector": optim.lr_projector, "vision": optim.lr_vision, "llm": optim.lr_llm}
    buckets: dict[str, list[nn.Parameter]] = {}
    family = family_for(model)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Under ZeRO-3 a partitioned parameter is a 1-D shard (empty where loaded partitioned):
        # its real shape is ds_shape. Read p.ndim there and every weight would lose its decay.
        ndim = len(getattr(p, "ds_shape", p.shape))
        no_decay = optim.weight_decay > 0 and (ndim < 2 or "norm" in name.lower())
        key = family.module_group(name) + ("/no_decay" if no_decay else "")
        buckets.setdefault(key, []).append(p)
    if not buckets:
        raise ValueError(f"train.mode={settings.train.mode}: no parameter is trainable")
    groups, names = [], []
    for key in sorted(buckets):
        base = key.split("/")[0]
        wd = 0.0 if key.endswith("/no_decay") else optim.weight_decay
        groups.append({"params": buckets[key], "lr": lrs[base], "weight_decay": wd})
        names.append(key)
    return groups, names


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (ZeRO-3 aware: uses ``ds_numel`` when partitioned)."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
