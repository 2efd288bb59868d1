"""Checks of what a training config points at, before any weights load: files, folders, model configs.

:func:`check_inputs` reads only small files (``config.json``, directory entries), never weights
or samples. It returns ``(problems, warnings)``, each line naming its dotted key, so that
:func:`~visionzip_core.training.config_loading.load_config` reports them in one list together with
the schema problems (a typo and a split that does not fit the tower are both reported at once).
Warnings name settings that have no effect in the chosen mode.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from visionzip_core.capture import resolve_feature_layer
from visionzip_core.families import UnsupportedModel, family_for, ratio_takers, stage1_family
from visionzip_core.model_folders import MODEL, check_model_folder
from visionzip_core.model_names import BUILTIN_PREFIX, BUILTINS, cache_root, resolve_model_path
from visionzip_core.training.model_spec import read_config
from visionzip_core.training.schema import ConfigError


def check_inputs(
    sections: dict[str, Any], raw: dict, known_problems: bool = False
) -> tuple[list[str], list[str]]:
    """``(problems, warnings)`` for the sections that validated (``sections``, the family's data
    defaults already applied by the loader) and the raw YAML.

        ``known_problems``: the schema stage already found some; nothing is built then.
    """
    problems: list[str] = []
    warnings: list[str] = []
    model, train, data, vz = (sections.get(k) for k in ("model", "train", "data", "visionzip"))
    if data is not None:
        problems += _data_paths(data)
    if train is not None:
        problems += _output_dir(train.output_dir)
    if model is not None and train is not None:
        # A builtin: test model is built on first use; not for a config that is already wrong.
        tower = _model_folders(model, train.mode, problems, build=not known_problems)
        if tower is not None and vz is not None and vz.enabled:
            problems += _visionzip_fits(vz, *tower)
        if tower is not None and data is not None:
            problems += _template_fits(data, tower[0])
            problems += _aspect_ratio_fits(data, tower[0], train.mode)
            problems += _packing_fits(data, *tower)
    if train is not None:
        warnings += _no_effect(sections, raw)
    return problems, warnings


def _data_paths(data) -> list[str]:
    problems = []
    resolved = data.resolve_paths(check=False)
    for split in ("train", "val"):
        for i, src in enumerate(getattr(resolved, split)):
            key = f"data.{split}[{i}]"
            path = Path(src.path)
            if not path.exists():
                problems.append(f"{key}.path: no such file {path}")
            elif not path.is_file():
                problems.append(f"{key}.path: {path} is a folder; give the .json/.jsonl file")
            elif path.stat().st_size == 0:
                problems.append(f"{key}.path: {path} is empty (0 bytes)")
            elif not os.access(path, os.R_OK):
                problems.append(f"{key}.path: {path} is not readable (permissions)")
            if src.image_folder is not None:
                folder = Path(src.image_folder)
                if not folder.exists():
                    problems.append(f"{key}.image_folder: no such folder {folder}")
                elif not folder.is_dir():
                    problems.append(f"{key}.image_folder: {folder} is a file, not a folder")
    return problems


def _output_dir(output_dir: str) -> list[str]:
    path = Path(os.path.expanduser(output_dir))
    if path.exists() and not path.is_dir():
        return [f"train.output_dir: {path} is a file; give a folder"]
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return [f"train.output_dir: {existing} is a file, so {path} cannot be created"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"train.output_dir: cannot write in {existing} (permissions)"]
    return []


def _model_folders(model, mode: str, problems: list[str], build: bool) -> tuple[Any, Any] | None:
    """Checks each model folder; returns ``(family, config of the folder holding the tower)`` or None."""
    roles = (
        {"vision_tower": "vision", "language_model": "llm"} if mode == "pretrain" else {"name_or_path": MODEL}
    )
    configs = {}
    for key, role in roles.items():
        name = getattr(model, key)
        if not name:
            continue  # reported by the schema stage
        path = _model_folder(name, f"model.{key}", problems, build)
        if path is None:
            continue
        try:
            config = read_config(path, model.trust_remote_code)
        except Exception as err:  # a broken config.json: JSONDecodeError, ValueError, OSError, KeyError
            problems.append(
                f"model.{key}: cannot read {path}/config.json ({' '.join(str(err).split())[:200]})"
            )
            continue
        if mode == "pretrain" and (refused := _no_stage1(config)):
            problems.append(refused)
            continue
        found = check_model_folder(path, role, f"model.{key}", config)
        problems += found
        if not found:
            configs[key] = config
    if mode == "pretrain":
        cfg = configs.get("vision_tower")
        return None if cfg is None else (stage1_family(), cfg)
    cfg = configs.get("name_or_path")
    return None if cfg is None else (family_for(cfg), cfg)


def _model_folder(name: str, key: str, problems: list[str], build: bool) -> str | None:
    key_name = name[len(BUILTIN_PREFIX) :] if name.startswith(BUILTIN_PREFIX) else None
    if key_name is not None and not build and not (cache_root() / "builtin" / key_name).is_dir():
        if key_name not in BUILTINS:
            problems.append(
                f"{key}: unknown model {name!r}; built-in models: "
                + ", ".join(BUILTIN_PREFIX + k for k in BUILTINS)
            )
        return None
    try:
        path = Path(resolve_model_path(name))
    except ValueError as err:  # an unknown builtin: name
        problems.append(f"{key}: {err}")
        return None
    if not path.is_dir():
        problems.append(f"{key}: no such model folder {path} (edit the config or override {key}=/path)")
        return None
    if not (path / "config.json").is_file():
        problems.append(f"{key}: {path} has no config.json (not a transformers model folder)")
        return None
    return str(path)


def _no_stage1(config) -> str | None:
    """A config of a family that is never assembled from parts (qwen2.5-vl ships its merger trained)."""
    try:
        family = family_for(config)
    except UnsupportedModel:
        return None  # a CLIP tower or an LLM: stage 1's own parts
    if family.assembles:
        return None
    return (
        f"train.mode: pretrain is not supported for {family.name} (stage 1 assembles a {stage1_family().name} "
        "model from a CLIP tower and an LLM); use projector, finetune or lora on the checkpoint"
    )


def _packing_fits(data, family, config) -> list[str]:
    """Packing restarts 1-D position ids per sample; a family that cannot keep packed samples apart
    says why (:meth:`~visionzip_core.families.ModelFamily.packing_refusal`)."""
    reason = family.packing_refusal(config) if data.packing else None
    return [] if reason is None else [f"data.packing: not supported for {family.name} ({reason})"]


def _template_fits(data, family) -> list[str]:
    if data.template in family.templates:
        return []
    return [
        f"data.template: {data.template} does not apply to {family.name}, which is trained on "
        f"{' or '.join(family.templates)}: use {family.templates[0]} (the default for this family)"
    ]


def _aspect_ratio_fits(data, family, mode: str) -> list[str]:
    """The values the family's processor takes (:attr:`ModelFamily.aspect_ratios`): ``anyres``
    tiles for a tiling model, ``native`` keeps each image's own size for a native-resolution one."""
    if data.image_aspect_ratio in family.aspect_ratios:
        return []
    what = "the model stage 1 (pretrain) builds" if mode == "pretrain" else "the model of model.name_or_path"
    return [
        f"data.image_aspect_ratio: {data.image_aspect_ratio} does not apply to {family.name}, {what}: "
        f"use {', '.join(family.aspect_ratios[:-1])} or {family.aspect_ratios[-1]}"
    ]


def _visionzip_fits(vz, family, config) -> list[str]:
    """The split and feature layer against the tower the family reads from ``config``."""
    problems = []
    num_layers, model_layer = family.vision_layers(config), family.feature_layer(config)
    if vz.uses_ratios:
        # A per-image budget: no tower-wide count to check against. Each image's own split is
        # checked when its tokens are counted (a bad sample naming the image), before training.
        if not family.takes_ratios:
            return [
                f"visionzip.dominant_ratio: only for {ratio_takers()} (a per-image budget for towers whose token "
                f"count follows the image size); {family.name} takes visionzip.dominant and contextual counts"
            ]
        if vz.feature_layer is None:
            return []
    elif vz.feature_layer is None:  # derived: the model's own layer
        try:
            vz.core(model_layer).check_fits(family.tower_tokens(config))
        except ValueError as err:
            return [str(err)]
        return []
    try:
        chosen = resolve_feature_layer(vz.feature_layer, num_layers)
        if isinstance(model_layer, int) and chosen != resolve_feature_layer(model_layer, num_layers):
            problems.append(
                f"visionzip.feature_layer: {vz.feature_layer} differs from the model's vision_feature_layer "
                f"{model_layer}, the layer its projector reads; use {model_layer}"
            )
    except ValueError as err:
        problems.append(str(err).replace("visionzip.feature_layer=", "visionzip.feature_layer: "))
    if vz.uses_ratios:
        return problems
    stock = family.tower_tokens(config)
    try:
        vz.core(model_layer).check_fits(stock)
    except ValueError as err:
        problems.append(str(err))
    return problems


def _given(raw: dict, section: str, key: str) -> bool:
    return isinstance(raw.get(section), dict) and key in raw[section]


def _no_effect(sections: dict[str, Any], raw: dict) -> list[str]:
    train, optim, data = sections.get("train"), sections.get("optim"), sections.get("data")
    out = []
    if optim is not None:
        if _given(raw, "optim", "lr_vision") and optim.lr_vision > 0 and not train.tune_vision_tower:
            out.append(
                "optim.lr_vision: has no effect without train.tune_vision_tower=true (the vision tower is frozen)"
            )
        if _given(raw, "optim", "lr_llm") and optim.lr_llm > 0 and train.mode in ("projector", "pretrain"):
            out.append(f"optim.lr_llm: has no effect in {train.mode} mode (the LLM is frozen)")
    if _given(raw, "train", "epochs") and train.epochs is not None and train.max_steps is not None:
        out.append(f"train.epochs: ignored, train.max_steps={train.max_steps} sets the length")
    if train.eval_steps is not None and data is not None and not data.val:
        out.append("train.eval_steps: no data.val sources, so no validation runs")
    evaluation, export = sections.get("eval"), sections.get("export")
    if evaluation is not None and evaluation.generate_accuracy:
        if data is not None and not data.val:
            out.append("eval.generate_accuracy: no data.val sources, so nothing is scored")
        if export is not None and (not export.enabled or (train.mode == "lora" and not export.merge_lora)):
            out.append(
                "eval.generate_accuracy: has no effect without a full exported model (it scores final/)"
            )
    return out


def check_global_batch(num_samples: int, train, world: int, warn) -> None:
    """Refuse a global batch larger than the training split; warn when padding repeats many samples.

    The sampler pads each epoch to a multiple of the global batch by repeating samples, so a
    batch of 1000 on 330 samples would train on every sample three times per step.

    Raises:
        ConfigError: the global batch exceeds ``num_samples``.
    """
    batch = train.per_device_batch_size * train.grad_accum_steps * world
    shape = f"{train.per_device_batch_size} x {train.grad_accum_steps} x {world} processes"
    if batch > num_samples:
        raise ConfigError(
            "the config, for its data",
            [
                f"train.per_device_batch_size: a global batch of {batch} ({shape}) exceeds the "
                f"{num_samples} samples of data.train; lower it (or train.grad_accum_steps)"
            ],
        )
    padded = -(-num_samples // batch) * batch
    if padded - num_samples > 0.1 * num_samples:
        warn(
            f"warning: train.per_device_batch_size: a global batch of {batch} ({shape}) pads each epoch of "
            f"{num_samples} samples to {padded} by repeating {padded - num_samples}"
        )
