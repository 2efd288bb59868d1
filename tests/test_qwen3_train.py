"""Qwen3-VL and Qwen3.5 through the real entry point (train/finetune.py) on messages data with images
of different sizes, a video (timestamped frame groups), a multi-turn and a text-only sample: LoRA on
Qwen3-VL (the DeepStack mergers train with the merger), a full finetune of Qwen3.5's hybrid LLM, each
export reloaded with ``load_visionzip_model`` and asked; every mode (projector, finetune, the ViT too on
Qwen3-VL, lora) on both families resumed after kill -9 to the unbroken run's weights
(tests/kill_resume.py); Qwen3.5's packing refusal. The other commands run in tests/test_command_matrix.py.

Run: ``PYTHONPATH=$PWD .venv/bin/python -m pytest -m slow tests/test_qwen3_train.py`` (about a minute, CPU).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from kill_resume import (
    STEPS,
    assert_same_run,
    kill_after_checkpoint_2_and_resume,
    unbroken_and_resumed,
)
from test_qwen_train import _changed, _generate, _qwen, _weights, write_qwen_data
from test_train_e2e import train

pytestmark = pytest.mark.slow

# Run as kill_resume.py's runs are (4 steps; ``_qwen``'s checkpoints at 2 and 4): the unbroken references.
QWEN3_VL_LORA = ["export.merge_lora=true", "debug.log_samples=true"]
QWEN3_5_FINETUNE = ["debug.log_samples=true"]


@pytest.fixture(scope="module")
def qwen_data(tmp_path_factory):
    return write_qwen_data(tmp_path_factory.mktemp("qwen3-data"))


@pytest.fixture(scope="module")
def qwen3_vl_lora(family_dirs, qwen_data, tmp_path_factory) -> Path:
    """A finished LoRA run on Qwen3-VL: read by the mode's test and, unbroken, by its resume test."""
    out = tmp_path_factory.mktemp("qwen3-vl-lora") / "run"
    train(_qwen(family_dirs["qwen3-vl"], out, qwen_data, "lora", steps=STEPS) + QWEN3_VL_LORA)
    return out


@pytest.fixture(scope="module")
def qwen3_5_finetune(family_dirs, qwen_data, tmp_path_factory) -> Path:
    """A finished finetune run on Qwen3.5: read by the mode's test and, unbroken, by its resume test."""
    out = tmp_path_factory.mktemp("qwen3.5-finetune") / "run"
    train(_qwen(family_dirs["qwen3.5"], out, qwen_data, "finetune", steps=STEPS) + QWEN3_5_FINETUNE)
    return out


def test_lora_on_qwen3_vl_trains_the_deepstack_mergers_with_the_merger_and_reloads(
    family_dirs, qwen_data, qwen3_vl_lora
):
    folder = family_dirs["qwen3-vl"]
    out = qwen3_vl_lora
    base, new = _weights(folder), _weights(out / "final")
    changed, _ = _changed(base, new, lambda k: True)
    assert any("visual.merger." in k for k in changed)
    levels = {
        k.split("deepstack_merger_list.")[1].split(".")[0] for k in changed if "deepstack_merger_list" in k
    }
    assert levels == {"0", "1"}  # every DeepStack level, as modules_to_save
    assert any("language_model" in k and "self_attn" in k for k in changed)
    assert not any("visual.blocks" in k for k in changed)
    # 97 x 143 px -> 96 x 128 resized (32 px units) -> 3 x 4 = 12 merged tokens -> 3 + 3 kept
    n_image, _ = _generate(out / "final", qwen_data / "images/im0.png")
    assert n_image == 6


def test_finetune_on_qwen3_5_trains_its_linear_attention_layers_and_reloads(
    family_dirs, qwen_data, qwen3_5_finetune
):
    folder = family_dirs["qwen3.5"]
    out = qwen3_5_finetune
    base, new = _weights(folder), _weights(out / "final")
    changed, _ = _changed(base, new, lambda k: True)
    assert any("visual.merger." in k for k in changed)
    assert any("linear_attn.in_proj_qkv" in k for k in changed)  # a Gated DeltaNet layer
    assert any("self_attn.q_proj" in k for k in changed)  # the full-attention layer
    assert not any("visual.blocks" in k for k in changed)
    n_image, tokens = _generate(out / "final", qwen_data / "images/im0.png")
    assert n_image == 6


LOGGED = ["debug.log_samples=true"]
WITH_THE_TOWER = ["train.tune_vision_tower=true", "optim.lr_vision=1e-3"]


@pytest.mark.parametrize(
    "family, mode, extra, unbroken, exported",
    [  # every mode on both families; the mode tests' runs are the references where their settings match
        ("qwen3-vl", "projector", LOGGED, None, ("final",)),
        # finetune with the ViT once (its optimizer state resumed too); Qwen3.5's keeps it frozen
        ("qwen3-vl", "finetune", WITH_THE_TOWER + LOGGED, None, ("final",)),
        ("qwen3-vl", "lora", QWEN3_VL_LORA, "qwen3_vl_lora", ("final", "final/adapter")),
        ("qwen3.5", "projector", LOGGED, None, ("final",)),
        ("qwen3.5", "finetune", QWEN3_5_FINETUNE, "qwen3_5_finetune", ("final",)),
        ("qwen3.5", "lora", QWEN3_VL_LORA, None, ("final", "final/adapter")),
    ],
)
def test_resume_after_kill_9_continues_to_the_unbroken_runs_weights(
    family_dirs, qwen_data, tmp_path, request, family, mode, extra, unbroken, exported
):
    def args(out: Path) -> list[str]:
        return _qwen(family_dirs[family], out, qwen_data, mode, steps=STEPS) + extra

    if unbroken is None:
        reference, out = unbroken_and_resumed(args, tmp_path)
    else:
        reference, out = request.getfixturevalue(unbroken), tmp_path / "run"
        kill_after_checkpoint_2_and_resume(args(out), out, tmp_path / "release")
    assert_same_run(reference, out, exported)
    # what the mode trains, so each case resumes what it claims to: the tower only where asked
    changed, _ = _changed(_weights(family_dirs[family]), _weights(out / "final"), lambda k: True)
    assert any("visual.merger." in k for k in changed)
    assert any("language_model" in k for k in changed) == (mode != "projector")
    assert any("visual.blocks." in k for k in changed) == (extra[0] == WITH_THE_TOWER[0])


def test_packing_on_qwen3_5_is_one_config_error_before_weights_load(family_dirs, qwen_data, tmp_path):
    """The family's packing refusal (``packing_refusal``) reaches the config check: one problem, no
    weights loaded (the config loader reads config.json only)."""
    from test_train_e2e import REPO

    from visionzip_core.training.config_loading import load_config
    from visionzip_core.training.schema import ConfigError

    overrides = _qwen(family_dirs["qwen3.5"], tmp_path / "run", qwen_data, "finetune") + ["data.packing=true"]
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs/demo.yaml", overrides, check_files=True)
    assert err.value.problems == [
        "data.packing: not supported for qwen3.5 (its Gated DeltaNet layers carry state across the samples "
        "of a packed row; per-sample boundaries are not implemented)"
    ]
    # Qwen3-VL keeps the M-RoPE refusal every Qwen family has
    overrides = _qwen(family_dirs["qwen3-vl"], tmp_path / "run", qwen_data, "finetune") + [
        "data.packing=true"
    ]
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs/demo.yaml", overrides, check_files=True)
    assert err.value.problems == ["data.packing: not supported for qwen3-vl (M-RoPE positions per sample)"]


def test_the_shipped_qwen3_5_config_runs_as_written(family_dirs, qwen_data, tmp_path):
    """configs/qwen3.5-9b/lora.yaml (LoRA on the full-attention, Gated DeltaNet and MLP projections)
    through the entry point, only paths and sizes overridden; its export reloads with the split."""
    import subprocess
    import sys

    from test_train_e2e import REPO, _env

    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "train/finetune.py",
        "--config",
        "configs/qwen3.5-9b/lora.yaml",
        f"model.name_or_path={family_dirs['qwen3.5']}",
        f"data.train=[{{path: {qwen_data}/train.jsonl, image_folder: {qwen_data}/images, format: messages}}]",
        f"train.output_dir={out}",
        "train.per_device_batch_size=2",
        "train.grad_accum_steps=1",
        "train.max_steps=2",
        "train.save_steps=2",
        "data.num_workers=0",
        "data.model_max_length=512",
        "wandb.enabled=false",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    base, new = _weights(family_dirs["qwen3.5"]), _weights(out / "final")
    changed, _ = _changed(base, new, lambda k: True)
    assert any("linear_attn.in_proj_z" in k for k in changed) and any("visual.merger." in k for k in changed)
    n_image, _ = _generate(out / "final", qwen_data / "images/im0.png")
    assert n_image == 6
