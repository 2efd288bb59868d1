"""LLaVA-1.5 (llava-hf ``LlavaForConditionalGeneration``): one CLIP crop per image.

Rule (the paper's, and the authors' ``visionzip/clip_encoder.py``, which replaces CLIP's attention
forward to return the CLS attention and keys of layer -2): the CLIP tower runs up to the feature
layer (``vision_feature_layer``, -2); the CLS row of that layer's attention, summed over heads,
ranks the patches; ``dominant`` tokens (CLS + the top ``dominant - 1`` patches) and ``contextual``
merged tokens (head-averaged keys, uniform-stride targets) replace the 576 patch tokens, in that
order, before the projector. CLS is kept, as the authors do (``select_feature = 'cls_patch'``), so
the stock "default" strategy (CLS dropped) does not apply to compressed features.

The capture here uses forward hooks on the instance's own q/k projections under SDPA
(:mod:`visionzip_core.capture`), not a global replacement of ``CLIPAttention.forward``.
"""

from __future__ import annotations

import copy
import re
import types
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaProcessor,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

from visionzip_core.algorithm import TokenSelection, compress_selected, select_visionzip_tokens
from visionzip_core.capture import (
    FeatureLayerCapture,
    capture_feature_layer,
    check_vision_tower,
    resolve_feature_layer,
)
from visionzip_core.config import VisionZipConfig
from visionzip_core.families.base import LORA_TARGETS, ImageTokenSelection, ModelFamily
from visionzip_core.families.clip_llama import (
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    LLAVA_VOCAB,
    SIZES,
    BenchSize,
    VisionTowerShape,
    llava_step_flops,
    llava_token_ids,
    patches_per_image,
    synthetic_batch,
    synthetic_items,
    vision_tower_config,
)
from visionzip_core.families.flops import LlamaShape
from visionzip_core.tokenizer_files import save_pretrained_faithfully
from visionzip_core.weight_checks import load_checked, progress_bars_on_terminal_only

PROJECTOR = "multi_modal_projector"
STAGE1_FEATURE_LAYER = -2  # LLaVA-1.5 reads the penultimate CLIP layer
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
        f"visionzip: the llava-1.5 family takes LlavaForConditionalGeneration or LlavaModel (optionally "
        f"wrapped by peft); got {type(model).__name__}"
    )


def capture_and_select(
    tower: nn.Module, pixel_values: torch.Tensor, vz: VisionZipConfig, interpolate_pos_encoding: bool = False
) -> tuple[FeatureLayerCapture, TokenSelection]:
    """The tower through the feature layer, and VisionZip's choice of tokens there: the one path
    that both the adapted forward and :meth:`Llava15.select_image_tokens` take."""
    captured = capture_feature_layer(
        tower, pixel_values, vz.feature_layer, interpolate_pos_encoding=interpolate_pos_encoding
    )
    return captured, select_visionzip_tokens(captured.cls_attention, captured.keys, vz)


def active_settings(inner: nn.Module, family: str) -> VisionZipConfig:
    """The settings VisionZip was applied with, or ``ValueError`` when it is not applied."""
    vz = getattr(inner, _ACTIVE, None)
    if vz is None:
        raise ValueError(
            f"{family}: VisionZip is not applied to this model; call visionzip(model, ...) first"
        )
    return vz


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
    captured, selection = capture_and_select(
        self.vision_tower,
        pixel_values,
        config,
        interpolate_pos_encoding=bool(kwargs.get("interpolate_pos_encoding", False)),
    )
    compressed = compress_selected(captured.hidden, selection, config.merge)
    image_features = self.multi_modal_projector(compressed)
    output = BaseModelOutputWithPooling(last_hidden_state=captured.hidden, pooler_output=list(image_features))
    return output if return_dict else output.to_tuple()


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


def _forward_with_vision_in_graph(self, input_ids=None, pixel_values=None, *args, **kwargs):
    """``LlavaModel.forward``; a batch without images also runs the vision path on one blank image
    and adds ``0 x`` its features to the input embeddings, so the tower and projector take part
    at the same place in the graph as they do for image batches."""
    if pixel_values is None and kwargs.get("mm_encoder_outputs") is None and input_ids is not None:
        embed = self.get_input_embeddings()
        # Embeddings, tower, then the LLM, in the stock forward's order: ZeRO-3 gathers parameters
        # in call order, and ZeRO-2 reduces gradient buckets in the order backward produces them
        # (reversed creation order), so any other order is a collective mismatch between ranks.
        inputs_embeds = embed(input_ids)
        blank = self._visionzip_blank_image(input_ids.device)
        features = self.get_image_features(**blank, return_dict=True).pooler_output
        anchor = torch.stack([f.sum() for f in features]).sum().to(inputs_embeds.dtype) * 0.0
        kwargs["inputs_embeds"] = inputs_embeds + anchor
        input_ids = None
    return type(self).forward(self, input_ids, pixel_values, *args, **kwargs)


def _blank_image(self, device: torch.device) -> dict[str, torch.Tensor]:
    """One blank crop, as ``get_image_features`` keyword arguments."""
    vision = self.config.vision_config
    side = vision.image_size
    dtype = self.vision_tower.dtype
    return {"pixel_values": torch.zeros(1, vision.num_channels, side, side, dtype=dtype, device=device)}


class Llava15(ModelFamily):
    name = "llava-1.5"
    model_classes = ("LlavaForConditionalGeneration", "LlavaModel")
    processor_classes = ("LlavaProcessor",)
    model_types = ("llava",)
    lora_targets = LORA_TARGETS  # a Llama/Vicuna decoder layer's linears
    assembles = True
    bench_sizes = SIZES  # the CLIP + Llama sizes (families/clip_llama.py), shared with LLaVA-NeXT
    # Visual tokens per image -> (dominant, contextual); 576 is the stock model (compression off).
    bench_budgets = {576: None, 192: (162, 30), 128: (108, 20), 64: (54, 10)}
    simulation = {
        "size": "llava-1.5-7b",
        "micro_batch": 16,
        "batch_source": "16 per GPU: LLaVA scripts/v1_5/finetune.sh (16 x 8 GPUs = 128, zero3, gradient "
        "checkpointing, bf16)",
        "modes": ("finetune", "lora"),
        "calibrate": (576, 64),
    }

    # --- benchmarks ------------------------------------------------------------------------------
    def bench_config(self, size: BenchSize, tokenizer: Any) -> Any:
        """llava-hf's token ids (``<image>`` 32000, ``<pad>`` 32001 in a 32064 vocabulary; the same
        layout in a smaller one, :func:`llava_token_ids`) whatever the tokenizer: the benchmarks'
        batches are laid out in them."""
        image_token_id, pad_token_id = llava_token_ids(size.llm.vocab)
        text = size.llm.to_config(
            pad_token_id=pad_token_id, bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID
        )
        return self.build_config(size.vision.to_config(), text, image_token_id)

    def bench_processor(self, model: nn.Module, size: BenchSize, tokenizer: Any):
        """The family's processor built from parts: its image processor for the tower's crops and
        ``tokenizer``; the model's special ids are pointed at the tokenizer's (its embedding covers them)."""
        tokenizer.model_max_length = 8192  # prompts carry up to 576 (LLaVA-NeXT: 2928) image tokens
        image_processor = self.image_processor_for(model.config, size.vision.image_size)
        processor = self.build_processor(
            image_processor, tokenizer, model.config.vision_config, chat_template=tokenizer.chat_template
        )
        model.config.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            setattr(model.generation_config, key, getattr(tokenizer, key))
        return processor

    def bench_batch(self, size: BenchSize, config: Any, plan: Any, device="cpu", seed: int = 0):
        return synthetic_batch(size, plan.llm, device, seed=seed, image_hw=self.bench_image, crops=plan.crops)

    def bench_items(self, size: BenchSize, text_lengths: list[int], image_tokens: int, seed: int = 0):
        return synthetic_items(
            text_lengths,
            image_tokens,
            size.vision.image_size,
            getattr(torch, size.dtype),
            seed=seed,
            vocab=size.llm.vocab,
        )

    def step_flops(
        self, size: BenchSize, config: Any, parts, plan, split, *, samples, seq_len, logits_positions=None
    ):
        """:func:`~visionzip_core.families.clip_llama.llava_step_flops` of ``size``'s shapes, which must
        be ``config``'s (the model measured)."""
        text = LlamaShape.from_config(config.text_config)
        if VisionTowerShape.from_config(config.vision_config) != size.vision or text != replace(
            size.llm, head_dim=text.head_dim
        ):
            raise RuntimeError(f"{self.name}: the model's shapes differ from the FLOP model's ({size.name})")
        return llava_step_flops(
            size.vision,
            size.llm,
            parts,
            num_images=samples,
            batch=samples,
            seq_len=seq_len,
            image_tokens=plan.llm,
            visionzip_split=split,
            logits_positions=logits_positions,
            crops_per_image=plan.crops,
            projector_tokens_per_image=plan.projected,
        )

    def bench_size_from_config(self, config: Any, name: str) -> tuple[BenchSize, dict]:
        vision = VisionTowerShape.from_config(config.vision_config)
        llm = LlamaShape.from_config(config.text_config)
        # The simulation's batches use llava-hf's token ids (<image> 32000, <pad> 32001); a smaller
        # vocabulary (tiny test models) is simulated at LLaVA's 32064, which overstates its logits.
        llm = replace(llm, vocab=max(llm.vocab, LLAVA_VOCAB))
        size = BenchSize(name, vision, llm, batch_size=1, text_tokens=(0, 0), dtype="bfloat16", note=name)
        # Stock = every patch (per crop for LLaVA-NeXT); the family's table where the tower matches it.
        stock = vision.num_patches
        known = self.bench_budgets
        table = (
            dict(known) if next(k for k, split in known.items() if split is None) == stock else {stock: None}
        )
        return size, table

    # --- loading ---------------------------------------------------------------------------------
    def load(self, path: str, check_files: bool = True, **from_pretrained_kwargs: Any) -> nn.Module:
        return load_checked(LlavaForConditionalGeneration, path, check_files, **from_pretrained_kwargs)

    def load_processor(self, path: str, **kwargs: Any):
        return LlavaProcessor.from_pretrained(path, **kwargs)

    def config_from_dict(self, data: dict) -> Any:
        from transformers import LlavaConfig

        return LlavaConfig.from_dict(data)

    # --- building from parts (stage 1, tiny test models, benchmarks) ------------------------------
    def build_config(
        self, vision_config: Any, text_config: Any, image_token_id: int, tie_word_embeddings=False
    ):
        """A ``LlavaConfig`` with LLaVA-1.5's settings: feature layer -2, CLS dropped ("default"),
        a 2-layer GELU projector. ``vision_config`` and ``text_config`` are configs (not dicts)."""
        from transformers import LlavaConfig

        return LlavaConfig(
            vision_config=vision_config.to_dict(),
            text_config=text_config.to_dict(),
            image_token_id=image_token_id,
            projector_hidden_act="gelu",
            vision_feature_layer=STAGE1_FEATURE_LAYER,
            vision_feature_select_strategy="default",
            image_seq_length=patches_per_image(vision_config),
            tie_word_embeddings=tie_word_embeddings,
        )

    def random_model(self, config: Any, dtype: torch.dtype | None = None) -> nn.Module:
        """Random weights for ``config`` (on the current default device)."""
        if dtype is None:
            return LlavaForConditionalGeneration(config)
        return LlavaForConditionalGeneration._from_config(config, dtype=dtype)

    def build_processor(
        self, image_processor, tokenizer, vision_config: Any, chat_template: str | None = None
    ):
        """A ``LlavaProcessor`` over ``image_processor`` and ``tokenizer`` for a CLIP tower."""
        return LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=vision_tower_config(vision_config).patch_size,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=chat_template,
        )

    def assemble_processor(
        self,
        vision_path: str,
        llm_path: str,
        trust_remote_code: bool,
        vision_config: Any = None,
        llm_config: Any = None,
    ):
        """A ``LlavaProcessor`` from the LLM's tokenizer and the CLIP folder's image processor
        (``vision_config``/``llm_config``: the folders' configs when the caller has read them)."""
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            llm_path, trust_remote_code=trust_remote_code, config=llm_config
        )
        image_processor = AutoImageProcessor.from_pretrained(vision_path, trust_remote_code=trust_remote_code)
        if self.image_token not in tokenizer.get_vocab():
            tokenizer.add_tokens([self.image_token], special_tokens=True)
        if tokenizer.pad_token is None:
            # LLaVA-1.5 pads vicuna with <unk>; padded positions carry label -100 either way.
            tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
        vcfg = vision_config or AutoConfig.from_pretrained(vision_path, trust_remote_code=trust_remote_code)
        return self.build_processor(
            image_processor, tokenizer, vcfg, getattr(tokenizer, "chat_template", None)
        )

    def assemble(
        self, vision_path: str, llm_path: str, processor, from_pretrained_kwargs: dict, llm_config: Any = None
    ) -> nn.Module:
        """LLaVA-1.5 from a CLIP vision folder and a causal-LM folder, with a freshly initialised projector.

        The loaded towers are placed into the LLaVA skeleton as they are (no copy), and the skeleton
        itself is built on the meta device so that a 7B model is never allocated twice.
        """
        from transformers import AutoModelForCausalLM, CLIPVisionModel
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        kwargs = from_pretrained_kwargs
        tokenizer = processor.tokenizer
        with progress_bars_on_terminal_only():
            vision = CLIPVisionModel.from_pretrained(vision_path, **kwargs)
            llm_kwargs = kwargs if llm_config is None else {**kwargs, "config": copy.deepcopy(llm_config)}
            llm = AutoModelForCausalLM.from_pretrained(llm_path, **llm_kwargs)
        if len(tokenizer) > llm.get_input_embeddings().weight.shape[0]:
            llm.resize_token_embeddings(len(tokenizer))
        config = self.build_config(
            vision.config,
            llm.config,
            tokenizer.convert_tokens_to_ids(self.image_token),
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

    # --- visual tokens ---------------------------------------------------------------------------
    def tower_tokens(self, config: Any) -> int:
        return patches_per_image(vision_tower_config(config)) + 1  # patches + CLS

    def assembled_image_tokens(self, vision_config: Any) -> int:
        # The assembled model drops CLS ("default" strategy): one token per patch.
        return patches_per_image(vision_tower_config(vision_config))

    def stock_tokens_per_image(self, config: Any, image_size: tuple[int, int] | None = None) -> int:
        # Every image is resized and cropped to one square crop: the count does not depend on its size.
        strategy = getattr(config, "vision_feature_select_strategy", "default")
        patches = patches_per_image(config.vision_config)
        return patches if strategy == "default" else patches + 1

    def compressed_tokens_per_image(
        self, config: Any, vz: VisionZipConfig, image_size: tuple[int, int] | None = None
    ) -> int:
        return vz.tokens_per_image

    def feature_layer(self, config: Any) -> int:
        # A bare CLIP folder (stage 1) has no such key: the assembled model reads layer -2.
        return getattr(config, "vision_feature_layer", STAGE1_FEATURE_LAYER)

    def vision_layers(self, config: Any) -> int:
        return vision_tower_config(config).num_hidden_layers

    # --- instance adaptation ---------------------------------------------------------------------
    def check_supported(self, model: nn.Module) -> None:
        find_llava_model(model)

    def _check_model(self, llava: LlavaModel, config: VisionZipConfig) -> None:
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
        config.check_fits(self.tower_tokens(cfg))

    def apply(self, model: nn.Module, vz: VisionZipConfig) -> None:
        llava = find_llava_model(model)
        self._check_model(llava, vz)
        setattr(llava, _ACTIVE, vz)
        llava.get_image_features = types.MethodType(_visionzip_get_image_features, llava)

    def select_image_tokens(
        self, model: nn.Module, pixel_values: torch.Tensor, image_sizes: Any = None
    ) -> list[ImageTokenSelection]:
        llava = find_llava_model(model)
        vz = active_settings(llava, self.name)
        _, selection = capture_and_select(llava.vision_tower, pixel_values, vz)
        side = llava.config.vision_config.image_size // llava.config.vision_config.patch_size
        return [
            ImageTokenSelection(pixel_values[i : i + 1], selection.rows(i, i + 1), (0, 0), side)
            for i in range(pixel_values.shape[0])
        ]

    def remove(self, model: nn.Module) -> None:
        llava = find_llava_model(model)
        llava.__dict__.pop("get_image_features", None)
        llava.__dict__.pop(_ACTIVE, None)

    def configs(self, model: nn.Module) -> list[Any]:
        """The config objects that must record the settings (the inner model's and the wrapper's)."""
        llava = find_llava_model(model)
        return list({id(c): c for c in (llava.config, getattr(model, "config", llava.config))}.values())

    def adapt_processor(self, processor, vz: VisionZipConfig | None, config: Any = None):
        if not isinstance(processor, LlavaProcessor):
            raise ValueError(
                f"visionzip_processor: the llava-1.5 family takes LlavaProcessor; got {type(processor).__name__}"
            )
        processor._visionzip_tokens = (
            vz.tokens_per_image if vz is not None else self.stock_tokens_per_image(config)
        )
        processor.replace_image_token = types.MethodType(_visionzip_replace_image_token, processor)
        processor._get_num_multimodal_tokens = types.MethodType(_visionzip_num_multimodal_tokens, processor)
        return processor

    def keep_vision_in_graph(self, model: nn.Module) -> None:
        """Make text-only batches run the same collectives as image batches (adapts the instance).

        With several processes, one rank can draw a text-only micro-batch while another draws images.
        Without this, the tower and projector then take part in one rank's forward/backward only:
        ZeRO-2 reduces the projector's gradients on one rank alone and ZeRO-3 gathers the tower's
        parameters on one rank alone, and gloo/NCCL abort on the mismatched collective. As LLaVA does
        (its text-only samples carry a blank image whose features are sliced to nothing), the vision
        path runs on one blank image and joins the input embeddings times zero: the gradients it adds
        are exactly zero, every rank calls the same modules in the same order, and the loss always has
        a gradient (projector and pretrain modes on a text-only batch). The cost is one image through
        the tower per text-only micro-batch. Agreeing on modality across ranks in the sampler would
        keep the collectives aligned too, but it ties the data order to the process count and still
        leaves a projector-only loss without a gradient.
        """
        llava = find_llava_model(model)
        llava._visionzip_blank_image = types.MethodType(_blank_image, llava)
        llava.forward = types.MethodType(_forward_with_vision_in_graph, llava)

    # --- training --------------------------------------------------------------------------------
    def module_group(self, param_name: str) -> str:
        if PROJECTOR in param_name:
            return "projector"
        if "vision_tower" in param_name:
            return "vision"
        return "llm"

    def unused_vision_params(self, model: nn.Module) -> set[str]:
        """Names of vision-tower parameters that never influence the features the LLM sees.

        The features are read at ``vision_feature_layer`` (-2 in LLaVA-1.5), so later encoder layers
        and ``post_layernorm`` get no gradient (with VisionZip they are not even run). Left trainable
        they would only hold optimizer state and weight-decay drift.
        """
        config = model.config
        layer = config.vision_feature_layer
        num_layers = config.vision_config.num_hidden_layers
        if not isinstance(layer, int):  # several feature layers: keep every layer up to the deepest
            layer = max(i if i >= 0 else num_layers + 1 + i for i in layer)
        # hidden_states[i] is the output of encoder layer i - 1.
        last_used = (layer if layer >= 0 else num_layers + 1 + layer) - 1
        after = re.compile(r"vision_tower\.(?:.*\.)?(?:encoder\.layers\.(\d+)\.|post_layernorm\.)")
        unused = set()
        for name, _ in model.named_parameters():
            match = after.search(name)
            if match and (match.group(1) is None or int(match.group(1)) > last_used):
                unused.add(name)
        return unused

    def lora_target_regex(self, targets: tuple[str, ...]) -> str:
        # A regex (not a list): CLIP's attention also has q_proj/k_proj/v_proj.
        names = "|".join(re.escape(t) for t in targets)
        return rf".*language_model.*\.({names})"

    def projector_modules(self) -> list[str]:
        return [PROJECTOR]

    # --- tiny models (tests, demos) ----------------------------------------------------------------
    def image_processor_for(self, config: Any, side: int):
        return clip_image_processor(side)

    def tiny_model(
        self,
        tokenizer: Any,
        seed: int = 0,
        image_size: int = 112,
        patch_size: int = 14,
        vision_layers: int = 3,
    ) -> tuple[nn.Module, Any]:
        """A random tiny model with this family's settings (:func:`tiny_vision_config`,
        :func:`tiny_text_config`) and its processor, speaking ``tokenizer``."""
        vcfg = tiny_vision_config(image_size, patch_size, vision_layers)
        text = tiny_text_config(len(tokenizer))
        text.pad_token_id, text.bos_token_id, text.eos_token_id = (
            tokenizer.pad_token_id,
            tokenizer.bos_token_id,
            tokenizer.eos_token_id,
        )
        config = self.build_config(vcfg, text, tokenizer.convert_tokens_to_ids(self.image_token))
        torch.manual_seed(seed)
        model = self.random_model(config).eval()
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.bos_token_id = tokenizer.bos_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        image_processor = self.image_processor_for(config, image_size)
        processor = self.build_processor(
            image_processor, tokenizer, vcfg, chat_template=tokenizer.chat_template
        )
        return model, processor

    def write_tiny_parts(
        self, tokenizer: Any, out_dir, seed: int = 0, image_size: int = 112, patch_size: int = 14
    ) -> tuple[Path, Path]:
        """``clip/`` and ``llm/`` under ``out_dir``, shaped like ``openai/clip-vit-large-patch14-336``
        and ``lmsys/vicuna-7b-v1.5``: stage 1's inputs."""
        out = Path(out_dir)
        clip_dir, llm_dir = out / "clip", out / "llm"
        torch.manual_seed(seed)
        clip = CLIPVisionModel(tiny_vision_config(image_size, patch_size))
        clip.save_pretrained(clip_dir)
        clip_image_processor(image_size).save_pretrained(clip_dir)
        text_cfg = tiny_text_config(len(tokenizer))
        text_cfg.pad_token_id = tokenizer.pad_token_id
        text_cfg.bos_token_id = tokenizer.bos_token_id
        text_cfg.eos_token_id = tokenizer.eos_token_id
        llm = LlamaForCausalLM(text_cfg)
        llm.save_pretrained(llm_dir)
        save_pretrained_faithfully(tokenizer, llm_dir)
        return clip_dir, llm_dir


# --- tiny parts ------------------------------------------------------------------------------------
# Tiny shapes (defaults): a CLIP tower with 112 px images and 14 px patches, so 8x8 = 64 patches plus
# CLS (65 tokens, like 576 + 1 at 336 px); 3 vision layers so that the feature layer -2 is a middle
# layer; a 2-layer Llama with hidden size 64.
def tiny_vision_config(image_size: int = 112, patch_size: int = 14, num_layers: int = 3) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )


def tiny_text_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )


def clip_image_processor(image_size: int) -> CLIPImageProcessorPil:
    """CLIP preprocessing (resize shortest edge, centre crop, CLIP mean/std) on PIL and numpy."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
