"""The training YAML as typed, frozen settings, validated as a whole before any weights load.

``load_config(path, overrides)`` reports every problem at once in one :class:`ConfigError`:
unknown keys (with a suggestion), wrong types, and contradictions between sections, each named
by its dotted key (``train.save_steps``). What the config points at (files, folders, model
configs) is checked only with ``check_files=True``, as the entry point does, so that a shipped
config with placeholder paths still validates.

Overrides are ``section.key=value`` strings; the value is parsed with ``yaml.safe_load`` so that
``train.max_steps=10`` is an int and ``visionzip.enabled=false`` a bool.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from visionzip_core.bench.flops import LORA_TARGETS
from visionzip_core.config import VisionZipConfig
from visionzip_core.data import DataSettings
from visionzip_core.training.distributed import REPO_ROOT

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


_SECTIONS: dict[str, type[BaseModel]] = {
    name: field.annotation if isinstance(field.annotation, type) else LoraSettings
    for name, field in Settings.model_fields.items()
}


def config_keys_help() -> str:
    """Every config key, its default and its description, from the typed sections (for ``--help``)."""
    from pydantic_core import PydanticUndefined

    def type_name(annotation) -> str:
        import types
        import typing

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

    # The families (and so transformers) load only for --help: the config itself imports no model code.
    from visionzip_core.families import FAMILIES

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
    for section, model in _SECTIONS.items():
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


def resolve_repo_path(path: str) -> Path:
    """A config-relative path: as given if it exists from the cwd, else under the repository root."""
    p = Path(os.path.expanduser(path))
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p


def apply_overrides(raw: dict, overrides: list[str], problems: list[str]) -> dict:
    """Set ``section.key=value`` pairs (values typed by ``yaml.safe_load``) into a copy of ``raw``.

    A number reaches into a list: ``data.train.0.weight=0.5`` sets the first source's weight;
    an index past the end is a problem naming the list and its length.
    """
    out = json.loads(json.dumps(raw))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"{item}: overrides look like section.key=value")
            continue
        try:
            parsed = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError as e:
            problems.append(f"{key}: cannot parse override value {value!r} ({e.__class__.__name__})")
            continue
        node, parts = out, key.split(".")
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[:depth])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    problems.append(
                        f"{key}: {where} is a list of {len(node)}; '{part}' is not an index in it (0-{len(node) - 1})"
                    )
                    break
                if last:
                    node[int(part)] = parsed
                else:
                    node = node[int(part)]
                continue
            if last:
                node[part] = parsed
            else:
                if not isinstance(node.get(part), (dict, list)):
                    node[part] = {}
                node = node[part]
    return out


def _describe(section: str, err: dict, raw_section: Any) -> str:
    loc = ".".join(str(p) for p in (section, *err["loc"]))
    if err["type"] == "extra_forbidden":
        model = _SECTIONS[section]
        known = list(model.model_fields) if len(err["loc"]) == 1 else []
        close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
        hint = (
            f" (did you mean '{section}.{close[0]}'?)"
            if close
            else f" (known: {', '.join(known)})"
            if known
            else ""
        )
        return f"{loc}: unknown key{hint}"
    if err["type"] == "missing":
        return f"{loc}: required"
    got = err.get("input")
    return f"{loc}: {err['msg']} (got {got!r})"


def _contradictions(s: dict[str, Any], raw: dict) -> list[str]:
    """Problems between fields; only sections that validated on their own are in ``s``."""
    problems: list[str] = []
    model, train, data, vz = s.get("model"), s.get("train"), s.get("data"), s.get("visionzip")
    if train is not None:
        if train.epochs is None and train.max_steps is None:
            problems.append("train.max_steps: set train.max_steps or train.epochs")
        if train.tune_vision_tower and train.mode != "finetune":
            problems.append(
                f"train.tune_vision_tower: only finetune mode trains the vision tower (mode is '{train.mode}')"
            )
        if "lora" in raw and raw["lora"] is not None and train.mode != "lora":
            problems.append(
                f"lora: LoRA settings given but train.mode is '{train.mode}' (set train.mode=lora)"
            )
        problems += _auto_batch_contradictions(train, data)
        if train.precision == "fp16" and not _cuda():
            problems.append("train.precision: fp16 needs a GPU; use bf16 or fp32 (or auto) on CPU")
        if train.precision == "bf16" and _cuda() and not _bf16_gpu():
            problems.append("train.precision: this GPU has no bf16; use fp16, fp32 or auto")
        if train.resume not in ("auto", "never") and not train.resume.strip():
            problems.append("train.resume: auto, never, or a checkpoint path")
        from visionzip_core.training.resume import allow_list_problems

        problems += allow_list_problems(train.resume_allow_changes)
    checkpoint_only = (
        train is not None
        and model is not None
        and train.mode == "pretrain"
        and model.name_or_path
        and not (model.vision_tower or model.language_model)
    )
    if checkpoint_only:
        # A whole model under pretrain: one line, not one per stage-1 key the user never meant to set.
        problems.append(
            "train.mode: pretrain assembles a new model from model.vision_tower (CLIP) and "
            f"model.language_model; model.name_or_path ({model.name_or_path}) is a whole model: "
            "train it with train.mode=projector, finetune or lora"
        )
    elif train is not None and model is not None:
        if train.mode == "pretrain":
            if not model.vision_tower:
                problems.append("model.vision_tower: pretrain mode needs a CLIP vision folder")
            if not model.language_model:
                problems.append("model.language_model: pretrain mode needs a causal-LM folder")
            if model.name_or_path:
                problems.append(
                    "model.name_or_path: pretrain mode assembles the model; leave name_or_path empty"
                )
        else:
            if not model.name_or_path:
                problems.append(
                    f"model.name_or_path: {train.mode} mode starts from a model checkpoint folder"
                )
            for key in ("vision_tower", "language_model"):
                if getattr(model, key):
                    problems.append(f"model.{key}: only used in pretrain mode (mode is '{train.mode}')")
    if train is not None and model is not None and model.quantization != "none":
        problems += _quantization_problems(model.quantization, train.mode, s.get("deepspeed"))
    if (
        train is not None
        and data is not None
        and train.mode == "pretrain"
        and not checkpoint_only
        and data.template != "plain"
    ):
        given = "" if "template" in (raw.get("data") or {}) else " (the default)"
        problems.append(
            f"data.template: stage-1 pretraining uses 'plain' (got '{data.template}'{given}); set data.template=plain"
        )
    if data is not None:
        problems += data.contradictions()
    if model is not None and data is not None and data.packing:
        problems += [p for p in [packing_problem(model.attn_implementation)] if p]
    if model is not None and model.attn_implementation == "flash_attention_2":
        problems += [p for p in [_flash_attention_problem()] if p]
    if vz is not None and vz.keep_cls and vz.dominant < 1:
        problems.append("visionzip.dominant: must be >= 1 when keep_cls (CLS is a dominant token)")
    if s.get("deepspeed") is not None and train is not None:
        problems += _deepspeed_contradictions(s["deepspeed"], train, s.get("optim"))
    export, wandb = s.get("export"), s.get("wandb")
    if wandb is not None and train is not None and wandb.enabled:
        if wandb.log_artifact == "adapter" and train.mode != "lora":
            problems.append(
                f"wandb.log_artifact: 'adapter' exists only in lora mode (mode is '{train.mode}')"
            )
        if wandb.log_artifact != "none" and export is not None and not export.enabled:
            problems.append(
                "wandb.log_artifact: nothing to upload with export.enabled=false (set it to none)"
            )
    return problems


def _auto_batch_contradictions(train: TrainSettings, data) -> list[str]:
    """``auto`` batch sizing needs the global batch, and leaves the accumulation to the planner."""
    problems = []
    auto = train.per_device_batch_size == "auto"
    if auto and train.global_batch_size is None:
        problems.append("train.global_batch_size: set it when train.per_device_batch_size is auto")
    if auto and train.grad_accum_steps != 1:
        problems.append(
            "train.grad_accum_steps: chosen by the planner when train.per_device_batch_size is auto; remove it"
        )
    if not auto and train.global_batch_size is not None:
        problems.append(
            "train.global_batch_size: used only with train.per_device_batch_size: auto "
            "(otherwise per_device_batch_size x grad_accum_steps x processes)"
        )
    if (
        (auto or train.gradient_checkpointing == "auto")
        and data is not None
        and data.batch_tokens is not None
    ):
        problems.append(
            "data.batch_tokens: a token budget sizes micro-batches itself; auto batch sizing needs it unset"
        )
    return problems


def _quantization_problems(quantization: str, mode: str, ds: DeepSpeedSettings | None) -> list[str]:
    import importlib.util

    problems = []
    if mode not in ("lora", "projector"):
        problems.append(
            f"model.quantization: {quantization} trains nothing of the quantized LLM; use train.mode=lora "
            f"or projector (mode is '{mode}')"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        problems.append(
            f"model.quantization: {quantization} needs bitsandbytes: pip install 'visionzip-core[qlora]' "
            "(or bash scripts/setup.sh)"
        )
    if ds is not None:
        try:
            stage = (
                json.loads(resolve_repo_path(ds.config).read_text())
                .get("zero_optimization", {})
                .get("stage", 0)
            )
        except (OSError, json.JSONDecodeError):
            stage = 0  # reported by the deepspeed checks
        if stage == 3:
            problems.append(
                f"model.quantization: {quantization} weights cannot be partitioned by ZeRO-3; use "
                "deepspeed.config=configs/deepspeed/zero2.json (the frozen quantized LLM is small on "
                "every GPU) or model.quantization=none with ZeRO-3"
            )
    return problems


def _deepspeed_contradictions(
    ds: DeepSpeedSettings, train: TrainSettings, optim: OptimSettings | None
) -> list[str]:
    """The JSON must not hold a second, different value for anything the YAML sets."""
    path = resolve_repo_path(ds.config)
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        return [f"deepspeed.config: no such file {path}"]
    except (OSError, json.JSONDecodeError) as e:
        return [f"deepspeed.config: cannot read {path} ({e})"]
    problems = []
    if "optimizer" in cfg or "scheduler" in cfg:
        problems.append(
            f"deepspeed.config: {path.name} has an optimizer/scheduler section; remove it, the optim: section "
            "builds both (per-module learning rates)"
        )
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        problems.append(f"deepspeed.config: zero_optimization.stage must be 0-3 (got {stage!r})")
    yaml_values = {
        "train_micro_batch_size_per_gpu": ("train.per_device_batch_size", train.per_device_batch_size),
        "gradient_accumulation_steps": ("train.grad_accum_steps", train.grad_accum_steps),
    }
    if optim is not None:
        yaml_values["gradient_clipping"] = ("optim.max_grad_norm", optim.max_grad_norm)
    for key, (yaml_key, value) in yaml_values.items():
        if key in cfg and cfg[key] != "auto" and cfg[key] != value:
            problems.append(
                f'{yaml_key}: {value} but {path.name} sets {key}={cfg[key]}; set it to "auto" there'
            )
    for name in ("bf16", "fp16"):
        enabled = cfg.get(name, {}).get("enabled", "auto")
        if enabled not in ("auto", False) and train.precision not in (name, "auto"):
            problems.append(
                f'train.precision: {train.precision} but {path.name} enables {name}; set it to "auto"'
            )
    return problems


# How a packed micro-batch is laid out for each attention implementation a config can name
# (model.attn_implementation; None is transformers' default, SDPA), so that transformers' own
# packed-sequence detection sees it: SDPA and eager find the samples' bounds from position_ids in
# every row; flash-attention only when the batch is one row. A name missing here cannot be packed
# (the config is refused in one line): its detection path has not been checked.
PACKED_LAYOUT = {None: "rows", "sdpa": "rows", "eager": "rows", "flash_attention_2": "one_row"}


def packing_problem(attn_implementation: str | None) -> str | None:
    """One config-error line when ``data.packing`` cannot be used with this attention, else None."""
    if attn_implementation in PACKED_LAYOUT:
        return None
    checked = ", ".join(str(k) for k in PACKED_LAYOUT if k is not None)
    return (
        f"data.packing: not supported with model.attn_implementation={attn_implementation} "
        f"(packed samples' bounds are checked for {checked} only)"
    )


def _flash_attention_problem() -> str | None:
    """flash_attention_2 runs on CUDA with the flash-attn package only: say so before weights load."""
    import importlib.util

    if not _cuda():
        return "model.attn_implementation: flash_attention_2 needs a CUDA GPU; use sdpa on CPU"
    if importlib.util.find_spec("flash_attn") is None:
        return "model.attn_implementation: flash_attention_2 needs the flash-attn package (pip install flash-attn)"
    return None


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _bf16_gpu() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def load_config(
    path: str | os.PathLike,
    overrides: list[str] | tuple[str, ...] = (),
    check_files: bool = False,
    warn: Callable[[str], None] | None = None,
) -> Settings:
    """Read, override and validate a training YAML. Raises :class:`ConfigError` listing every problem.

    ``check_files`` also checks what the config points at (data files, image folders, model
    folders and their config.json, output_dir; see :mod:`~visionzip_core.training.input_checks`)
    and joins those problems to the same list; ``warn`` receives settings that have no effect.
    Off by default so that shipped configs with placeholder paths validate.
    """
    source = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(source, [f"--config: no such file {path}"]) from None
    except yaml.YAMLError as e:
        raise ConfigError(source, [f"YAML syntax: {e}".replace("\n", " ")]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, ["top level must be a mapping of sections (model:, data:, train:, ...)"])
    problems: list[str] = []
    raw = apply_overrides(raw, list(overrides), problems)

    sections: dict[str, Any] = {}
    for key in raw:
        if key not in _SECTIONS:
            close = difflib.get_close_matches(key, list(_SECTIONS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (sections: {', '.join(_SECTIONS)})"
            problems.append(f"{key}: unknown section{hint}")
    for name, model in _SECTIONS.items():
        value = raw.get(name)
        required = Settings.model_fields[name].is_required()
        if value is None:
            if required:
                problems.append(f"{name}: required section")
            continue
        if not isinstance(value, dict):
            problems.append(f"{name}: must be a mapping (got {type(value).__name__})")
            continue
        try:
            sections[name] = model.model_validate(value)
        except ValidationError as e:
            problems += [_describe(name, err, value) for err in e.errors()]
            # Without the bad keys (defaults instead), the section can still take part in the
            # cross-section checks, so that one run reports contradictions too.
            bad = {err["loc"][0] for err in e.errors() if err["loc"]}
            try:
                sections[name] = model.model_validate({k: v for k, v in value.items() if k not in bad})
            except ValidationError:
                pass
    problems += _contradictions(sections, raw)
    if check_files:
        from visionzip_core.training.input_checks import check_inputs

        found, notes = check_inputs(sections, raw, known_problems=bool(problems))
        for p in found:  # once each: two keys pointing at one folder find the same problem
            if p not in problems:
                problems.append(p)
        for note in notes if warn is not None else ():
            warn(f"warning: {note}")
    if problems:
        from_command_line = _from_command_line(problems, list(overrides))
        if len(from_command_line) == len(problems):
            source = f"the command line (overrides to {source})"
        elif from_command_line:
            source = f"{source} and the command line"
        raise ConfigError(source, problems, from_command_line)
    return Settings(**sections)


def _key_parts(key: str) -> list[str]:
    """``data.train[0].path`` -> ``["data", "train", "0", "path"]``."""
    return [part for part in re.split(r"[.\[\]]+", key) if part]


def _from_command_line(problems: list[str], overrides: list[str]) -> frozenset[int]:
    """Indices of the problems whose key an override set (or lies inside, or contains), so a value
    typed on the command line is not blamed on the YAML file."""
    keys = [_key_parts(item.partition("=")[0]) for item in overrides]
    out = set()
    for index, problem in enumerate(problems):
        head = problem.split(": ", 1)[0] if ": " in problem else ""
        parts = _key_parts(head.split(" ", 1)[0]) if head else []
        if parts and any(k and (parts[: len(k)] == k or k[: len(parts)] == parts) for k in keys):
            out.add(index)
    return frozenset(out)
