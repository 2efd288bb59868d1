"""Shared fixtures: tiny random models built from configs and saved to disk, once per session.

Test tiers (markers registered in pyproject.toml):
  - unmarked: unit and parity tests, seconds in all;      ``pytest -m "not slow"``
  - ``slow``: end-to-end runs of the real entry points;    ``pytest -m slow``
  - ``gpu``: need CUDA; skipped automatically without it.  ``pytest -m gpu``
CI runs everything: ``pytest``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from filelock import FileLock

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Commands the tests start run on one thread each (set after torch's import: the suite's own
# process keeps its threads), the same in the warm process that forks most of them
# (tests/warm_python.py) as in the ones started cold: two of them on 2 cores otherwise fight.
os.environ.setdefault("OMP_NUM_THREADS", "1")


# The suite runs on pytest-xdist workers, a file per worker at a time (pyproject.toml: ``-n auto
# --dist loadfile``): a file's module fixtures are built once, and a worker that waits on a test's
# command leaves its core to the other worker. Most of the time goes to commands that run on one
# thread each (OMP_NUM_THREADS above); a worker's own torch gets its share of the cores.
MAX_WORKERS = 4  # each worker keeps a warm interpreter (tests/warm_python.py) of about 1.5 GB


def pytest_xdist_auto_num_workers(config):
    return max(1, min(os.cpu_count() or 1, MAX_WORKERS))


if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_collection_modifyitems(config, items):
    # Files with the most end-to-end runs first: the workers then end together, not one of them on a
    # long file picked up last. The order inside a file stays as written.
    slow = {}
    for item in items:
        slow[item.path] = slow.get(item.path, 0) + ("slow" in item.keywords)
    items.sort(key=lambda item: -slow[item.path])
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def _encode(value):
    if isinstance(value, Path):
        return {"path": str(value)}
    if isinstance(value, subprocess.CompletedProcess):
        return {"process": [value.args, value.returncode, value.stdout, value.stderr]}
    if isinstance(value, (list, tuple)):
        return {type(value).__name__: [_encode(v) for v in value]}
    if isinstance(value, dict):
        return {"dict": {k: _encode(v) for k, v in value.items()}}
    return {"value": value}


def _decode(data):
    ((kind, value),) = data.items()
    if kind == "path":
        return Path(value)
    if kind == "process":
        return subprocess.CompletedProcess(*value)
    if kind in ("list", "tuple"):
        return (list if kind == "list" else tuple)(_decode(v) for v in value)
    if kind == "dict":
        return {k: _decode(v) for k, v in value.items()}
    return value


def built_once(tmp_path_factory, name: str, build):
    """``build(folder)``'s result, with ``folder`` built once per test run.

    Alone, this is ``build(tmp_path_factory.mktemp(name))``. Under pytest-xdist (the suite's default
    on two cores) each worker has a session of its own; the first worker to ask builds under the
    run's shared temp folder while holding a lock, the others wait and read the same folder and the
    same result (written as JSON beside it). Paths inside the results then agree across workers:
    a shared run's overrides name the same model folders in every worker."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return build(tmp_path_factory.mktemp(name))
    root = tmp_path_factory.getbasetemp().parent / "built-once"
    root.mkdir(exist_ok=True)
    folder, result = root / name, root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if not result.is_file():
            shutil.rmtree(folder, ignore_errors=True)  # a worker's failed attempt: build afresh
            folder.mkdir()
            value = build(folder)
            result.write_text(json.dumps(_encode(value)))
    return _decode(json.loads(result.read_text()))


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    """A saved llava-hf folder: random tiny LLaVA-1.5 (112 px, 64 patches + CLS) and its processor."""
    from visionzip_core.testing.tiny import write_tiny

    return built_once(tmp_path_factory, "tiny-llava", lambda path: write_tiny("llava-1.5", path))


@pytest.fixture(scope="session")
def tiny_llava_next_dir(tmp_path_factory):
    """A saved llava-hf LLaVA-NeXT folder: 112 px crops (64 patches + CLS), llava-v1.6's five
    tilings of the crop side (1x2, 2x1, 2x2, 3x1, 1x3), and its LlavaNextProcessor."""
    from visionzip_core.testing.tiny import write_tiny

    return built_once(tmp_path_factory, "tiny-llava-next", lambda path: write_tiny("llava-next", path))


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl_dir(tmp_path_factory):
    """A folder laid out like the Qwen/Qwen2.5-VL-7B-Instruct download: random tiny Qwen2.5-VL (4
    windowed vision blocks, 2x2 merge units of 14 px patches) and its processor."""
    from visionzip_core.testing.tiny import write_tiny

    return built_once(
        tmp_path_factory, "tiny-qwen2.5-vl", lambda path: write_tiny("qwen2.5-vl", path / "model")
    )


@pytest.fixture(scope="session")
def tiny_qwen2_vl_dir(tmp_path_factory):
    """As ``tiny_qwen2_5_vl_dir``, the Qwen/Qwen2-VL-7B-Instruct layout (full attention in every block)."""
    from visionzip_core.testing.tiny import write_tiny

    return built_once(tmp_path_factory, "tiny-qwen2-vl", lambda path: write_tiny("qwen2-vl", path / "model"))


@pytest.fixture(scope="session")
def tiny_llava_onevision_dir(tmp_path_factory):
    """A folder laid out like the llava-hf/llava-onevision-qwen2-7b-ov-hf download (4.45 keys and
    files): random tiny LLaVA-OneVision (2-layer SigLIP, 64 px crops of 8 x 8 patches, no CLS,
    tilings up to 3 x 3 under anyres_max_2, a 2-layer Qwen2) and its processor files."""
    from visionzip_core.testing.tiny import write_tiny

    return built_once(
        tmp_path_factory, "tiny-llava-onevision", lambda path: write_tiny("llava-onevision", path / "model")
    )


@pytest.fixture(scope="session")
def family_dirs(tiny_llava_dir, tiny_llava_next_dir, tiny_llava_onevision_dir, tmp_path_factory):
    """``{family: folder}``, each laid out as its download: the session's LLaVA-1.5 and LLaVA-NeXT
    folders, and Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3.5 with 2-3 vision blocks (seed 0), the size
    the training tests run (built once here, not once per module)."""
    from visionzip_core.testing.tiny import write_tiny

    def build(root: Path) -> dict[str, Path]:
        return {
            "qwen2-vl": write_tiny("qwen2-vl", root / "qwen2-vl", seed=0, vision_depth=2),
            "qwen2.5-vl": write_tiny("qwen2.5-vl", root / "qwen2.5-vl", seed=0, vision_depth=2),
            # 3 blocks: DeepStack reads blocks 1 and 2, so two levels train and travel with the merger
            "qwen3-vl": write_tiny("qwen3-vl", root / "qwen3-vl", seed=0, vision_depth=3),
            "qwen3.5": write_tiny("qwen3.5", root / "qwen3.5", seed=0, vision_depth=2),
        }

    return {
        "llava-1.5": tiny_llava_dir,
        "llava-next": tiny_llava_next_dir,
        **built_once(tmp_path_factory, "family-dirs", build),
        "llava-onevision": tiny_llava_onevision_dir,
    }


@pytest.fixture(scope="session")
def tiny_pretrain_dirs(tmp_path_factory):
    """``(clip_dir, llm_dir)``: a tiny CLIP vision checkpoint and a tiny causal LM, for stage-1."""
    from visionzip_core.testing.tiny import build_tiny_pretrain_parts

    return built_once(tmp_path_factory, "tiny-parts", build_tiny_pretrain_parts)


# Folders laid out like the real downloads users bring (tests/real_layouts.py says which).
@pytest.fixture(scope="session")
def full_clip_dir(tmp_path_factory):
    """openai/clip-vit-large-patch14-336's layout: a whole CLIPModel in pytorch_model.bin."""
    from real_layouts import write_full_clip_folder

    return built_once(tmp_path_factory, "clip-full", write_full_clip_folder)


@pytest.fixture(scope="session")
def vicuna_dir(tmp_path_factory):
    """lmsys/vicuna-7b-v1.5's layout: sharded .bin, a 4.31 config.json, tokenizer.model only."""
    from real_layouts import write_vicuna_folder

    return built_once(tmp_path_factory, "vicuna", write_vicuna_folder)


@pytest.fixture(scope="session")
def llava_hf_4x_dir(tmp_path_factory):
    """llava-hf/llava-1.5-7b-hf as transformers 4.x saved it: old key layout and config."""
    from real_layouts import write_llava_hf_4x_folder

    return built_once(tmp_path_factory, "llava-hf-4x", write_llava_hf_4x_folder)


@pytest.fixture(scope="session")
def llava_next_hf_4x_dir(tmp_path_factory):
    """llava-hf/llava-v1.6-vicuna-7b-hf as transformers 4.x saved it: old key layout and config."""
    from real_layouts import write_llava_hf_4x_folder

    return built_once(
        tmp_path_factory, "llava-next-hf-4x", lambda path: write_llava_hf_4x_folder(path, family="llava-next")
    )


# Two-process runs through the real entry point, shared by the tests that assert on them: each
# two-process run costs seconds to tens of seconds on 2 cores, the same run need not be trained twice.
@pytest.fixture(scope="session")
def zero3_two_process_run(tiny_llava_dir, tmp_path_factory):
    """``(out, overrides)``: 4 fp32 steps of the tiny LLaVA under ZeRO-3, two processes (torchrun),
    weight decay on, no validation. Read it; never train into it."""
    from test_train_e2e import ZERO3_FP32_STEPS, _base, train

    def build(folder: Path) -> tuple[Path, list[str]]:
        out = folder / "run"
        overrides = (
            _base(tiny_llava_dir, out) + ZERO3_FP32_STEPS + ["deepspeed.config=configs/deepspeed/zero3.json"]
        )
        train(overrides, launcher="torchrun2")
        return out, overrides

    return built_once(tmp_path_factory, "zero3-two-process", build)


@pytest.fixture(scope="session")
def zero2_two_process_run(tiny_llava_dir, tmp_path_factory):
    """``(out, overrides)``: 3 steps of the tiny LLaVA under ZeRO-2 (demo.yaml's), two processes
    (``ranks2``: torchrun's workers, forked warm), one checkpoint at the end, no validation. Tests may rerun its command (a finished
    run writes nothing), not train further."""
    from test_train_e2e import _base, train

    def build(folder: Path) -> tuple[Path, list[str]]:
        out = folder / "run"
        overrides = _base(tiny_llava_dir, out) + [
            "train.per_device_batch_size=2",
            "train.max_steps=3",
            "train.save_steps=3",
            "data.val=[]",
        ]
        train(overrides, launcher="ranks2")
        return out, overrides

    return built_once(tmp_path_factory, "zero2-two-process", build)


@pytest.fixture(scope="session")
def base_run(tiny_llava_dir, tmp_path_factory):
    """A finished run of ``test_train_e2e._base`` alone: finetune, demo.yaml's ZeRO-2, one process,
    4 steps, checkpoints at 2 and 4, ``final/``. Read it, or copy it before training into it."""
    from test_train_e2e import _base, train

    def build(folder: Path) -> Path:
        train(_base(tiny_llava_dir, folder / "run"))
        return folder / "run"

    return built_once(tmp_path_factory, "base-run", build)


@pytest.fixture(scope="session")
def pretrain_run(tiny_pretrain_dirs, tmp_path_factory):
    """A finished stage-1 run (``train.mode=pretrain``, plain captions, 4 steps) assembling LLaVA from
    ``tiny_pretrain_dirs``: test_train_e2e.py's pretrain test and test_llava_next_train.py's stage 2
    (which starts from its export) read it."""
    from test_train_e2e import _base, pretrain_overrides, train

    def build(folder: Path) -> Path:
        train(_base(Path("unused"), folder / "run")[1:] + pretrain_overrides(*tiny_pretrain_dirs))
        return folder / "run"

    return built_once(tmp_path_factory, "pretrain", build)


@pytest.fixture(scope="session")
def wandb_offline_run(tiny_llava_dir, tmp_path_factory):
    """``(out, proc)``: a 2-step projector run with a real offline wandb run, validated after each
    step (two token overlays each) and the projector uploaded as an artifact; one run serves
    test_train_e2e.py's artifact test and test_wandb_overlays.py."""
    from test_train_e2e import DEMO_VAL, train_wandb_offline

    overrides = [
        DEMO_VAL[0],  # the demo's validation set (its first images are the overlays)
        "train.max_steps=2",
        "train.eval_steps=1",
        "wandb.log_artifact=projector",
        "wandb.token_overlays=2",
    ]

    def build(folder: Path) -> tuple[Path, subprocess.CompletedProcess]:
        return folder / "run", train_wandb_offline(tiny_llava_dir, folder / "run", overrides)

    return built_once(tmp_path_factory, "wandb-offline", build)
