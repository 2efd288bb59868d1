"""What a resumed run must share with the run that wrote its checkpoint, and which folders a run may use.

Every checkpoint holds ``run_settings.json``: the validated settings with the values they resolve
to on this machine (``train.precision`` after ``auto``, absolute data paths) and a few derived
values (``world_size``, ``deepspeed.zero_stage``, ``data.train_samples``). On resume the current
run's record is compared key by key (dotted keys, ``data.train[0].weight``) and every difference
is reported at once, before any weights load. Keys fall in three groups:

  - ``FREE_KEYS``: how a run is observed, stored or scheduled, never what one step computes
    (logging, saving, evaluation, wandb, export, loader workers, the output folder itself, the
    attention kernel and activation recomputation, which compute the same function). They change
    freely. ``train.max_steps``/``train.epochs`` are free too: a longer run trains on (the learning
    rate follows the new schedule); a target below the checkpoint's step is refused.
  - ``LAYOUT_KEYS``: the checkpoint's parameters or its partitioning depend on them, so DeepSpeed
    cannot load it under another value. They can never change on resume.
  - everything else (learning rates, schedule, batch sizes, data, seeds, VisionZip, model paths,
    ...) must match unless named in ``train.resume_allow_changes``; allowed changes are logged.

New settings fall in the last group by default: an unlisted key is compared, never ignored.
"""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from visionzip_core.training.schema import Settings

RECORD_FILE = "run_settings.json"

FREE_KEYS = (
    "train.output_dir",
    "train.resume",
    "train.resume_allow_changes",
    "train.max_steps",
    "train.epochs",
    "train.max_nonfinite_steps",
    "train.save_steps",
    "train.save_total_limit",
    "train.eval_steps",
    "train.logging_steps",
    "train.gradient_checkpointing",
    "train.collective_timeout_min",
    "train.tf32",  # a kernel choice, as model.attn_implementation
    "model.attn_implementation",
    "data.val",
    "data.num_workers",
    "data.preflight_num_proc",
    "data.cache_dir",
    "data.check_images",
    "data.max_skip_fraction",
    "deepspeed.config",  # the file's name; its ZeRO stage is compared as deepspeed.zero_stage
    "wandb",
    "export",
    "eval",  # scored after the run, on the export
    "debug",  # records written when test switches were a config section
)

LAYOUT_KEYS = {
    "train.mode": "it decides which parameters are trained and saved",
    "train.tune_vision_tower": "it decides which parameters are trained and saved",
    "train.precision": "the optimizer states are saved in the precision's layout",
    "lora.r": "it sets the adapter's shapes",
    "lora.target_modules": "it sets which adapters exist",
    "world_size": "the data position and the ZeRO partitions are per process",
    "deepspeed.zero_stage": "each ZeRO stage partitions the saved states differently",
}

DERIVED_KEYS = ("world_size", "deepspeed.zero_stage", "data.train_samples")
# Allowing the setting a derived value comes from allows the derived value too.
_DERIVED_FROM = {"data.train_samples": "data.train", "deepspeed.zero_stage": "deepspeed.config"}


class ResumeError(ValueError):
    """A run that cannot start as configured in this folder; one line that says how to proceed."""


class RunFinished(Exception):
    """The run in ``output_dir`` already reached its last step and exported: nothing to do."""


def run_record(settings, *, feature_layer: int, world_size: int, precision: str, zero_stage: int) -> dict:
    """What this run computes, as stored in each checkpoint: ``{"settings": ..., "derived": ...}``.

    ``feature_layer``: the model's own (:attr:`~visionzip_core.training.model_spec.ModelSpec.feature_layer`),
    recorded when ``visionzip.feature_layer`` is left out.
    """
    values = settings.model_dump(mode="json")
    if values["visionzip"]["feature_layer"] is None:
        # Derived from the model: recorded as the layer itself, as runs that set it explicitly
        # (and every record before the key became optional) have it.
        values["visionzip"]["feature_layer"] = feature_layer
    for key in ("dominant_ratio", "contextual_ratio"):  # a count split: recorded as before the keys existed
        if values["visionzip"].get(key) is None:
            values["visionzip"].pop(key, None)
    values["train"]["precision"] = precision
    values["data"] = settings.data.resolve_paths(check=False).model_dump(mode="json")
    values["lora"] = settings.lora_or_default.model_dump(mode="json")  # absent = defaults, compared as such
    derived = {"world_size": world_size, "deepspeed.zero_stage": zero_stage}
    return {"version": 1, "settings": values, "derived": derived}


def read_record(checkpoint: Path) -> dict | None:
    """The record a checkpoint was written with, or None for checkpoints that predate it."""
    path = checkpoint / RECORD_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": [{"c": 1}]}}`` -> ``{"a.b[0].c": 1}``; lists of scalars stay whole."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(node, list) and node and all(isinstance(x, dict) for x in node):
        out = {}
        for i, value in enumerate(node):
            out.update(flatten(value, f"{prefix}[{i}]"))
        return out
    return {prefix: node}


def _covered(key: str, prefixes) -> bool:
    """``key`` is one of ``prefixes`` or lies under one (``data.train`` covers ``data.train[1].path``)."""
    return any(key == p or key.startswith(p + ".") or key.startswith(p + "[") for p in prefixes)


def _layout_reason(key: str) -> str | None:
    return next((why for k, why in LAYOUT_KEYS.items() if _covered(key, [k])), None)


def _flat_record(record: dict) -> dict[str, Any]:
    return {**flatten(record.get("settings", {})), **record.get("derived", {})}


def compare_records(saved: dict, current: dict, allowed: list[str], only: tuple[str, ...] | None = None):
    """``(refused, permitted)``: lists of ``(key, saved value, current value)`` that differ.

    ``only`` limits the comparison to those keys. A key missing on one side (a setting the writing
    version did not have, a derived value not known yet) is skipped, unless it sits in a list (a
    data source was added or removed).
    """
    old, new = _flat_record(saved), _flat_record(current)
    refused, permitted = [], []
    for key in sorted(set(old) | set(new)):
        if only is not None and key not in only:
            continue
        if _covered(key, FREE_KEYS):
            continue
        if (key not in old or key not in new) and "[" not in key:
            continue
        before, after = old.get(key), new.get(key)
        if before == after:
            continue
        named = _covered(key, allowed) or _covered(_DERIVED_FROM.get(key, key), allowed)
        if named and _layout_reason(key) is None:
            permitted.append((key, before, after))
        else:
            refused.append((key, before, after))
    return refused, permitted


def _show(value: Any) -> str:
    return "(none)" if value is None else json.dumps(value)


def check_resume_settings(
    checkpoint: Path, saved: dict, current: dict, allowed: list[str], only: tuple[str, ...] | None = None
) -> list[str]:
    """Raise :class:`ResumeError` listing every refused difference; return one note per allowed change."""
    refused, permitted = compare_records(saved, current, allowed, only)
    if refused:
        lines = []
        for key, before, after in refused:
            why = _layout_reason(key)
            note = f" (cannot change on resume: {why})" if why else ""
            lines.append(f"  - {key}: {_show(before)} in the checkpoint, {_show(after)} now{note}")
        # data.train[0].weight -> data.train: brackets do not survive a YAML flow list on the command line
        changeable = list(dict.fromkeys(k.split("[")[0] for k, _, _ in refused if _layout_reason(k) is None))
        hint = "Keep the checkpoint's values, or start a fresh run in a new train.output_dir"
        if changeable:
            hint += f"; to change them deliberately: train.resume_allow_changes=[{','.join(changeable)}]"
        raise ResumeError(
            f"resuming from {checkpoint}: {len(refused)} setting(s) differ from the run that wrote it:\n"
            + "\n".join(lines)
            + f"\n{hint}"
        )
    return [
        f"resume: {key} changed from {_show(before)} to {_show(after)} (train.resume_allow_changes)"
        for key, before, after in permitted
    ]


def _model_of(annotation) -> type | None:
    """The pydantic model inside ``annotation`` (``X``, ``X | None``, ``list[X]``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def known_key(key: str) -> bool:
    """Whether ``key`` names a setting (or section) of the training config, or a derived value."""
    if key in DERIVED_KEYS:
        return True
    model: type | None = Settings
    for part in key.split("."):
        name = re.sub(r"\[\d+\]$", "", part)
        fields = getattr(model, "model_fields", None)
        if not name or not fields or name not in fields:
            return False
        model = _model_of(fields[name].annotation)
    return True


def allow_list_problems(entries: list[str]) -> list[str]:
    """Config problems in ``train.resume_allow_changes``: unknown keys, keys that can never change."""
    problems = []
    for entry in entries:
        if not known_key(entry):
            problems.append(
                f"train.resume_allow_changes: '{entry}' is not a setting (use dotted keys, e.g. optim.lr_llm)"
            )
        elif (why := _layout_reason(entry)) or any(_covered(k, [entry]) for k in LAYOUT_KEYS):
            why = (
                why
                or "it holds settings that shape the checkpoint ("
                + ", ".join(k for k in LAYOUT_KEYS if _covered(k, [entry]))
                + ")"
            )
            problems.append(f"train.resume_allow_changes: '{entry}' can never change on resume: {why}")
    return problems


# --- Which folders a run may write to -----------------------------------------------------------


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1])


def check_output_dir(
    output_dir: Path, resume: str, resume_from: Path | None, checkpoints: list[Path]
) -> None:
    """Refuse a run that would share ``output_dir`` with another run's outputs.

    Retention keeps the highest step numbers and ``resume: auto`` picks the highest, so a fresh run
    beside an old run's checkpoint-60 would have its own checkpoints deleted and, later, the old
    weights exported under its name. Refusing (rather than moving the old outputs aside) loses
    nothing and leaves no hidden multi-gigabyte copies behind.
    """
    root = output_dir.resolve()
    if resume_from is not None and resume_from.resolve().parent == root:
        newer = [c.name for c in checkpoints if _step_of(c) > _step_of(resume_from)]
        if newer:
            raise ResumeError(
                f"train.resume: {resume_from.name} is older than {', '.join(newer)} in {output_dir}; the "
                f"new saves would mix with those. Move {', '.join(newer)} out of {output_dir}, or resume "
                "from the latest (train.resume=auto)"
            )
        return
    leftovers = [c.name for c in checkpoints]
    leftovers += [name for name in ("final",) if (output_dir / name).is_dir()]
    if resume != "auto" or leftovers:  # auto with only metrics.jsonl: a run killed before its first save
        leftovers += [name for name in ("metrics.jsonl",) if (output_dir / name).is_file()]
    if not leftovers:
        return
    how = "a fresh run (train.resume=never)" if resume == "never" else f"this run (train.resume={resume})"
    cont = " Continue that run with train.resume=auto, or use" if checkpoints else " Use"
    raise ResumeError(
        f"train.output_dir: {output_dir} already holds another run's outputs ({', '.join(leftovers)}); "
        f"{how} would mix with them.{cont} a new train.output_dir, or move those out of it"
    )


def check_step_target(checkpoint: Path, total_steps: int, output_dir: Path, export_enabled: bool) -> bool:
    """Whether the run still trains. Raises :class:`RunFinished` when there is nothing left to do,
    :class:`ResumeError` when the target is below the checkpoint's step. False: export only."""
    step = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
    if total_steps < step:
        raise ResumeError(
            f"train.max_steps: this run would end at step {total_steps}, but {checkpoint} is at step {step}; "
            f"set train.max_steps >= {step} to continue it, or use a new train.output_dir"
        )
    if total_steps > step:
        return True
    final = output_dir / "final"
    if final.is_dir() or not export_enabled:
        where = f"; the model is in {final}" if final.is_dir() else ""
        raise RunFinished(
            f"{output_dir} is finished: step {step}/{total_steps}{where}. Nothing to do; raise "
            "train.max_steps (or train.epochs) to train on, or use a new train.output_dir for a new run"
        )
    return False
