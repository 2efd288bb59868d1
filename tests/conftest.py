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
    from visionzip_core.testing.tiny import write_tiny

    path = tmp_path_factory.mktemp("tiny-llava")
    write_tiny("llava-1.5", path)
    return path


@pytest.fixture(scope="session")
def tiny_llava_next_dir(tmp_path_factory):
    """A saved llava-hf LLaVA-NeXT folder: 112 px crops (64 patches + CLS), llava-v1.6's five
    tilings of the crop side (1x2, 2x1, 2x2, 3x1, 1x3), and its LlavaNextProcessor."""
    from visionzip_core.testing.tiny import write_tiny

    path = tmp_path_factory.mktemp("tiny-llava-next")
    write_tiny("llava-next", path)
    return path


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl_dir(tmp_path_factory):
    """A folder laid out like the Qwen/Qwen2.5-VL-7B-Instruct download: random tiny Qwen2.5-VL (4
    windowed vision blocks, 2x2 merge units of 14 px patches) and its processor."""
    from visionzip_core.testing.tiny import write_tiny

    return write_tiny("qwen2.5-vl", tmp_path_factory.mktemp("tiny-qwen2.5-vl") / "model")


@pytest.fixture(scope="session")
def tiny_qwen2_vl_dir(tmp_path_factory):
    """As ``tiny_qwen2_5_vl_dir``, the Qwen/Qwen2-VL-7B-Instruct layout (full attention in every block)."""
    from visionzip_core.testing.tiny import write_tiny

    return write_tiny("qwen2-vl", tmp_path_factory.mktemp("tiny-qwen2-vl") / "model")


@pytest.fixture(scope="session")
def tiny_pretrain_dirs(tmp_path_factory):
    """``(clip_dir, llm_dir)``: a tiny CLIP vision checkpoint and a tiny causal LM, for stage-1."""
    from visionzip_core.testing.tiny import build_tiny_pretrain_parts

    return build_tiny_pretrain_parts(tmp_path_factory.mktemp("tiny-parts"))


# Folders laid out like the real downloads users bring (tests/real_layouts.py says which).
@pytest.fixture(scope="session")
def full_clip_dir(tmp_path_factory):
    """openai/clip-vit-large-patch14-336's layout: a whole CLIPModel in pytorch_model.bin."""
    from real_layouts import write_full_clip_folder

    return write_full_clip_folder(tmp_path_factory.mktemp("clip-full"))


@pytest.fixture(scope="session")
def vicuna_dir(tmp_path_factory):
    """lmsys/vicuna-7b-v1.5's layout: sharded .bin, a 4.31 config.json, tokenizer.model only."""
    from real_layouts import write_vicuna_folder

    return write_vicuna_folder(tmp_path_factory.mktemp("vicuna"))


@pytest.fixture(scope="session")
def llava_hf_4x_dir(tmp_path_factory):
    """llava-hf/llava-1.5-7b-hf as transformers 4.x saved it: old key layout and config."""
    from real_layouts import write_llava_hf_4x_folder

    return write_llava_hf_4x_folder(tmp_path_factory.mktemp("llava-hf-4x"))


@pytest.fixture(scope="session")
def llava_next_hf_4x_dir(tmp_path_factory):
    """llava-hf/llava-v1.6-vicuna-7b-hf as transformers 4.x saved it: old key layout and config."""
    from real_layouts import write_llava_hf_4x_folder

    return write_llava_hf_4x_folder(tmp_path_factory.mktemp("llava-next-hf-4x"), family="llava-next")
