"""Build the model a training mode needs: load or assemble LLaVA, compress, freeze, LoRA, param groups.

Modes:
  - ``projector``: a trained LLaVA; only ``multi_modal_projector`` trains (VisionZip efficient tuning).
  - ``pretrain``: LLaVA assembled from a CLIP vision folder and a causal-LM folder with a fresh
    projector; only the projector trains (stage 1).
  - ``finetune``: projector + LLM train; the vision tower too with ``train.tune_vision_tower``.
  - ``lora``: LoRA adapters on the LLM's linear layers (never CLIP's, which share the names
    ``q_proj``/``v_proj``: the target is a regex anchored on ``language_model``) and the projector in full.
"""

from __future__ import annotations

import re
import types
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from visionzip_core.training.settings import ConfigError, Settings
from visionzip_core.weight_checks import check_loading_info

IMAGE_TOKEN = "<image>"
PROJECTOR = "multi_modal_projector"
MODULE_GROUPS = ("projector", "vision", "llm")


def resolve_precision(precision: str) -> str:
    """ "auto" -> bf16 on a GPU that has it, else fp32 (CPU bf16 works but is slower than fp32 here)."""
    if precision != "auto":
        return precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def torch_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def model_path(name: str, key: str) -> str:
    """Local folder for ``name`` (``builtin:*`` test models are built on first use); clear error if missing."""
    from visionzip_core.checkpoints import resolve_model_path

    path = Path(resolve_model_path(name))
    if not path.is_dir():
        raise FileNotFoundError(
            f"{key}: no such model folder {path} (edit the config or override {key}=/path)"
        )
    return str(path)


@dataclass
class BuiltModel:
    model: nn.Module
    image_tokens_per_image: int


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_processor(settings: Settings):
    """``(processor, image tokens per image)`` without loading any weights.

    The processor expands ``<image>`` to the compressed count when VisionZip is on. In pretrain
    mode it is assembled from the LLM's tokenizer (``<image>`` and a pad token added when missing)
    and the CLIP folder's image processor.
    """
    from transformers import AutoConfig, AutoProcessor

    from visionzip_core import num_image_tokens
    from visionzip_core.llava import visionzip_processor

    m, vz = settings.model, settings.visionzip
    trust = m.trust_remote_code
    if settings.train.mode == "pretrain":
        processor = assemble_processor(
            model_path(m.vision_tower, "model.vision_tower"),
            model_path(m.language_model, "model.language_model"),
            trust,
        )
        vcfg = vision_tower_config(
            AutoConfig.from_pretrained(
                model_path(m.vision_tower, "model.vision_tower"), trust_remote_code=trust
            )
        )
        stock = (vcfg.image_size // vcfg.patch_size) ** 2
    else:
        path = model_path(m.name_or_path, "model.name_or_path")
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust)
        stock = num_image_tokens(AutoConfig.from_pretrained(path, trust_remote_code=trust))
    config = vz.core()
    if config is None:
        return processor, stock
    try:
        config.check_fits(stock + 1)  # the CLIP tower's tokens: patches + CLS
    except ValueError as err:
        source = m.vision_tower if settings.train.mode == "pretrain" else m.name_or_path
        raise ConfigError(f"the config, for the vision tower of {source}", [str(err)]) from None
    return visionzip_processor(processor, config), config.tokens_per_image


def llm_hidden_size(settings: Settings) -> int:
    """The LLM's hidden size, read from config files only (no weights): sizes ZeRO's buffers."""
    from transformers import AutoConfig

    m = settings.model
    if settings.train.mode == "pretrain":
        path = model_path(m.language_model, "model.language_model")
        return AutoConfig.from_pretrained(path, trust_remote_code=m.trust_remote_code).hidden_size
    path = model_path(m.name_or_path, "model.name_or_path")
    return AutoConfig.from_pretrained(path, trust_remote_code=m.trust_remote_code).text_config.hidden_size


def build_model(settings: Settings, dtype: torch.dtype, processor, for_export: bool = False) -> BuiltModel:
    """Load or assemble the model for ``settings.train.mode``, compressed, frozen and (lora) wrapped.

    ``for_export`` builds the same structure without training switches (used under ZeRO-3 to
    receive gathered weights on rank 0).
    """
    from transformers import LlavaForConditionalGeneration

    from visionzip_core import num_image_tokens, visionzip

    m = settings.model
    kwargs = {"dtype": dtype, "trust_remote_code": m.trust_remote_code}
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    if settings.train.mode == "pretrain":
        model = assemble_llava(
            model_path(m.vision_tower, "model.vision_tower"),
            model_path(m.language_model, "model.language_model"),
            processor,
            kwargs,
        )
    else:
        path = model_path(m.name_or_path, "model.name_or_path")
        if not for_export:  # export builds on rank 0 alone: no collective there; the files were checked
            check_weight_files(path)
        model, info = LlavaForConditionalGeneration.from_pretrained(
            path, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
        )  # mismatched shapes are refused below, naming the tensor
        check_loading_info(info, path)
    if settings.visionzip.enabled:
        visionzip(model, config=settings.visionzip.core())
    model.config.use_cache = False
    set_trainable(model, settings)
    if not for_export:
        keep_vision_in_graph(model)
    if settings.train.gradient_checkpointing and not for_export:
        # Non-reentrant: works with frozen inputs (projector/LoRA modes) without enable_input_require_grads.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if settings.train.mode == "lora":
        model = wrap_lora(model, settings)
    return BuiltModel(model=model, image_tokens_per_image=num_image_tokens(model.config))


def check_weight_files(path: str) -> None:
    """Refuse unreadable or non-finite safetensors in ``path`` before they load.

    Rank 0 streams the files once and every rank raises the same :class:`WeightsError`, so a bad
    file stops all processes together instead of leaving some waiting in a collective.
    """
    from visionzip_core.training import distributed as dist
    from visionzip_core.weight_checks import WeightsError, check_model_files

    problem = None
    if dist.is_main():
        try:
            check_model_files(path)
        except WeightsError as err:
            problem = str(err)
    problem = dist.broadcast_object(problem)
    if problem is not None:
        raise WeightsError(problem)


def _forward_with_vision_in_graph(self, input_ids=None, pixel_values=None, *args, **kwargs):
    """``LlavaModel.forward``; a batch without images also runs the vision path on one blank image
    and adds ``0 x`` its features to the input embeddings, so the tower and projector take part
    at the same place in the graph as they do for image batches."""
    if pixel_values is None and kwargs.get("mm_encoder_outputs") is None and input_ids is not None:
        vision = self.config.vision_config
        embed = self.get_input_embeddings()
        blank = torch.zeros(
            1,
            vision.num_channels,
            vision.image_size,
            vision.image_size,
            dtype=self.vision_tower.dtype,
            device=input_ids.device,
        )
        # Embeddings, tower, then the LLM, in the stock forward's order: ZeRO-3 gathers parameters
        # in call order, and ZeRO-2 reduces gradient buckets in the order backward produces them
        # (reversed creation order), so any other order is a collective mismatch between ranks.
        inputs_embeds = embed(input_ids)
        features = self.get_image_features(pixel_values=blank, return_dict=True).pooler_output
        anchor = torch.stack([f.sum() for f in features]).sum().to(inputs_embeds.dtype) * 0.0
        kwargs["inputs_embeds"] = inputs_embeds + anchor
        input_ids = None
    return type(self).forward(self, input_ids, pixel_values, *args, **kwargs)


def keep_vision_in_graph(model: nn.Module) -> None:
    """Make text-only batches run the same collectives as image batches (adapts the instance).

    With several processes, one rank can draw a text-only micro-batch while another draws images.
    Without this, the tower and projector then take part in one rank's forward/backward only:
    ZeRO-2 reduces the projector's gradients on one rank alone and ZeRO-3 gathers the tower's
    parameters on one rank alone, and gloo/NCCL abort on the mismatched collective. As LLaVA does
    (its text-only samples carry a blank image whose features are sliced to nothing), the vision
    path runs on one blank image and joins the input embeddings times zero: the gradients it adds are exactly
    zero, every rank calls the same modules in the same order, and the loss always has a gradient
    (projector and pretrain modes on a text-only batch). The cost is one image through the tower
    per text-only micro-batch. Agreeing on modality across ranks in the sampler would keep the
    collectives aligned too, but it ties the data order to the process count and still leaves a
    projector-only loss without a gradient.
    """
    from visionzip_core.llava import find_llava_model

    llava = find_llava_model(model)
    llava.forward = types.MethodType(_forward_with_vision_in_graph, llava)


def vision_tower_config(config):
    """The vision fields of a CLIP folder's config.

    A full ``CLIPModel`` download (e.g. openai/clip-vit-large-patch14-336, ``model_type: clip``)
    keeps them in ``.vision_config``; a ``CLIPVisionModel`` folder has them at the top level.
    """
    return getattr(config, "vision_config", None) or config


def assemble_processor(vision_path: str, llm_path: str, trust_remote_code: bool):
    """A ``LlavaProcessor`` from the LLM's tokenizer and the CLIP folder's image processor."""
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, LlavaProcessor

    tokenizer = AutoTokenizer.from_pretrained(llm_path, trust_remote_code=trust_remote_code)
    image_processor = AutoImageProcessor.from_pretrained(vision_path, trust_remote_code=trust_remote_code)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if tokenizer.pad_token is None:
        # LLaVA-1.5 pads vicuna with <unk>; padded positions carry label -100 either way.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    vcfg = vision_tower_config(AutoConfig.from_pretrained(vision_path, trust_remote_code=trust_remote_code))
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vcfg.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=getattr(tokenizer, "chat_template", None),
    )


def assemble_llava(vision_path: str, llm_path: str, processor, kwargs: dict):
    """LLaVA-1.5 from a CLIP vision folder and a causal-LM folder, with a freshly initialised projector.

    The loaded towers are placed into the LLaVA skeleton as they are (no copy), and the skeleton
    itself is built on the meta device so that a 7B model is never allocated twice.
    """
    from transformers import AutoModelForCausalLM, CLIPVisionModel, LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    tokenizer = processor.tokenizer
    vision = CLIPVisionModel.from_pretrained(vision_path, **kwargs)
    llm = AutoModelForCausalLM.from_pretrained(llm_path, **kwargs)
    if len(tokenizer) > llm.get_input_embeddings().weight.shape[0]:
        llm.resize_token_embeddings(len(tokenizer))
    vcfg = vision.config
    config = LlavaConfig(
        vision_config=vcfg.to_dict(),
        text_config=llm.config.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(vcfg.image_size // vcfg.patch_size) ** 2,
        tie_word_embeddings=bool(getattr(llm.config, "tie_word_embeddings", False)),
    )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = vision
    model.model.language_model = llm.model
    model.lm_head = llm.lm_head
    model.model.multi_modal_projector = LlavaMultiModalProjector(config).to(vision.dtype)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.language_model.get_input_embeddings().weight
    meta = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.device.type == "meta"]
    if meta:
        raise RuntimeError(f"pretrain assembly left uninitialised tensors: {meta[:5]}")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def module_group(param_name: str) -> str:
    """Which learning-rate group a parameter belongs to: projector, vision or llm."""
    if PROJECTOR in param_name:
        return "projector"
    if "vision_tower" in param_name:
        return "vision"
    return "llm"


def vision_params_after_feature_layer(model: nn.Module) -> set[str]:
    """Names of vision-tower parameters that never influence the features the LLM sees.

    The features are read at ``vision_feature_layer`` (-2 in LLaVA-1.5), so later encoder layers
    and ``post_layernorm`` get no gradient (with VisionZip they are not even run). Left trainable
    they would only hold optimizer state and weight-decay drift.
    """
    config = model.config
    layer = config.vision_feature_layer
    if not isinstance(layer, int):  # several feature layers: keep every layer up to the deepest
        layer = max(i if i >= 0 else config.vision_config.num_hidden_layers + 1 + i for i in layer)
    num_layers = config.vision_config.num_hidden_layers
    # hidden_states[i] is the output of encoder layer i - 1.
    last_used = (layer if layer >= 0 else num_layers + 1 + layer) - 1
    after = re.compile(r"vision_tower\.(?:.*\.)?(?:encoder\.layers\.(\d+)\.|post_layernorm\.)")
    unused = set()
    for name, _ in model.named_parameters():
        match = after.search(name)
        if match and (match.group(1) is None or int(match.group(1)) > last_used):
            unused.add(name)
    return unused


def set_trainable(model: nn.Module, settings: Settings) -> None:
    mode = settings.train.mode
    unused = vision_params_after_feature_layer(model) if settings.train.tune_vision_tower else set()
    for name, p in model.named_parameters():
        group = module_group(name)
        if mode in ("projector", "pretrain", "lora"):
            p.requires_grad_(group == "projector")
        else:  # finetune
            p.requires_grad_(group != "vision" or (settings.train.tune_vision_tower and name not in unused))


def wrap_lora(model: nn.Module, settings: Settings) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = settings.lora_or_default
    names = "|".join(re.escape(t) for t in lora.target_modules)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        # A regex (not a list): CLIP's attention also has q_proj/k_proj/v_proj.
        target_modules=rf".*language_model.*\.({names})",
        # The projector trains in full and travels inside the adapter.
        modules_to_save=[PROJECTOR],
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def param_groups(model: nn.Module, settings: Settings) -> tuple[list[dict], list[str]]:
    """Optimizer groups with per-module learning rates; biases and norms get no weight decay.

    Returns ``(groups, names)``; ``names[i]`` labels group ``i`` in logs (``llm``, ``llm/no_decay``).
    """
    optim = settings.optim
    lrs = {"projector": optim.lr_projector, "vision": optim.lr_vision, "llm": optim.lr_llm}
    buckets: dict[str, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = optim.weight_decay > 0 and (p.ndim < 2 or "norm" in name.lower())
        key = module_group(name) + ("/no_decay" if no_decay else "")
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
