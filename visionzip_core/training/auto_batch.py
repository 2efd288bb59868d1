"""``train.per_device_batch_size: auto`` and ``train.gradient_checkpointing: auto``: the planner
(:mod:`visionzip_core.bench.planner`) picks them at start-up for this GPU, this data and this budget.

- **Fresh run on a GPU:** the planner simulates the run's own model (config.json, no weights) at
  the run's visual-token budget, ZeRO stage and world size, with the data's text lengths from the
  preflight (memory at the longest, time at the mean), against ``total_memory`` of this GPU; it
  keeps the fastest setting that fits.
- **No GPU, or a family the simulation does not run:** the config's stated fallback
  (``train.auto_fallback_batch_size`` / ``train.auto_fallback_checkpointing``).
- **Resume:** the values the checkpoint's run recorded (its ``run_settings.json``), so that a
  resumed run keeps the data position and the batch it trained with, on whatever GPU it resumes.

Every path ends in one start line saying what was chosen and why. The resolved values replace
``auto`` in the settings and in the run record that each checkpoint stores.
"""

from __future__ import annotations

from pathlib import Path

from visionzip_core.bench import planner
from visionzip_core.training.resume import read_record

AUTO = "auto"
KEYS = ("per_device_batch_size", "grad_accum_steps", "gradient_checkpointing")


class AutoBatchError(ValueError):
    """``auto`` cannot give a whole accumulation for the configured global batch; one line."""


def uses_auto(train) -> bool:
    return AUTO in (train.per_device_batch_size, train.gradient_checkpointing)


def with_train(settings, values: dict):
    """``settings`` with ``train`` fields replaced (the settings are frozen; a copy)."""
    return settings.model_copy(update={"train": settings.train.model_copy(update=values)})


def keep_from_checkpoint(settings, checkpoint: Path | None):
    """``(settings, line)``: on resume, the ``auto`` fields take the values the checkpoint's run
    recorded; ``line`` is None when nothing was taken (no auto, no checkpoint or no record)."""
    if checkpoint is None or not uses_auto(settings.train):
        return settings, None
    saved = read_record(checkpoint)
    recorded = (saved or {}).get("settings", {}).get("train", {})
    values = {}
    if settings.train.per_device_batch_size == AUTO:
        values.update(
            {k: recorded[k] for k in ("per_device_batch_size", "grad_accum_steps") if k in recorded}
        )
    if settings.train.gradient_checkpointing == AUTO and "gradient_checkpointing" in recorded:
        values["gradient_checkpointing"] = recorded["gradient_checkpointing"]
    if not values or AUTO in values.values():
        return settings, None
    return with_train(settings, values), f"auto: kept from {checkpoint.name}: {_describe(values)}"


def resolve(
    settings, spec, text_lengths: list[int], world_size: int, gpu_memory_bytes: int | None, zero_stage: int
):
    """``(settings, line)`` with every ``auto`` replaced; ``line`` (None without auto) says what and why.

    ``spec``: the run's :class:`~visionzip_core.training.model_spec.ModelSpec`.
    ``text_lengths``: text tokens per training sample (image tokens excluded), from the preflight.
    ``gpu_memory_bytes``: this GPU's total memory, None on a CPU.
    """
    t = settings.train
    if not uses_auto(t):
        return settings, None
    micro_auto, ckpt_auto = t.per_device_batch_size == AUTO, t.gradient_checkpointing == AUTO
    global_batch = (
        t.global_batch_size if micro_auto else t.per_device_batch_size * t.grad_accum_steps * world_size
    )
    why = None
    if gpu_memory_bytes is None:
        why = "no GPU"
    else:
        try:
            model = _plan_model(spec)
        except ValueError as e:
            why = str(e)
    if why is not None:
        values = {}
        if micro_auto:
            values.update(
                _whole(global_batch, world_size, t.auto_fallback_batch_size, "train.auto_fallback_batch_size")
            )
        if ckpt_auto:
            values["gradient_checkpointing"] = t.auto_fallback_checkpointing
        return with_train(settings, values), f"auto: {why}: the stated fallback {_describe(values)}"
    if global_batch % world_size:
        raise AutoBatchError(
            f"train.global_batch_size: {global_batch} is not a multiple of the {world_size} processes"
        )
    hardware = planner.Hardware(
        gpus=world_size, memory_gib=gpu_memory_bytes / planner.GIB, gpu_name="this GPU"
    )
    text = planner.TextLengths.from_lengths(text_lengths, "the run's data")
    tokens = _budget(settings, model)
    stages = (zero_stage,) if zero_stage in planner.ZERO_STAGES else planner.ZERO_STAGES
    mode = "finetune_vision" if t.mode == "finetune" and t.tune_vision_tower else t.mode
    row = planner.plan(
        model,
        hardware,
        mode,
        [planner.stock_budget(model.budgets), tokens]
        if tokens != planner.stock_budget(model.budgets)
        else [tokens],
        global_batch,
        text,
        stages=stages,
        checkpointing=(False, True) if ckpt_auto else (bool(t.gradient_checkpointing),),
        micro_batch=None if micro_auto else t.per_device_batch_size,
    )[-1]
    values = {}
    if micro_auto:
        values.update(per_device_batch_size=row["micro_batch"], grad_accum_steps=row["grad_accum"])
    if ckpt_auto:
        values["gradient_checkpointing"] = row["gradient_checkpointing"]
    verdict = "fits" if row["fits"] else "NOTHING FITS, the smallest"
    line = (
        f"auto: {_describe(values)}: {verdict}: predicted {row['memory_gib']:.1f} GiB of "
        f"{hardware.memory_gib:.1f} GiB ({hardware.usable_gib:.1f} usable), {row['step_time_s']:.2f} s/step, "
        f"{row['speedup_vs_stock']:.2f}x stock's best; {row['reason']}"
    )
    return with_train(settings, values), line


def _whole(global_batch: int, world_size: int, micro: int, key: str) -> dict:
    if global_batch % (micro * world_size):
        raise AutoBatchError(
            f"train.global_batch_size: {global_batch} is not a multiple of {key}={micro} x {world_size} processes"
        )
    return {"per_device_batch_size": micro, "grad_accum_steps": global_batch // (micro * world_size)}


def _describe(values: dict) -> str:
    parts = []
    if "per_device_batch_size" in values:
        parts.append(f"per_device_batch_size={values['per_device_batch_size']}")
    if "grad_accum_steps" in values:
        parts.append(f"grad_accum_steps={values['grad_accum_steps']}")
    if "gradient_checkpointing" in values:
        parts.append(f"gradient_checkpointing={str(values['gradient_checkpointing']).lower()}")
    return ", ".join(parts)


def _plan_model(spec):
    """The planner's view of the run's model (a :class:`~visionzip_core.training.model_spec.ModelSpec`),
    from its config; ValueError when it cannot plan it."""
    if spec.assembled:
        raise ValueError("pretrain mode assembles its model; the planner reads a model folder")
    return planner.model_from_config(spec.config, Path(spec.path).name)


def _budget(settings, model) -> int:
    """The run's visual-token budget as a key of ``model.budgets`` (added with its split)."""
    vz = settings.visionzip
    if not vz.enabled:
        return planner.stock_budget(model.budgets)
    if getattr(vz, "dominant_ratio", None) is not None:
        raise ValueError("a ratio budget is not simulated for this family")
    tokens = vz.dominant + vz.contextual
    model.budgets.setdefault(tokens, (vz.dominant, vz.contextual))
    return tokens


def text_lengths(lengths: list[int], image_tokens, image_size: tuple[int, int] | None) -> list[int]:
    """Text tokens per sample from the preflight's token lengths (image tokens included): one
    image's count taken off (where the count depends on the size: ``image_size``'s, the family's
    benchmark picture, ``ModelFamily.bench_image``; none taken off when it has none, so the text
    errs long and the planned memory high)."""
    if not getattr(image_tokens, "per_size", False):
        count = image_tokens()
    else:
        count = 0 if image_size is None else image_tokens(image_size)
    return [max(0, n - count) for n in lengths]
