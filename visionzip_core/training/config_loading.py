"""Loading a training YAML: read, override, validate the whole, before any weights load.

``load_config(path, overrides)`` reports every problem at once in one
:class:`~visionzip_core.training.schema.ConfigError`: unknown keys (with a suggestion), wrong
types, and contradictions between sections (:mod:`~visionzip_core.training.config_rules`), each
named by its dotted key (``train.save_steps``). What the config points at (files, folders, model
configs) is checked only with ``check_files=True``, as the entry point does, so that a shipped
config with placeholder paths still validates (:mod:`~visionzip_core.training.input_checks`).

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
from typing import Any

import yaml
from pydantic import ValidationError

from visionzip_core.families import ModelFamily, family_for, stage1_family
from visionzip_core.model_names import BUILTIN_PREFIX, BUILTINS, cache_root, resolve_model_path
from visionzip_core.training.config_rules import contradictions
from visionzip_core.training.input_checks import check_inputs
from visionzip_core.training.schema import SECTIONS, ConfigError, Settings


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
        if key not in SECTIONS:
            close = difflib.get_close_matches(key, list(SECTIONS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (sections: {', '.join(SECTIONS)})"
            problems.append(f"{key}: unknown section{hint}")
    for name, model in SECTIONS.items():
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
    problems += contradictions(sections, raw)
    # The rules read only keys the YAML gives; the family's defaults fill in what it leaves out
    # before the input checks judge the data against the model. A builtin: test model is built
    # (with check_files) only for a config that is right so far.
    family = model_family_of(sections, build=check_files and not problems)
    if family is not None and "data" in sections:
        sections["data"] = with_family_defaults(sections["data"], raw, family)
    if check_files:
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
        model = SECTIONS[section]
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


def model_family_of(sections: dict[str, Any], build: bool) -> ModelFamily | None:
    """The family of the model a config trains, read from its ``config.json`` (no weights): stage
    1's family in pretrain mode, else the family of ``model.name_or_path``. A ``builtin:`` model is
    built first only with ``build``. None when it cannot be told yet (no folder, an unreadable or
    unsupported config.json): the input checks name that problem."""
    model, train = sections.get("model"), sections.get("train")
    if model is None or train is None:
        return None
    if train.mode == "pretrain":
        return stage1_family()
    name = model.name_or_path
    if not name:
        return None
    if name.startswith(BUILTIN_PREFIX) and not build:
        key = name[len(BUILTIN_PREFIX) :]
        folder = cache_root() / "builtin" / key if key in BUILTINS else None
    else:
        try:
            folder = Path(resolve_model_path(name))
        except ValueError:  # an unknown builtin: the input checks list the known ones
            return None
    try:
        return family_for(json.loads((folder / "config.json").read_text())["model_type"])
    except (TypeError, OSError, ValueError, KeyError):
        return None


def with_family_defaults(data, raw: dict, family: ModelFamily):
    """``data`` with the family's own defaults (:attr:`ModelFamily.data_defaults`) for the keys the
    YAML leaves out: e.g. a family prompted through its chat template takes HF ``messages``
    rendered by that template, images where the sample puts them, at native resolution. Applied
    here once, whether or not the input checks run, so one YAML always trains the same way."""
    given = raw["data"] if isinstance(raw.get("data"), dict) else {}
    update = {key: value for key, value in family.data_defaults.items() if key not in given}
    return data.model_copy(update=update) if update else data
