"""Opening a model for a command, once: name -> folder -> family -> budget -> weights.

``generate``, ``evaluate`` and ``show_tokens`` all go through here, in two steps so that every
cheap check runs before any weights load:

1. :func:`open_model_folder` resolves ``--model`` (a folder, a hub id or ``builtin:*``), reads
   its ``config.json``, checks the folder has every piece a model loads (weights, tokenizer,
   image processor, a supported ``model_type``) and finds the family. No tensors are read.
2. :meth:`ModelFolder.load` loads the weights (checked: no missing, misshapen or non-finite
   tensors) and the processor.

The budget a command runs at is :meth:`ModelFolder.budget`: a flag given wins, then the split a
trained export records, then the family's default. Every refusal is a :class:`CommandError`, one
line naming the flag and the folder; :func:`fail` prints it as ``error: ...`` and gives exit
status 2.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from visionzip_core.config import (
    VisionZipConfig,
    one_line,
    read_visionzip_config,
    settings_from_flags,
)
from visionzip_core.families import UnsupportedModel, family_for, ratio_flags_refusal
from visionzip_core.families.base import ModelFamily
from visionzip_core.model_folders import MODEL, check_model_folder
from visionzip_core.model_names import resolve_model_path
from visionzip_core.weight_checks import WeightsError

DTYPES = ("float32", "bfloat16", "float16")


class CommandError(ValueError):
    """A refusal a command prints as one line (``error: <message>``) before exiting with 2."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def fail(message: str | Exception) -> int:
    """Print ``error: <message>`` on one line to stderr; the exit status of a refused command."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def add_model_flags(parser: argparse.ArgumentParser, *, default: str | None = None) -> None:
    """``--model`` (required unless ``default``), ``--dtype``, ``--device`` and the budget flags,
    worded the same in every command that opens a model."""
    parser.add_argument(
        "--model",
        required=default is None,
        default=default,
        help="model folder of any supported family (a download or a run's final/), hub id or builtin:*"
        + (f" (default {default})" if default else ""),
    )
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="weights dtype (default float32)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")


def budget_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The four budget flags of ``args`` (:func:`visionzip_core.config.add_budget_flags`; None:
    left out)."""
    return {k: getattr(args, k) for k in ("dominant", "contextual", "dominant_ratio", "contextual_ratio")}


def split_text(vz: VisionZipConfig) -> str:
    """``"dominant 54 + contextual 10"`` or ``"dominant 45% + contextual 5% of each image"``."""
    if vz.uses_ratios:
        return f"dominant {vz.dominant_ratio:.0%} + contextual {vz.contextual_ratio:.0%} of each image"
    return f"dominant {vz.dominant} + contextual {vz.contextual}"


@dataclass
class ModelFolder:
    """A model folder a command opened: checked, its family known, no weights read yet."""

    #: What ``--model`` said, and the folder (or hub id) it resolved to.
    name: str
    path: str
    #: The folder's transformers config.
    config: Any
    family: ModelFamily
    #: The VisionZip split a trained export records (None: a stock folder).
    recorded: VisionZipConfig | None

    def refuse_video(self, given: bool, flag: str = "--video") -> None:
        """A video for a family that takes images only is refused before loading."""
        if given and not self.family.takes_video:
            raise CommandError(f"{flag}: {self.family.name} takes images only")

    def budget(self, flags: dict[str, Any], doing: str = "running") -> VisionZipConfig:
        """The split to run at: each budget flag given (``dominant``, ``contextual``,
        ``dominant_ratio``, ``contextual_ratio``; None = left out) replaces the recorded split, else
        the family's default. Ratios are refused for a family that takes counts; a split other than
        the one an export was trained at is said on stderr (``doing``: what the command does)."""
        if any(flags.get(k) is not None for k in ("dominant_ratio", "contextual_ratio")):
            if not self.family.takes_ratios:
                raise CommandError(ratio_flags_refusal(self.family))
        try:
            settings = settings_from_flags(self.recorded, self.family.default_budget, **flags)
        except ValueError as err:
            raise CommandError(one_line(err)) from None
        if self.recorded is not None and split_text(settings) != split_text(self.recorded):
            # A trained export learnt on its own split; another one is a different model input.
            print(
                f"note: this export was trained at {split_text(self.recorded)}; {doing} at "
                f"{split_text(settings)} instead",
                file=sys.stderr,
            )
        return settings

    def processor(self):
        """A fresh stock processor (VisionZip adapts a processor in place: one per budget)."""
        try:
            return self.family.load_processor(self.path)
        except (OSError, ValueError) as err:
            raise CommandError(f"--model: cannot load the processor of {self.path} ({err})") from None

    def load(self, dtype: str, device: str) -> torch.nn.Module:
        """The model's checked weights in ``dtype`` on ``device``, in eval mode."""
        try:
            model = self.family.load(self.path, dtype=getattr(torch, dtype))
        except WeightsError as err:
            raise CommandError(str(err)) from None
        return model.to(device).eval()


def open_model_folder(name: str, flag: str = "--model") -> ModelFolder:
    """Resolve ``name`` and check the folder before anything heavy; :class:`CommandError` naming
    ``flag`` and the folder when it is not a model of a supported family."""
    try:
        path = resolve_model_path(name)
    except ValueError as err:
        raise CommandError(f"{flag}: {err}") from None
    config = None
    if Path(path, "config.json").is_file():
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError, KeyError) as err:
            why = " ".join(str(err).split())[:200]
            raise CommandError(f"{flag}: cannot read {path}/config.json ({why})") from None
    problems = check_model_folder(path, MODEL, flag, config)
    if problems:
        raise CommandError("; ".join(problems))
    try:
        family = family_for(config)
    except UnsupportedModel as err:
        raise CommandError(f"{flag}: {path}: {err}") from None
    return ModelFolder(name, path, config, family, read_visionzip_config(config))
