"""Rules between the sections of a training config, and what the machine must offer for it.

:func:`contradictions` takes the sections that validated on their own (and the raw YAML, to tell
a value given from a default) and returns one line per problem, each naming its dotted key:
modes and the keys they need, batch sizing, precision and quantization against this machine's
GPU (the CUDA probes) and installed packages, the DeepSpeed JSON against the YAML, packing against
the attention kernel, what wandb may upload.
"""

from __future__ import annotations

import importlib.util
import json
from typing import Any

import torch

from visionzip_core.training.repo_paths import resolve_repo_path
from visionzip_core.training.resume import allow_list_problems
from visionzip_core.training.schema import DeepSpeedSettings, OptimSettings, TrainSettings


def contradictions(s: dict[str, Any], raw: dict) -> list[str]:
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
    if not _cuda():
        return "model.attn_implementation: flash_attention_2 needs a CUDA GPU; use sdpa on CPU"
    if importlib.util.find_spec("flash_attn") is None:
        return "model.attn_implementation: flash_attention_2 needs the flash-attn package (pip install flash-attn)"
    return None


def _cuda() -> bool:
    return torch.cuda.is_available()


def _bf16_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
