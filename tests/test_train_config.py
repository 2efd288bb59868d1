"""Training config, DeepSpeed "auto" filling and checkpoint discovery: fast, no weights, no processes.

pytest tests/test_train_config.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from visionzip_core.training import checkpointing
from visionzip_core.training.deepspeed_config import fill_deepspeed_config
from visionzip_core.training.settings import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_configs_are_found():
    names = {p.name for p in CONFIGS}
    assert "demo.yaml" in names and len(CONFIGS) >= 6, names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_shipped_yaml_validates_and_says_how_to_run_it(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "train/finetune.py --config configs/" in first, first
    assert str(path.relative_to(REPO)) in first
    settings = load_config(path)  # paths may be placeholders: existence is checked at build time
    assert settings.train.save_steps >= 1
    fill_deepspeed_config(settings, world_size=8, precision="bf16", hidden_size=4096)


def test_many_problems_reported_at_once_each_naming_its_key():
    overrides = [
        "train.save_step=3",  # typo
        "train.save_steps=0",  # out of range
        "optim.lr_llm=fast",  # wrong type
        "train.mode=pretrain",  # contradiction: no vision_tower/language_model, template not plain
        "lora.r=8",  # contradiction: lora settings without lora mode
        "trian.seed=1",  # unknown section
    ]
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "configs/demo.yaml", overrides)
    text = str(info.value)
    expected = [
        "train.save_step: unknown key (did you mean 'train.save_steps'?)",
        "train.save_steps:",
        "optim.lr_llm:",
        "model.vision_tower: pretrain mode needs",
        "model.language_model: pretrain mode needs",
        "data.template: stage-1 pretraining uses 'plain'",
        "lora: LoRA settings given but train.mode is 'pretrain'",
        "trian: unknown section (did you mean 'train'?)",
    ]
    for item in expected:
        assert item in text, f"missing {item!r} in:\n{text}"
    assert len(info.value.problems) == len(expected) + 1  # + name_or_path given in pretrain mode


def test_overrides_are_typed_by_yaml():
    s = load_config(
        REPO / "configs/demo.yaml",
        ["train.max_steps=7", "visionzip.enabled=false", "optim.betas=[0.9, 0.95]"],
    )
    assert s.train.max_steps == 7 and s.visionzip.enabled is False and s.optim.betas == (0.9, 0.95)
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(REPO / "configs/demo.yaml", ["train.max_steps=many"])


def test_fp16_on_cpu_and_json_conflicts_are_contradictions(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(
        json.dumps(
            {"train_micro_batch_size_per_gpu": 3, "optimizer": {"type": "Adam"}, "bf16": {"enabled": True}}
        )
    )
    overrides = [f"deepspeed.config={ds}", "train.precision=fp32"]
    if not _cuda():
        overrides.append("train.precision=fp16")
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "configs/demo.yaml", overrides)
    text = str(info.value)
    assert "train.per_device_batch_size: 16 but ds.json sets train_micro_batch_size_per_gpu=3" in text
    assert "deepspeed.config: ds.json has an optimizer/scheduler section" in text
    if not _cuda():
        assert "train.precision: fp16 needs a GPU" in text


def test_deepspeed_auto_fields_come_from_the_yaml():
    s = load_config(
        REPO / "configs/demo.yaml",
        ["train.per_device_batch_size=3", "train.grad_accum_steps=5", "optim.max_grad_norm=0.5"],
    )
    for name in ("zero2.json", "zero3.json"):
        s2 = s.model_copy(
            update={"deepspeed": s.deepspeed.model_copy(update={"config": f"configs/deepspeed/{name}"})}
        )
        cfg = fill_deepspeed_config(s2, world_size=4, precision="bf16", hidden_size=64)
        assert cfg["train_micro_batch_size_per_gpu"] == 3
        assert cfg["gradient_accumulation_steps"] == 5
        assert cfg["train_batch_size"] == 3 * 5 * 4
        assert cfg["gradient_clipping"] == 0.5
        assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
        assert "auto" not in json.dumps(cfg)
        assert "optimizer" not in cfg  # torch AdamW is passed in: per-module lrs, no FusedAdam compile


def test_bad_config_stops_the_entry_point_before_any_weights_load(tmp_path):
    env = {**os.environ, "VISIONZIP_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "train/finetune.py",
            "--config",
            "configs/demo.yaml",
            "train.sav_steps=1",
            "visionzip.dominant=0",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "train.sav_steps: unknown key (did you mean 'train.save_steps'?)" in proc.stderr
    assert "visionzip.dominant:" in proc.stderr
    assert not (tmp_path / "cache").exists(), "a model was built although the config was invalid"
    assert time.perf_counter() - start < 60


def test_resume_auto_ignores_incomplete_and_interrupted_saves(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if complete:
            (d / checkpointing.MARKER).write_text("ok")
    (tmp_path / "checkpoint-8.tmp-deadbeef").mkdir()
    (tmp_path / "checkpoint-8.tmp-deadbeef" / checkpointing.MARKER).write_text("renamed never happened")
    assert checkpointing.resolve_resume("auto", tmp_path) == tmp_path / "checkpoint-4"
    assert checkpointing.resolve_resume("never", tmp_path) is None
    with pytest.raises(FileNotFoundError, match="checkpoint-6 is not a complete checkpoint"):
        checkpointing.resolve_resume(str(tmp_path / "checkpoint-6"), tmp_path)
    assert checkpointing.remove_incomplete(tmp_path) == [tmp_path / "checkpoint-8.tmp-deadbeef"]
    assert not (tmp_path / "checkpoint-8.tmp-deadbeef").exists()


def test_rng_state_round_trip_through_a_weights_only_load(tmp_path):
    import random

    import numpy as np
    import torch

    torch.save(checkpointing.rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpointing.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
