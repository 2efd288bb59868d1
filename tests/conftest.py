"""Shared fixtures: tiny random models built from configs and saved to disk, once per session.

Test tiers (markers registered in pyproject.toml):
  - unmarked: unit and parity tests, seconds in all;      ``pytest -m "not slow"``
  - ``slow``: end-to-end runs of the real entry points;    ``pytest -m slow``
  - ``gpu``: need CUDA; skipped automatically without it.  ``pytest -m gpu``
CI runs everything: ``pytest``.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    """A saved llava-hf folder: random tiny LLaVA-1.5 (112 px, 64 patches + CLS) and its processor."""
    from visionzip_core.tiny import build_tiny_llava

    path = tmp_path_factory.mktemp("tiny-llava")
    build_tiny_llava(path)
    return path


@pytest.fixture(scope="session")
def tiny_pretrain_dirs(tmp_path_factory):
    """``(clip_dir, llm_dir)``: a tiny CLIP vision checkpoint and a tiny causal LM, for stage-1."""
    from visionzip_core.tiny import build_tiny_pretrain_parts

    return build_tiny_pretrain_parts(tmp_path_factory.mktemp("tiny-parts"))
