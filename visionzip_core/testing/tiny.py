"""Tiny, fully local models of every registered family, for the demo, the tests and CPU benchmarks.

Nothing here touches a model hub: every model is built from a config with random weights and a
tokenizer trained in memory on a fixed word list (:mod:`visionzip_core.testing.tokenizers`), then
saved as the family's real download is laid out. The code that loads these folders is the same
code that loads a real checkpoint, which is the point: tests exercise the user's path.

Which shapes, processor and files a family's tiny model has is the family's own answer
(``ModelFamily.tiny_model`` / ``write_tiny``); this module only pairs it with its tokenizer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from visionzip_core.families import FAMILIES, family_for
from visionzip_core.testing.tokenizers import tiny_tokenizer


def tiny_model(family: str, seed: int = 0, **shape: Any) -> tuple[nn.Module, Any]:
    """A random tiny model of ``family`` (a family name or model_type) and its processor, in
    memory; ``shape``: the family's size options (LLaVA's ``image_size``, ``patch_size``,
    ``vision_layers``)."""
    fam = family_for(family)
    return fam.tiny_model(tiny_tokenizer(fam.tiny_tokenizer), seed, **shape)


def write_tiny(family: str, out_dir: str | os.PathLike, seed: int = 0, **shape: Any) -> Path:
    """Write a random tiny model of ``family`` (a family name or model_type) into ``out_dir``, laid
    out like the family's real download; returns the folder. Deterministic for a seed."""
    fam = family_for(family)
    return fam.write_tiny(tiny_tokenizer(fam.tiny_tokenizer), out_dir, seed, **shape)


def build_tiny_pretrain_parts(out_dir: str | os.PathLike, seed: int = 0, **shape: Any) -> tuple[Path, Path]:
    """Stage 1's inputs (a tiny vision-tower folder and a tiny LLM folder under ``out_dir``) for the
    family that assembles its model from parts; returns ``(vision_dir, llm_dir)``."""
    fam = next(f for f in FAMILIES if f.assembles)
    return fam.write_tiny_parts(tiny_tokenizer(fam.tiny_tokenizer), out_dir, seed, **shape)
