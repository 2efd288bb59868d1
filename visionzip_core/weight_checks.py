"""Refuse weights that would load silently wrong: unreadable files, absent or extra tensors, NaN/inf.

transformers re-initialises a tensor missing from a checkpoint at random and only warns, drops
unknown tensors, loads NaN weights without a word (the model then generates ''), and reports a
truncated ``model.safetensors`` as a raw ``SafetensorError``. :func:`load_checked` turns each of
these into one :class:`WeightsError` line naming the file (or folder) and the tensor.

Missing/unexpected tensors are judged from ``from_pretrained(..., output_loading_info=True)``:
that report is taken after transformers' own key remapping (llava-hf folders saved by
transformers 4.x) and after its allowances (tied weights, buffers it recomputes such as
``rotary_emb.inv_freq``), so legitimately absent keys are not refused. The NaN/inf scan streams
the safetensors files one tensor at a time (memory: the largest tensor).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch


class WeightsError(ValueError):
    """Weights that cannot be used; one line naming the file or folder and the tensor."""


def safetensors_files(folder: str | os.PathLike) -> list[Path]:
    """The ``*.safetensors`` weight files of a model folder (those of its index when sharded)."""
    root = Path(folder)
    for index in sorted(root.glob("*.safetensors.index.json")):
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise WeightsError(f"{index}: not a readable weight index ({err})") from None
        return [root / name for name in sorted(set(weight_map.values()))]
    return sorted(root.glob("*.safetensors"))


def check_headers(files: list[Path]) -> None:
    """Open each file's header (no tensor data read): truncated or corrupt files fail here.

    Raises:
        WeightsError: ``<file>: not a readable safetensors file (...)``.
    """
    from safetensors import safe_open

    for f in files:
        if not f.is_file():
            raise WeightsError(f"{f}: missing (named by the weight index)")
        try:
            with safe_open(str(f), framework="pt") as handle:
                handle.keys()
        except Exception as err:  # SafetensorError, OSError: the message alone names nothing
            reason = " ".join(str(err).split())[:200]
            raise WeightsError(
                f"{f}: not a readable safetensors file (truncated or corrupt: {reason})"
            ) from None


def check_finite(files: list[Path]) -> None:
    """Stream every floating-point tensor of ``files`` and refuse the first holding NaN or inf.

    Raises:
        WeightsError: ``<file>: tensor <name> holds N NaN/inf values of M``.
    """
    from safetensors import safe_open

    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():
                t = handle.get_tensor(name)
                if not t.is_floating_point() or t.numel() == 0:
                    continue
                # min/max propagate NaN and show inf: one pass, no temporary the size of the
                # tensor (about 40x faster than isfinite(t).all() on bf16 on CPU).
                low, high = torch.aminmax(t)
                if not bool(torch.isfinite(low) & torch.isfinite(high)):
                    bad = int((~torch.isfinite(t)).sum())
                    raise WeightsError(
                        f"{f}: tensor {name} holds {bad} NaN/inf values of {t.numel()}; "
                        "the weights are unusable (a diverged run or a damaged file)"
                    )


def check_loading_info(info: dict[str, Any], folder: str | os.PathLike) -> None:
    """Refuse a load that left tensors missing, unused or of the wrong shape.

    ``info`` is the dict ``from_pretrained(..., output_loading_info=True)`` returns.
    """
    files = safetensors_files(folder) if Path(folder).is_dir() else []
    where = files[0] if len(files) == 1 else folder
    problems = []
    if info.get("missing_keys"):
        names = sorted(info["missing_keys"])
        problems.append(
            f"lacks tensor {names[0]}"
            + (f" (+{len(names) - 1} more)" if len(names) > 1 else "")
            + " (transformers would fill it at random)"
        )
    if info.get("unexpected_keys"):
        names = sorted(info["unexpected_keys"])
        problems.append(
            f"holds tensor {names[0]} that the model does not have"
            + (f" (+{len(names) - 1} more)" if len(names) > 1 else "")
        )
    if info.get("mismatched_keys"):
        name, got, want = sorted(info["mismatched_keys"])[0][:3]
        problems.append(f"tensor {name} has shape {tuple(got)}, the model needs {tuple(want)}")
    if problems:
        raise WeightsError(f"{where}: {'; '.join(problems)}; refusing to load it")


def check_model_files(folder: str | os.PathLike) -> None:
    """Headers and NaN/inf of a local model folder's safetensors files (nothing for other formats)."""
    if Path(folder).is_dir():
        files = safetensors_files(folder)
        check_headers(files)
        check_finite(files)


@contextlib.contextmanager
def progress_bars_on_terminal_only():
    """transformers' progress bars (its per-tensor "Loading weights") only when stderr is a terminal:
    piped into a log file, each bar is a carriage-return line of noise. Restored on exit."""
    from transformers.utils import logging as hf_logging

    quiet = hf_logging.is_progress_bar_enabled() and not sys.stderr.isatty()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet:
            hf_logging.enable_progress_bar()


def load_checked(
    model_class, path: str | os.PathLike, check_files: bool = True, **from_pretrained_kwargs: Any
):
    """``model_class.from_pretrained(path, **kwargs)``, refusing unusable weights (see the module doc).

    ``check_files=False`` skips the file checks (headers, NaN/inf scan) when the caller made them
    already (the trainer: rank 0 alone, before every rank loads); the loading report is still checked.

    Raises:
        WeightsError: one line naming the file (or folder) and the tensor.
    """
    if check_files and Path(path).is_dir():
        check_headers(safetensors_files(path))
    # Mismatched shapes are reported by check_loading_info (transformers' own error names no tensor).
    kwargs = {"ignore_mismatched_sizes": True} | from_pretrained_kwargs
    with progress_bars_on_terminal_only():
        model, info = model_class.from_pretrained(path, output_loading_info=True, **kwargs)
    if from_pretrained_kwargs.get("ignore_mismatched_sizes"):
        info = {**info, "mismatched_keys": set()}
    check_loading_info(info, path)
    if check_files and Path(path).is_dir():
        check_finite(safetensors_files(path))
    return model
