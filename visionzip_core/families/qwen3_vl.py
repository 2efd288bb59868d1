"""Qwen3-VL (``Qwen3VLForConditionalGeneration``) and Qwen3.5 (``Qwen3_5ForConditionalGeneration``):
Qwen2.5-VL's native-resolution recipe with a new tower, DeepStack (Qwen3-VL) and a hybrid LLM (Qwen3.5).

What is the same as Qwen2.5-VL (:mod:`~visionzip_core.families.qwen2_5_vl`, whose adapter both reuse):

- **The rule.** The authors' Qwen2.5-VL release (VisionZip commit 68993a3,
  ``Qwen2_5_VL/qwen2_5vl_visionzip.py``) is their only rule for a tower without CLS: the attention
  each patch *receives* in the last vision block (post-RoPE q and k, L217-226 and L283-304), mean
  over heads, sum over queries, mean over each 2x2 merge unit (L604-615); dominant = top-k, the rest
  merged into uniform-stride targets (target + mean of members, L1915-1966), selection on the
  merger's outputs. Qwen3's tower (transformers ``modeling_qwen3_vl.py`` L663-718) attends in full in
  every block (no windows, so no window order to undo), so the same rule applies unchanged, per
  image and per frame group, with the budget as fractions of each image's merged tokens
  (defaults: the authors' 50 %, 0.45 + 0.05).
- **Placeholders and positions.** The processor emits each image's (each frame group's) compressed
  count of ``<|image_pad|>`` (``<|video_pad|>``); the kept tokens take the stock 3-D positions of the
  merged tokens they stand at (contextual tokens their target's), text keeps its stock positions.
  Qwen3's positions are *interleaved* M-RoPE, which only changes how the rotary embedding reads the
  same ``(t, h, w)`` table.

What is new:

- **DeepStack (Qwen3-VL).** After blocks ``deepstack_visual_indexes`` the tower runs extra mergers
  (``deepstack_merger_list``, modeling L648-657, L706-710) whose outputs, one row per merged token,
  are *added* to the LLM's hidden states at the visual positions after its first layers
  (``_deepstack_process`` L820-843, rows matched to positions in order). Compressing only the main
  features would add other patches' features at the kept positions (or fail on the row count). Here
  every level follows the main features' selection: dominant tokens take the same indices, and each
  contextual token merges the same members the same way. The merge (target + mean of members) is
  linear per channel, so the levels are concatenated to the main features along the channels, one
  selection and one merge run on the concatenation, and the result is split back
  (:func:`~visionzip_core.families.qwen2_5_vl.split_levels`).
- **Video runs per frame group.** Qwen3's processor writes ``<t seconds><|vision_start|>`` +
  ``<|video_pad|>`` x group tokens + ``<|vision_end|>`` per frame group (``processing_qwen3_vl.py``
  L75-103) and its positions treat each group as its own run starting at the run's position
  (``get_rope_index`` L947-996). So each group's run holds that group's compressed count, the
  timestamps stay as text, and the positions are computed per run.
- **Qwen3.5.** Qwen3-VL's tower without DeepStack, and a hybrid LLM (Gated DeltaNet linear attention
  in three layers of four, full attention in the fourth, ``modeling_qwen3_5.py`` L495-656, L742-815).
  VisionZip acts before the LLM; generation goes through the hybrid cache unchanged. Packing is
  refused: the linear-attention layers carry state along the whole row (the chunked delta rule and
  the causal conv1d get no per-sample boundaries from position ids, modeling L573-641).

What is refused, each in one line: a ratio out of range or an image too small for the budget
(:meth:`VisionZipConfig.split_for`), more placeholder runs than images or videos, a
``feature_layer`` other than the last block, and ``data.packing`` (Qwen3.5: its linear attention).
"""

from __future__ import annotations

import json
import os
import tempfile
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5Model,
    Qwen3VLForConditionalGeneration,
    Qwen3VLModel,
)
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5VisionModel
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

from visionzip_core.config import VisionZipConfig
from visionzip_core.families.qwen2_5_vl import (
    PROJECTOR,
    Qwen2_5VL,
    compressed_count,
    merged_grid,
    temporal_groups,
)
from visionzip_core.families.qwen3_bench import (
    QWEN3_5_SIZES,
    QWEN3_VL_SIZES,
    qwen3_step_flops,
    qwen3_synthetic_batch,
)
from visionzip_core.families.qwen_downloads import SPECIAL_TOKENS, write_shards, write_tokenizer_files
from visionzip_core.families.qwen_processing import DEFAULT_FPS

# The DeepStack mergers are projector modules too (they map tower features into the LLM's space).
# PEFT wraps modules_to_save by name, and a wrapped ModuleList cannot be indexed, so each merger is
# named; real checkpoints have 3 levels, unused names match nothing.
DEEPSTACK = "deepstack_merger_list"
_MAX_DEEPSTACK_LEVELS = 8

# The chat template Qwen/Qwen3-VL-8B-Instruct ships in chat_template.json, reduced to what the tiny
# tokenizer speaks: no default system turn, <|vision_start|><|image_pad|><|vision_end|> per image and
# <|vision_start|><|video_pad|><|vision_end|> per video, ChatML turns.
QWEN3_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen/Qwen3.5-9B's chat_template.jinja, reduced likewise: the same turns, an assistant turn opens
# with its (here empty) thinking block, and the generation prompt writes that empty block (thinking
# off, how the evaluation prompt asks for a direct answer and how the replies are trained) unless
# ``enable_thinking=True`` opens one. (The download's template opens a thinking block by default.)
QWEN3_5_CHAT_TEMPLATE = QWEN3_VL_CHAT_TEMPLATE.replace(
    "<|im_start|>{{ message['role'] }}\n",
    "<|im_start|>{{ message['role'] }}\n{% if message['role'] == 'assistant' %}<think>\n\n</think>\n\n{% endif %}",
).replace(
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking %}<think>\n"
    "{% else %}<think>\n\n</think>\n\n{% endif %}{% endif %}",
)

# min/max pixels of the tiny preprocessor configs (the real ones: 65536 and 16777216): 4 to 64
# merged tokens per image, so a 128 px image (4x4 merged tokens of 32 px) keeps its size.
TINY_QWEN3_MIN_PIXELS = 4 * 32 * 32
TINY_QWEN3_MAX_PIXELS = 64 * 32 * 32


@contextmanager
def indexed_deepstack(language_model: torch.nn.Module) -> Iterator[None]:
    """While active, ``language_model`` (a Qwen3-VL text model instance) adds the DeepStack levels at
    rows given by an index instead of a boolean mask, so that its forward runs on the meta device.

    The stock ``_deepstack_process`` indexes the hidden states with ``visual_pos_masks`` moved to
    their device; on meta a boolean index needs ``nonzero``, whose output size a meta tensor cannot
    know. Here ``visual_pos_masks`` is ``(N,)`` flat positions in the ``(B * S)`` rows (computed on
    the CPU before the step), and the same ops run: a clone, a gather, the addition and an in-place
    put of the ``(N, H)`` rows, so the same storages are created. Only this instance changes, for
    the simulation's step; the attribute is removed after it.
    """

    def process(hidden_states: torch.Tensor, visual_index: torch.Tensor, visual_embeds: torch.Tensor):
        hidden_states = hidden_states.clone()
        rows = hidden_states.view(-1, hidden_states.shape[-1])
        local = rows.index_select(0, visual_index) + visual_embeds.to(rows.dtype)
        rows.index_put_((visual_index,), local)
        return hidden_states

    language_model._deepstack_process = process
    try:
        yield
    finally:
        del language_model._deepstack_process


def _replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs: Any) -> str:
    """Qwen3's video placeholder (timestamp, then one run per frame group) with each run holding the
    group's compressed count."""
    stock = type(self).replace_video_token(self, video_inputs, video_idx, **kwargs)
    t, h, w = (int(v) for v in video_inputs["video_grid_thw"][video_idx])
    merge = self.video_processor.merge_size
    group = self.video_token * (h * w // merge**2)
    kept = self.video_token * compressed_count(self._visionzip, (1, h, w), merge, f"video {video_idx}")
    # Each group's run stands between <|vision_start|> and <|vision_end|>: whole runs are replaced.
    run = self.vision_start_token + group + self.vision_end_token
    return stock.replace(run, self.vision_start_token + kept + self.vision_end_token)


class Qwen3VL(Qwen2_5VL):
    """Qwen3-VL (see the module doc): the Qwen2.5-VL adapter, DeepStack levels selected and merged
    with the main features, videos as one run per frame group."""

    name = "qwen3-vl"
    model_classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLModel")
    processor_classes = ("Qwen3VLProcessor",)
    model_types = ("qwen3_vl",)
    model_class = Qwen3VLForConditionalGeneration
    inner_classes = (Qwen3VLModel,)
    video_runs = "frame_group"
    embeds_only = True  # Qwen3VLModel.forward: "exactly one of input_ids or inputs_embeds"
    bench_sizes = QWEN3_VL_SIZES
    simulation = {
        "size": "qwen3-vl-8b",
        "micro_batch": 4,
        "batch_source": "4 per GPU: configs/qwen3-vl-8b/lora.yaml (4 x accumulation 4 x 8 GPUs = 128, "
        "gradient checkpointing, bf16)",
        "modes": ("lora", "projector"),
        "calibrate": None,  # the real step runs the tower the meta step stands in for
    }
    # Benchmarks feed 448 x 448 px = 28 x 28 patches of 16 px = 14 x 14 = 196 merged tokens (inside
    # the download's min/max pixels, so the processor keeps the size).
    bench_image = (448, 448)

    # --- benchmarks ------------------------------------------------------------------------------
    def bench_processor(self, model, size, tokenizer):
        """The processor read from a folder laid out as the download's: ``tokenizer`` with this
        family's chat template, the download's image and video settings (16 px patches, 65536 to
        16777216 pixels, so a 448 px benchmark image keeps its size)."""
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder)
            tokenizer.model_max_length = 32768
            tokenizer.chat_template = self.chat_template
            tokenizer.save_pretrained(out)
            (out / "chat_template.jinja").unlink(missing_ok=True)
            (out / "chat_template.json").write_text(json.dumps({"chat_template": self.chat_template}))
            image, video = qwen3_preprocessor_configs(65536, 16777216)
            (out / "preprocessor_config.json").write_text(json.dumps(image, indent=2))
            (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
            return self.load_processor(str(out))

    #: The tower class (:meth:`vision_probe` builds a small one).
    vision_class: type = Qwen3VLVisionModel

    def vision_probe(self, config: Any, dtype: torch.dtype, attn_implementation: str) -> tuple:
        """Its tower of these widths with two blocks (every block has full attention, so two stand
        for all of them; no DeepStack level: the simulation stands in the mergers' input), frozen, on
        the benchmark image's patches (448 px: 28 x 28 = 784 rows), so the per-row peak is the one
        of the simulated images."""
        data = json.loads(config.vision_config.to_json_string())
        data.update(depth=2, deepstack_visual_indexes=[])
        vision = AutoConfig.for_model(**data)  # the vision config's own model_type
        vision._attn_implementation = attn_implementation
        tower = self.vision_class._from_config(vision, dtype=dtype)
        tower.requires_grad_(False)
        rows, cols = (side // vision.patch_size for side in self.bench_image)
        width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        pixels = torch.zeros(rows * cols, width, dtype=dtype)
        return tower, pixels, {"grid_thw": torch.tensor([[1, rows, cols]])}, rows * cols

    def bench_batch(self, size, config: Any, plan: Any, device="cpu", seed: int = 0):
        return qwen3_synthetic_batch(size, config, plan.llm, device, seed=seed)

    def stand_in_vision(
        self, config: Any, batch: dict[str, torch.Tensor], plan: Any
    ) -> dict[str, torch.Tensor]:
        """Qwen2.5-VL's stand-ins (:meth:`Qwen2_5VL.stand_in_vision`), plus for DeepStack:

        - ``deepstack_input``: ``(levels, patches, vision_hidden)``, the frozen tower's output after
          each block in ``deepstack_visual_indexes``, what each level's merger reads;
        - ``visual_index``: ``(B * plan.llm,)`` flat positions of the image tokens in the ``(B * S)``
          rows, where the levels are added (:func:`indexed_deepstack`), taken from the CPU
          ``input_ids`` here, before the step.
        """
        out = super().stand_in_vision(config, batch, plan)
        levels = len(config.vision_config.deepstack_visual_indexes or ())
        if levels:
            out["deepstack_input"] = out["vision_output"].new_zeros((levels, *out["vision_output"].shape))
            flat = batch["input_ids"].reshape(-1) == config.image_token_id
            out["visual_index"] = flat.nonzero().squeeze(1)
        return out

    def simulation_loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Qwen2.5-VL's (:meth:`Qwen2_5VL.simulation_loss`), with the DeepStack levels. The tower's
        outputs, the last block's and each level's (``(patches, hidden)`` after its block), are
        copied in the step, as the frozen tower creates them there and the trainable mergers save
        them for backward; each level's merger runs over its input, its output is gathered at the
        kept rows (the main features' selection) and the language model adds it after its first
        layers at the image positions (:func:`indexed_deepstack`)."""
        inner = self.find_model(model)
        input_ids = batch["input_ids"]
        embeds = inner.get_input_embeddings()(input_ids)
        tower_output = batch["vision_output"].clone()
        level_inputs = [level.clone() for level in batch.get("deepstack_input", ())]
        working = torch.empty(batch["vision_working_set"], dtype=torch.uint8, device=embeds.device)
        del working
        kept = batch["kept_index"]
        features = inner.visual.merger(tower_output).index_select(0, kept).to(embeds.dtype)
        mergers = getattr(inner.visual, DEEPSTACK, None) or ()  # Qwen3.5's tower has none
        deepstack = [
            merger(level).index_select(0, kept).to(embeds.dtype)
            for merger, level in zip(mergers, level_inputs)
        ]
        del level_inputs
        image_positions = (input_ids == inner.config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(image_positions, features)
        inputs = {
            "inputs_embeds": embeds,
            "attention_mask": batch["attention_mask"],
            "position_ids": batch["position_ids"],
            "labels": batch["labels"],
        }
        if not deepstack:  # Qwen3.5
            return model(**inputs).loss
        language_model = inner.language_model

        def add_levels(module, args, kwargs):
            # The stock forward passes no levels without pixel_values: the language model gets them here.
            kwargs.update(visual_pos_masks=batch["visual_index"], deepstack_visual_embeds=deepstack)
            return args, kwargs

        hook = language_model.register_forward_pre_hook(add_levels, with_kwargs=True)
        try:
            with indexed_deepstack(language_model):
                return model(**inputs).loss
        finally:
            hook.remove()

    def step_flops(self, size, config: Any, parts, plan, split, *, samples, seq_len, logits_positions=None):
        return qwen3_step_flops(
            config,
            parts,
            num_images=samples,
            image_hw=size.image,
            seq_len=seq_len,
            split=split,
            logits_positions=logits_positions,
        )

    def projector_modules(self) -> list[str]:
        return [PROJECTOR, *(f"{DEEPSTACK}.{i}" for i in range(_MAX_DEEPSTACK_LEVELS))]

    def check_settings(self, config: Any, vz: VisionZipConfig) -> None:
        try:
            super().check_settings(config, vz)
        except ValueError as err:  # name this family, not the one the check was written for
            raise ValueError(str(err).replace("qwen2.5-vl", self.name)) from None

    def adapt_processor(self, processor, vz: VisionZipConfig | None, config: Any = None):
        processor = super().adapt_processor(processor, vz, config)
        if vz is not None:
            processor.replace_video_token = types.MethodType(_replace_video_token, processor)
        return processor

    def video_placeholder_text(
        self, config: Any, vz: VisionZipConfig | None, video_size: tuple[int, int, int], video_token: str
    ) -> str:
        """As the processor lays a video out (``Qwen3VLProcessor.replace_video_token``): per frame
        group its timestamp, then ``<|vision_start|>``, the group's count of ``video_token`` and
        ``<|vision_end|>``. Timestamps as the torchvision-free processor gives them: frames taken as
        sampled at :data:`~.qwen_processing.DEFAULT_FPS`, a group at the mean of its first and last
        frame (``video_size`` counts the frames padded to whole groups, so an odd frame count's last
        group reads a half frame later than the processor's)."""
        frames, height, width = video_size
        rows, cols = merged_grid(config.vision_config, (height, width))
        per_group = rows * cols
        if vz is not None:
            per_group = sum(vz.split_for(per_group, f"a video of {height}x{width} px (height x width)"))
        step = config.vision_config.temporal_patch_size
        out = []
        for group in range(temporal_groups(config.vision_config, frames)):
            seconds = (group * step + group * step + step - 1) / 2 / DEFAULT_FPS
            out.append(f"<{seconds:.1f} seconds><|vision_start|>{video_token * per_group}<|vision_end|>")
        return "".join(out)

    # A tiny folder speaks the Qwen2-style tiny tokenizer with this family's chat template.
    chat_template = QWEN3_VL_CHAT_TEMPLATE

    def write_tiny(self, tokenizer: Any, out_dir, seed: int = 0, vision_depth: int = 4) -> Path:
        """:func:`write_tiny_qwen3_folder` (``vision_depth`` blocks)."""
        return write_tiny_qwen3_folder(self, tokenizer, out_dir, seed, vision_depth)


class Qwen3_5(Qwen3VL):
    """Qwen3.5, dense sizes (see the module doc): Qwen3-VL's vision path without DeepStack, a hybrid
    linear/full-attention LLM behind the same adapter."""

    name = "qwen3.5"
    model_classes = ("Qwen3_5ForConditionalGeneration", "Qwen3_5Model")
    processor_classes = ("Qwen3VLProcessor",)  # its download names Qwen3-VL's processor
    model_types = ("qwen3_5",)
    model_class = Qwen3_5ForConditionalGeneration
    inner_classes = (Qwen3_5Model,)
    embeds_only = False
    chat_template = QWEN3_5_CHAT_TEMPLATE
    bench_sizes = QWEN3_5_SIZES
    vision_class = Qwen3_5VisionModel
    simulation = {
        "size": "qwen3.5-9b",
        "micro_batch": 2,
        "batch_source": "2 per GPU: configs/qwen3.5-9b/lora.yaml (2 x accumulation 8 x 8 GPUs = 128, "
        "gradient checkpointing, bf16)",
        "modes": ("lora", "projector"),
        "calibrate": None,  # the real step runs the tower the meta step stands in for
    }
    # Full attention's q/k/v/o, the Gated DeltaNet layers' projections (3 of 4 layers), the MLP.
    lora_targets = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "in_proj_qkv",
        "in_proj_z",
        "in_proj_b",
        "in_proj_a",
        "out_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )

    def projector_modules(self) -> list[str]:
        return [PROJECTOR]

    def simulation_loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Qwen2.5-VL's, without the 2-D attention mask: the DeltaNet layers' padding mask asks
        ``torch.all(mask == 1)`` on the host, which meta tensors cannot answer. The full-attention
        layers take no mask in the simulation either (its fused attention), and zeroing padded rows
        is element-wise, so the memory is the same."""
        return super().simulation_loss(model, {**batch, "attention_mask": None})

    def packing_refusal(self, config: Any) -> str | None:
        return (
            "its Gated DeltaNet layers carry state across the samples of a packed row; "
            "per-sample boundaries are not implemented"
        )

    def prompt(
        self, processor, question: str, images: int, videos: int = 0, system: str | None = None
    ) -> str:
        """As Qwen3-VL's, with thinking off (``enable_thinking=False``: an empty thinking block), so
        the answer follows the prompt directly."""
        content = [{"type": "image"}] * images + [{"type": "video"}] * videos
        messages = [] if not system else [{"role": "system", "content": system}]
        messages.append({"role": "user", "content": [*content, {"type": "text", "text": question}]})
        return processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, enable_thinking=False
        )


# --- tiny folders laid out as the downloads ----------------------------------------------------------


def tiny_qwen3_configs(
    family: Qwen3VL, vocab_size: int, token_ids: dict[str, int], vision_depth: int
) -> dict:
    """The ``config.json`` of a tiny model of ``family`` with the download's key names.

    Qwen3-VL (saved by transformers 4.57): ``text_config`` with ``rope_scaling`` (``mrope_interleaved``,
    ``mrope_section``) and ``rope_theta``, ``vision_config`` with the old ``model_type: qwen3_vl`` and
    ``deepstack_visual_indexes``. Qwen3.5 (saved by 5.x): ``rope_parameters`` with
    ``partial_rotary_factor``, ``layer_types`` (3 linear : 1 full), ``deepstack_visual_indexes: []``.
    Text: 4 layers of width 64, head_dim 16; vision: ``vision_depth`` blocks of width 32, 16 px
    patches, an 8 x 8 learned position table.
    """
    qwen3_5 = family.model_types[0] == "qwen3_5"
    text = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": token_ids["<|endoftext|>"],
        "eos_token_id": token_ids["<|im_end|>"],
        "dtype": "float32",
    }
    vision = {
        "depth": vision_depth,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "hidden_act": "gelu_pytorch_tanh",
        "in_channels": 3,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": text["hidden_size"],
        "num_position_embeddings": 64,
        "initializer_range": 0.02,
    }
    if qwen3_5:
        text.update(
            model_type="qwen3_5_text",
            layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
            full_attention_interval=4,
            attn_output_gate=True,
            linear_conv_kernel_dim=4,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000000,
                "partial_rotary_factor": 0.5,
                "mrope_section": [1, 1, 2],
                "mrope_interleaved": True,
            },
        )
        vision.update(model_type="qwen3_5", deepstack_visual_indexes=[])
    else:
        text.update(
            model_type="qwen3_vl_text",
            rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True},
            rope_theta=5000000,
        )
        vision.update(model_type="qwen3_vl", deepstack_visual_indexes=[i for i in (1, 2) if i < vision_depth])
    return {
        "architectures": [family.model_classes[0]],
        "model_type": family.model_types[0],
        "image_token_id": token_ids["<|image_pad|>"],
        "video_token_id": token_ids["<|video_pad|>"],
        "vision_start_token_id": token_ids["<|vision_start|>"],
        "vision_end_token_id": token_ids["<|vision_end|>"],
        "tie_word_embeddings": False,
        "dtype": "float32",
        "transformers_version": "5.2.0" if qwen3_5 else "4.57.0",
        "text_config": text,
        "vision_config": vision,
    }


def qwen3_preprocessor_configs(min_pixels: int, max_pixels: int) -> tuple[dict, dict]:
    """``(preprocessor_config.json, video_preprocessor_config.json)`` of a Qwen3-VL / Qwen3.5 download:
    the 5.x ``size`` bounds, 16 px patches, mean/std 0.5, and the torchvision class names."""
    common = {
        "size": {"longest_edge": max_pixels, "shortest_edge": min_pixels},
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "processor_class": "Qwen3VLProcessor",
    }
    image = {**common, "image_processor_type": "Qwen2VLImageProcessorFast"}
    video = {**common, "video_processor_type": "Qwen3VLVideoProcessor"}
    return image, video


def write_tiny_qwen3_folder(
    family: Qwen3VL, tokenizer: Any, out_dir: str | os.PathLike, seed: int = 0, vision_depth: int = 4
) -> Path:
    """Write a tiny random Qwen3-VL (Qwen3.5) laid out like ``Qwen/Qwen3-VL-8B-Instruct``
    (``Qwen/Qwen3.5-9B``), speaking ``tokenizer`` (the Qwen2-style tiny tokenizer) with the family's
    chat template.

    Files: ``config.json`` (:func:`tiny_qwen3_configs`), ``generation_config.json``, two safetensors
    shards with the checkpoints' own key names (``model.visual.*``, ``model.language_model.*``,
    ``lm_head.*``; Qwen3.5's shards named ``model.safetensors-0000N-of-00002.safetensors`` and holding
    an ``mtp.*`` tensor, as its download does) plus the index, the tokenizer files,
    ``chat_template.json`` (Qwen3-VL) or ``chat_template.jinja`` (Qwen3.5),
    ``preprocessor_config.json`` and ``video_preprocessor_config.json``. Deterministic for a seed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    qwen3_5 = family.model_types[0] == "qwen3_5"
    token_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = -(-len(tokenizer) // 64) * 64
    (out / "config.json").write_text(
        json.dumps(tiny_qwen3_configs(family, vocab_size, token_ids, vision_depth), indent=2)
    )
    config = family.model_class.config_class.from_pretrained(out)
    torch.manual_seed(seed)
    model = family.random_model(config).eval()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    pattern = (
        "model.safetensors-{:05d}-of-{:05d}.safetensors" if qwen3_5 else "model-{:05d}-of-{:05d}.safetensors"
    )
    if qwen3_5:  # the multi-token-prediction head the checkpoints carry; transformers skips it on load
        state["mtp.fc.weight"] = torch.zeros(8, 8)
    write_shards(out, state, vision_prefix="model.visual.", pattern=pattern)
    generation = {
        "bos_token_id": token_ids["<|endoftext|>"],
        "pad_token_id": token_ids["<|endoftext|>"],
        "eos_token_id": [token_ids["<|im_end|>"], token_ids["<|endoftext|>"]],
        "do_sample": False,
        "transformers_version": "4.57.0",
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    template_file = "chat_template.jinja" if qwen3_5 else "chat_template.json"
    write_tokenizer_files(out, tokenizer, "Qwen3VLProcessor", family.chat_template, template_file)
    image, video = qwen3_preprocessor_configs(TINY_QWEN3_MIN_PIXELS, TINY_QWEN3_MAX_PIXELS)
    (out / "preprocessor_config.json").write_text(json.dumps(image, indent=2))
    (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    return out
