"""The training YAML's schema: typed, frozen sections, each field documented where it is defined.

:class:`Settings` is what a loaded config is (:func:`~visionzip_core.training.config_loading.load_config`
reads, overrides and validates it; :mod:`~visionzip_core.training.config_rules` holds the rules
between sections). :func:`config_keys_help` prints every key for ``--help``. :class:`ConfigError`
is the one error every stage reports into.
"""

from __future__ import annotations

import types
import typing
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import PydanticUndefined

from visionzip_core.config import VisionZipConfig
from visionzip_core.data import DataSettings
from visionzip_core.families import FAMILIES, LORA_TARGETS

Mode = Literal["projector", "pretrain", "finetune", "lora"]


class ConfigError(ValueError):
    """Every problem found in a training config, one per line, each naming its dotted key."""

    def __init__(self, source: str, problems: list[str], from_command_line: frozenset[int] = frozenset()):
        self.source = source
        self.problems = problems
        #: Indices of the problems whose key a command-line override set: marked ``(command line)``.
        self.from_command_line = from_command_line
        lines = "\n".join(
            f"  - {p}" + (" (command line)" if k in from_command_line else "") for k, p in enumerate(problems)
        )
        super().__init__(f"{len(problems)} problem(s) in {source}:\n{lines}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSettings(_Section):
    """Which weights to start from. Paths are local folders (or ``builtin:tiny-*`` test models)."""

    name_or_path: str | None = Field(
        None,
        description="Model folder to start from (projector, finetune, lora modes): a supported family's "
        "download (llava-hf LLaVA-1.5 or LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL) or a run's final/.",
    )
    vision_tower: str | None = Field(None, description="CLIP vision folder (pretrain mode only).")
    language_model: str | None = Field(
        None, description="Causal-LM folder with tokenizer (pretrain mode only)."
    )
    trust_remote_code: bool = Field(
        False, description="Run code shipped with the checkpoint. Off unless trusted."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = Field(
        None, description="Attention kernel for both towers (default: transformers' choice, SDPA)."
    )
    quantization: Literal["nf4", "fp4", "int8", "none"] = Field(
        "none",
        description="Load the language model's linear layers quantized by bitsandbytes (QLoRA; lora and "
        "projector modes; double quantization, computing in train.precision). The vision tower and "
        "the projector stay unquantized. Needs the [qlora] extra.",
    )


class VisionZipSettings(VisionZipConfig):
    """Visual-token compression applied in every forward pass; ``enabled: false`` = stock 576 baseline.

    The split and options are :class:`VisionZipConfig`'s own fields, validated the same way.
    """

    enabled: bool = Field(True, description="false: the stock model, every patch token (the baseline).")
    feature_layer: int | None = Field(
        None,
        description="Vision layer whose attention, keys and output are used. Leave it out: it is the "
        "model's own vision_feature_layer (-2 for stage 1), the only layer its projector reads.",
    )

    def core(self, model_layer: int | None = None) -> VisionZipConfig | None:
        """The library config to apply, or None when compression is off. ``model_layer``: the
        model's feature layer, used when ``feature_layer`` is left out (derived)."""
        if not self.enabled:
            return None
        layer = self.feature_layer if self.feature_layer is not None else model_layer
        if layer is None:
            raise ValueError("visionzip.feature_layer: derived from the model; pass its layer to core()")
        return VisionZipConfig(**self.model_dump(exclude={"enabled", "feature_layer"}), feature_layer=layer)


class TrainSettings(_Section):
    mode: Mode = Field(
        description="projector: projector only, from a trained checkpoint; pretrain: stage 1 from CLIP + LLM; "
        "finetune: projector + LLM (+ vision tower); lora: LoRA on the LLM + full projector."
    )
    output_dir: str = Field(description="Checkpoints, metrics.jsonl, metrics.png and final/ go here.")
    epochs: int | None = Field(
        1, ge=1, description="Passes over the training data (ignored if max_steps is set)."
    )
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs when set.")
    per_device_batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        1,
        description="Samples per micro-batch per process (with data.batch_tokens: validation only); "
        "auto: the planner picks it (with grad_accum_steps) for train.global_batch_size on this GPU.",
    )
    global_batch_size: int | None = Field(
        None,
        ge=1,
        description="Samples per optimizer step over all processes; with per_device_batch_size: auto.",
    )
    grad_accum_steps: int = Field(
        1,
        ge=1,
        description="Micro-batches per optimizer step (global batch = micro-batch x this x processes).",
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 where the GPU supports it, else fp32."
    )
    gradient_checkpointing: bool | Literal["auto"] = Field(
        False,
        description="Recompute activations in backward: less memory, about 30% slower; auto: on only "
        "where the planner finds the fastest setting that fits this GPU needs it.",
    )
    auto_fallback_batch_size: int = Field(
        1,
        ge=1,
        description="per_device_batch_size when auto cannot plan (no GPU, or a family the planner does not simulate).",
    )
    auto_fallback_checkpointing: bool = Field(
        False,
        description="gradient_checkpointing when auto cannot plan (no GPU, or a family the planner does not simulate).",
    )
    tune_vision_tower: bool = Field(False, description="finetune mode: also train the vision tower.")
    save_steps: int = Field(500, ge=1, description="Checkpoint every N optimizer steps.")
    save_total_limit: int = Field(2, ge=1, description="Keep the last K complete checkpoints.")
    resume: str = Field(
        "auto", description="auto: latest complete checkpoint in output_dir; never; or a path."
    )
    eval_steps: int | None = Field(
        None, ge=1, description="Validation every N steps (and always at the end)."
    )
    logging_steps: int = Field(10, ge=1, description="One metrics.jsonl record (and log line) every N steps.")
    seed: int = Field(42, description="Seed for initialisation and dropout (data order: data.seed).")
    resume_allow_changes: list[str] = Field(
        default_factory=list,
        description="Settings (dotted keys or sections, e.g. optim.lr_llm) that may differ from the "
        "checkpoint's on resume; each change is logged. Anything else that changes what is computed "
        "stops the run.",
    )
    collective_timeout_min: float = Field(
        120.0,
        gt=0,
        description="Minutes a process may wait for the others in a collective, e.g. while rank 0 alone "
        "preflights a large dataset or writes the export; a stuck rank is reported after this.",
    )
    tf32: bool = Field(
        True, description="TensorFloat-32 for fp32 matmuls and convolutions on GPUs that have it (faster)."
    )
    max_nonfinite_steps: int = Field(
        0,
        ge=0,
        description="Steps with a NaN/inf loss or grad norm that are skipped (no update) before the "
        "run stops; 0 = stop at the first.",
    )


class OptimSettings(_Section):
    lr_projector: float = Field(1e-3, ge=0, description="Peak learning rate of the projector.")
    lr_llm: float = Field(
        2e-5, ge=0, description="Peak learning rate of the language model (finetune, lora)."
    )
    lr_vision: float = Field(
        2e-6, ge=0, description="Peak learning rate of the vision tower (tune_vision_tower)."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not on biases and norms).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    scheduler: Literal["cosine", "constant"] = Field(
        "cosine", description="Learning-rate shape after the linear warmup."
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of the steps spent warming up.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Cosine floor, as a fraction of the peak.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping (0 = off).")


class LoraSettings(_Section):
    r: int = Field(128, ge=1, description="LoRA rank.")
    alpha: int = Field(256, ge=1, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA path.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(LORA_TARGETS),
        description="Module names inside the LLM only (CLIP's projections share names; they are excluded).",
    )


class DeepSpeedSettings(_Section):
    config: str = Field(
        "configs/deepspeed/zero2.json", description="JSON with 'auto' fields filled from this YAML."
    )


class WandbSettings(_Section):
    enabled: bool = Field(True, description="Log to wandb (offline without an API key).")
    project: str = Field("visionzip", description="wandb project.")
    entity: str | None = Field(None, description="wandb entity (team or user).")
    name: str | None = Field(None, description="Run name (default: one wandb picks).")
    tags: list[str] = Field(default_factory=list, description="wandb tags.")
    mode: Literal["auto", "online", "offline"] = Field(
        "auto", description="auto: online with an API key, else offline (sync later with `wandb sync`)."
    )
    log_artifact: Literal["projector", "adapter", "model", "none"] = Field(
        "projector", description="Which exported weights to upload as an artifact at the end."
    )
    token_overlays: int = Field(
        4,
        ge=0,
        description="At each evaluation, log the kept-token overlay of the first N validation images "
        "(the same ones each time) and the budget's token counts; 0 = off.",
    )


class ExportSettings(_Section):
    enabled: bool = Field(True, description="Write final/ (an HF folder) at the end.")
    merge_lora: bool = Field(True, description="lora: also write the merged full model into final/.")


class EvalSettings(_Section):
    """Scoring by generation after the run (rank 0, on the exported ``final/``)."""

    generate_accuracy: bool = Field(
        False,
        description="Print the exact-match accuracy of the first generated reply on data.val's samples "
        "with an image, as scripts/evaluate.py scores it.",
    )
    max_new_tokens: int = Field(16, ge=1, description="Reply length limit.")
    limit: int | None = Field(None, ge=1, description="Score only the first N samples (null = all).")


class Settings(_Section):
    model: ModelSettings = Field(default_factory=ModelSettings)
    visionzip: VisionZipSettings = Field(default_factory=VisionZipSettings)
    data: DataSettings
    train: TrainSettings
    optim: OptimSettings = Field(default_factory=OptimSettings)
    lora: LoraSettings | None = None
    deepspeed: DeepSpeedSettings = Field(default_factory=DeepSpeedSettings)
    wandb: WandbSettings = Field(default_factory=WandbSettings)
    export: ExportSettings = Field(default_factory=ExportSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)

    @property
    def lora_or_default(self) -> LoraSettings:
        return self.lora or LoraSettings()


SECTIONS: dict[str, type[BaseModel]] = {
    name: field.annotation if isinstance(field.annotation, type) else LoraSettings
    for name, field in Settings.model_fields.items()
}


def config_keys_help() -> str:
    """Every config key, its default and its description, from the typed sections (for ``--help``)."""

    def type_name(annotation) -> str:
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if origin is typing.Literal:
            return " | ".join(repr(a) for a in args)
        if origin in (typing.Union, types.UnionType):
            return " | ".join(type_name(a) for a in args)
        if origin in (list, tuple) and args:
            inner = args[0]
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return f"list of {{{', '.join(inner.model_fields)}}}"
            return f"{origin.__name__} of {type_name(inner)}"
        if annotation is type(None):
            return "null"
        return getattr(annotation, "__name__", str(annotation))

    by_family = {}
    for key in sorted({k for family in FAMILIES for k in family.data_defaults}):
        field_default = DataSettings.model_fields[key].default
        values: dict[str, list[str]] = {}
        for family in FAMILIES:
            values.setdefault(family.data_defaults.get(key, field_default), []).append(family.name)
        by_family["data", key] = "; ".join(
            f"{', '.join(names)}: {value!r}" for value, names in values.items()
        )
    lines = []
    for section, model in SECTIONS.items():
        lines.append(f"{section}:")
        for key, field in model.model_fields.items():
            if field.default is PydanticUndefined and field.default_factory is None:
                default = "required"
            elif field.default_factory is not None:
                default = "default: see configs/demo.yaml"
            else:
                default = f"default {field.default!r}"
            lines.append(f"  {section}.{key} ({type_name(field.annotation)}; {default})")
            if field.description:
                lines.append(f"      {field.description}")
            if (section, key) in by_family:
                lines.append(f"      Family default: {by_family[section, key]}.")
    return "\n".join(lines)
