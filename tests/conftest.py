"""Shared fixtures: tiny random models built from configs and saved to disk, once per session.

Test tiers (markers registered in pyproject.toml):
  - unmarked: unit and parity tests, seconds in all;      ``pytest -m "not slow"``
  - ``slow``: end-to-end runs of the real entry points;    ``pytest -m slow``
  - ``gpu``: need CUDA; skipped automatically without it.  ``pytest -m gpu``
CI runs everything: ``pytest``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Commands the tests start run on one thread each (set after torch's import: the suite's own
# process keeps its threads), the same in the warm process that forks most of them
# (tests/warm_python.py) as in the ones started cold: two of them on 2 cores otherwise fight.
os.environ.setdefault("OMP_NUM_THREADS", "1")


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
def tiny_llava_onevision_dir(tmp_path_factory):
    """A folder laid out like the llava-hf/llava-onevision-qwen2-7b-ov-hf download (4.45 keys and
    files): random tiny LLaVA-OneVision (2-layer SigLIP, 64 px crops of 8 x 8 patches, no CLS,
    tilings up to 3 x 3 under anyres_max_2, a 2-layer Qwen2) and its processor files."""
    from visionzip_core.testing.tiny import write_tiny

    return write_tiny("llava-onevision", tmp_path_factory.mktemp("tiny-llava-onevision") / "model")


@pytest.fixture(scope="session")
def family_dirs(tiny_llava_dir, tiny_llava_next_dir, tiny_llava_onevision_dir, tmp_path_factory):
    """``{family: folder}``, each laid out as its download: the session's LLaVA-1.5 and LLaVA-NeXT
    folders, and Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3.5 with 2-3 vision blocks (seed 0), the size
    the training tests run (built once here, not once per module)."""
    from visionzip_core.testing.tiny import write_tiny

    root = tmp_path_factory.mktemp("family-dirs")
    return {
        "llava-1.5": tiny_llava_dir,
        "llava-next": tiny_llava_next_dir,
        "qwen2-vl": write_tiny("qwen2-vl", root / "qwen2-vl", seed=0, vision_depth=2),
        "qwen2.5-vl": write_tiny("qwen2.5-vl", root / "qwen2.5-vl", seed=0, vision_depth=2),
        # 3 blocks: DeepStack reads blocks 1 and 2, so two levels train and travel with the merger
        "qwen3-vl": write_tiny("qwen3-vl", root / "qwen3-vl", seed=0, vision_depth=3),
        "qwen3.5": write_tiny("qwen3.5", root / "qwen3.5", seed=0, vision_depth=2),
        "llava-onevision": tiny_llava_onevision_dir,
    }


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


# Two-process runs through the real entry point, shared by the tests that assert on them: each
# torchrun start costs tens of seconds on 2 cores, the same run need not be trained twice.
@pytest.fixture(scope="session")
def zero3_two_process_run(tiny_llava_dir, tmp_path_factory):
    """``(out, overrides)``: 4 fp32 steps of the tiny LLaVA under ZeRO-3, two processes (torchrun),
    weight decay on, no validation. Read it; never train into it."""
    from test_train_e2e import ZERO3_FP32_STEPS, _base, train

    out = tmp_path_factory.mktemp("zero3-two-process") / "run"
    overrides = (
        _base(tiny_llava_dir, out) + ZERO3_FP32_STEPS + ["deepspeed.config=configs/deepspeed/zero3.json"]
    )
    train(overrides, launcher="torchrun2")
    return out, overrides


@pytest.fixture(scope="session")
def zero2_two_process_run(tiny_llava_dir, tmp_path_factory):
    """``(out, overrides)``: 3 steps of the tiny LLaVA under ZeRO-2 (demo.yaml's), two processes
    (torchrun), one checkpoint at the end, no validation. Tests may rerun its command (a finished
    run writes nothing), not train further."""
    from test_train_e2e import _base, train

    out = tmp_path_factory.mktemp("zero2-two-process") / "run"
    overrides = _base(tiny_llava_dir, out) + [
        "train.per_device_batch_size=2",
        "train.max_steps=3",
        "train.save_steps=3",
        "data.val=[]",
    ]
    train(overrides, launcher="torchrun2")
    return out, overrides


@pytest.fixture(scope="session")
def base_run(tiny_llava_dir, tmp_path_factory):
    """A finished run of ``test_train_e2e._base`` alone: finetune, demo.yaml's ZeRO-2, one process,
    4 steps, checkpoints at 2 and 4, ``final/``. Read it, or copy it before training into it."""
    from test_train_e2e import _base, train

    out = tmp_path_factory.mktemp("base-run") / "run"
    train(_base(tiny_llava_dir, out))
    return out


@pytest.fixture(scope="session")
def pretrain_run(tiny_pretrain_dirs, tmp_path_factory):
    """A finished stage-1 run (``train.mode=pretrain``, plain captions, 4 steps) assembling LLaVA from
    ``tiny_pretrain_dirs``: test_train_e2e.py's pretrain test and test_llava_next_train.py's stage 2
    (which starts from its export) read it."""
    from test_train_e2e import _base, pretrain_overrides, train

    out = tmp_path_factory.mktemp("pretrain") / "run"
    overrides = _base(Path("unused"), out)[1:] + pretrain_overrides(*tiny_pretrain_dirs)
    train(overrides)
    return out


@pytest.fixture(scope="session")
def wandb_offline_run(tiny_llava_dir, tmp_path_factory):
    """``(out, proc)``: a 2-step projector run with a real offline wandb run, validated after each
    step (two token overlays each) and the projector uploaded as an artifact; one run serves
    test_train_e2e.py's artifact test and test_wandb_overlays.py."""
    from test_train_e2e import DEMO_VAL, train_wandb_offline

    out = tmp_path_factory.mktemp("wandb-offline") / "run"
    overrides = [
        DEMO_VAL[0],  # the demo's validation set (its first images are the overlays)
        "train.max_steps=2",
        "train.eval_steps=1",
        "wandb.log_artifact=projector",
        "wandb.token_overlays=2",
    ]
    return out, train_wandb_offline(tiny_llava_dir, out, overrides)
