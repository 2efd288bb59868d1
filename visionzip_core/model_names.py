"""Where a model name points on disk, including the built-in tiny models built on first use.

``builtin:`` names need no network: the model is built from a config with random weights
(:mod:`visionzip_core.testing.tiny`; ``demo-llava`` also pretrains its tower, :mod:`visionzip_core.testing.demo_tower`)
into the cache, once. Everything else (a folder, a hub id) is
returned unchanged for ``from_pretrained``.

Cache root: ``$VISIONZIP_CACHE`` if set, else ``.cache`` in the working directory; built-in
models live under ``<root>/builtin/<name>``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from visionzip_core.testing.demo_tower import build_demo_llava
from visionzip_core.testing.tiny import build_tiny_pretrain_parts, write_tiny
from visionzip_core.weight_checks import progress_bars_on_terminal_only

BUILTIN_PREFIX = "builtin:"


def _build_tiny_part(part: str) -> Callable[[Path], None]:
    def build(out: Path) -> None:
        with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
            clip_dir, llm_dir = build_tiny_pretrain_parts(scratch)
            os.rename(clip_dir if part == "clip" else llm_dir, out)

    return build


BUILTINS: dict[str, Callable[[Path], None]] = {
    "tiny-llava": lambda out: write_tiny("llava-1.5", out),  # LlavaForConditionalGeneration + LlavaProcessor
    "tiny-clip": _build_tiny_part("clip"),  # CLIPVisionModel + image processor (stage-1 input)
    "tiny-llm": _build_tiny_part("llm"),  # LlamaForCausalLM + tokenizer (stage-1 input)
    "tiny-llava-next": lambda out: write_tiny(
        "llava-next", out
    ),  # LlavaNextForConditionalGeneration + LlavaNextProcessor
    # tiny-llava with its tower pretrained on demo pictures (about a minute and a half on 2 cores)
    "demo-llava": build_demo_llava,
}


def cache_root() -> Path:
    """``$VISIONZIP_CACHE`` or ``./.cache``."""
    return Path(os.environ.get("VISIONZIP_CACHE") or ".cache")


def resolve_model_path(name: str | os.PathLike) -> str:
    """A path or hub id usable by ``from_pretrained``; ``builtin:<name>`` is built into the cache first.

    Built-ins: ``builtin:tiny-llava``, ``builtin:tiny-clip``, ``builtin:tiny-llm``, ``builtin:tiny-llava-next``,
    ``builtin:demo-llava``. A build goes to a
    temporary folder beside the target and is renamed into place, so a crash never leaves a
    half-written model and concurrent ranks may race safely (the first rename wins).

    Raises:
        ValueError: an unknown ``builtin:`` name.
    """
    name = os.fspath(name)
    if not name.startswith(BUILTIN_PREFIX):
        return name
    key = name[len(BUILTIN_PREFIX) :]
    if key not in BUILTINS:
        raise ValueError(
            f"unknown model {name!r}; built-in models: {', '.join(BUILTIN_PREFIX + k for k in BUILTINS)}"
        )
    target = cache_root() / "builtin" / key
    if target.is_dir():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
    try:
        staged = scratch / key
        with progress_bars_on_terminal_only():  # no "Writing model shards" bar in a piped log
            BUILTINS[key](staged)
        try:
            os.rename(staged, target)
        except OSError:
            if not target.is_dir():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return str(target)
