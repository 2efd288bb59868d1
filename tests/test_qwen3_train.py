"""Qwen3-VL and Qwen3.5 through the real entry point (train/finetune.py) on messages data with images
of different sizes, a video (timestamped frame groups), a multi-turn and a text-only sample: LoRA on
Qwen3-VL (the DeepStack mergers train with the merger), a full finetune of Qwen3.5's hybrid LLM, each
export reloaded with ``load_visionzip_model`` and asked, and each resumed after kill -9 to the unbroken
run's weights; Qwen3.5's packing refusal. Projector mode
and the other commands run in tests/test_command_matrix.py.

Run: ``PYTHONPATH=$PWD .venv/bin/python -m pytest -m slow tests/test_qwen3_train.py`` (about a minute, CPU).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import torch
import warm_python
from test_qwen_train import _changed, _generate, _qwen, _weights, write_qwen_data
from test_train_e2e import REPO, _cmd, _env, metrics, train

pytestmark = pytest.mark.slow

# 4 steps, checkpoints at 2 and 4 (``_qwen``'s save_steps): the runs the resume tests break and compare.
STEPS = 4
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


def kill_after_checkpoint_2_and_resume(args: list[str], out: Path, hold: Path) -> None:
    """Run ``args`` (4 steps, checkpoints at 2 and 4, output ``out``) held after step 3, kill -9 it
    there (checkpoint-2 complete, step 3's update in memory only), then rerun it unheld to the end.
    The hold is a file (``debug.hold_until``), not a sleep: the kill lands mid-way on any machine load."""
    held = args + [f"debug.hold_until={hold}", "debug.hold_from_step=3"]
    victim = warm_python.popen(
        _cmd("python", held), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 600
        while not Path(f"{hold}.waiting").is_file():
            assert victim.poll() is None and time.time() < deadline, f"exit {victim.poll()} before step 3"
            time.sleep(0.2)
    finally:
        victim.kill()
        victim.wait()
    assert (out / "checkpoint-2" / "COMPLETE").is_file()
    assert not (out / "checkpoint-4").exists() and not (out / "final").exists()
    proc = train(args)
    assert f"resumed from {out}/checkpoint-2" in proc.stdout


def assert_same_run(unbroken: Path, resumed: Path) -> None:
    """Equal exported weights (adapter included), losses and samples, step by step."""
    for sub in ("final", "final/adapter"):
        a, b = _weights(unbroken / sub), _weights(resumed / sub)
        assert set(a) == set(b), sub
        assert [k for k in a if not torch.equal(a[k], b[k])] == [], sub
    assert _weights(unbroken / "final")  # the comparison is not of two empty folders
    losses = [[(r["step"], r["loss"]) for r in metrics(d) if "loss" in r] for d in (unbroken, resumed)]
    assert [s for s, _ in losses[1]] == list(range(1, STEPS + 1))
    assert losses[0] == losses[1]
    samples = [(d / "debug/samples-rank0.jsonl").read_text() for d in (unbroken, resumed)]
    assert samples[0] == samples[1]  # none skipped or repeated


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


@pytest.mark.parametrize(
    "family, mode, extra, unbroken",
    [
        ("qwen3-vl", "lora", QWEN3_VL_LORA, "qwen3_vl_lora"),  # adapters + the DeepStack mergers
        ("qwen3.5", "finetune", QWEN3_5_FINETUNE, "qwen3_5_finetune"),  # the Gated DeltaNet layers
    ],
)
def test_resume_after_kill_9_continues_to_the_unbroken_runs_weights(
    family_dirs, qwen_data, tmp_path, request, family, mode, extra, unbroken
):
    out = tmp_path / "run"
    args = _qwen(family_dirs[family], out, qwen_data, mode, steps=STEPS) + extra
    kill_after_checkpoint_2_and_resume(args, out, tmp_path / "release")
    assert_same_run(request.getfixturevalue(unbroken), out)


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
