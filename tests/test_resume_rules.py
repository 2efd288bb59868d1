"""Which settings may change on resume, which folders a run may use, and the one-writer lock (fast)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from visionzip_core.training import output_lock
from visionzip_core.training.config_loading import load_config
from visionzip_core.training.model_spec import resolve_model_spec
from visionzip_core.training.resume import (
    ResumeError,
    RunFinished,
    allow_list_problems,
    check_output_dir,
    check_resume_settings,
    check_step_target,
    compare_records,
    run_record,
)
from visionzip_core.training.schema import ConfigError

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"


def _record(*overrides: str, world_size: int = 1, zero_stage: int = 2) -> dict:
    settings = load_config(DEMO, list(overrides))
    layer = resolve_model_spec(settings).feature_layer
    return run_record(
        settings, feature_layer=layer, world_size=world_size, precision="fp32", zero_stage=zero_stage
    )


def _keys(diffs) -> list[str]:
    return [k for k, _, _ in diffs]


def test_free_settings_change_freely_and_everything_else_is_compared():
    saved = _record()
    free = _record(
        "train.logging_steps=1",
        "train.save_steps=3",
        "train.max_steps=99",
        "train.output_dir=elsewhere",
        "wandb.enabled=false",
        "data.num_workers=4",
        "export.enabled=false",
        "train.gradient_checkpointing=true",
    )
    assert compare_records(saved, free, []) == ([], [])
    changed = _record(
        "optim.lr_llm=1e-4", "train.seed=1", "visionzip.merge=mean", "data.model_max_length=128"
    )
    refused, permitted = compare_records(saved, changed, [])
    assert _keys(refused) == ["data.model_max_length", "optim.lr_llm", "train.seed", "visionzip.merge"]
    refused, permitted = compare_records(saved, changed, ["optim", "train.seed"])
    assert _keys(refused) == ["data.model_max_length", "visionzip.merge"]
    assert _keys(permitted) == ["optim.lr_llm", "train.seed"]


def test_layout_settings_are_refused_even_when_allowed():
    saved = _record()
    current = _record("train.mode=projector", world_size=2, zero_stage=3)
    refused, permitted = compare_records(saved, current, ["train.mode"])
    assert _keys(refused) == ["deepspeed.zero_stage", "train.mode", "world_size"] and permitted == []
    lora = _record("train.mode=lora")  # no lora: section = the defaults (r=128)
    assert _keys(compare_records(lora, _record("train.mode=lora", "lora.r=4"), ["lora.r"])[0]) == ["lora.r"]
    with pytest.raises(
        ResumeError,
        match='train.mode: "finetune" in the checkpoint, "projector" now '
        r"\(cannot change on resume",
    ):
        check_resume_settings(Path("ckpt"), saved, current, [])


def test_added_data_sources_and_derived_values_are_compared():
    saved = _record()
    saved["derived"]["data.train_samples"] = 330
    two = "data.train=[{path: a.json, image_folder: img}, {path: b.json, image_folder: img}]"
    current = _record(two)
    refused, _ = compare_records(saved, current, [])
    assert "data.train[1].path" in _keys(refused) and "data.train[0].path" in _keys(refused)
    assert "data.train_samples" not in _keys(refused)  # not known yet: compared once the data is built
    current["derived"]["data.train_samples"] = 300
    refused, _ = compare_records(saved, current, [], only=("data.train_samples",))
    assert refused == [("data.train_samples", 330, 300)]
    assert compare_records(saved, current, ["data.train"], only=("data.train_samples",))[0] == []
    # a checkpoint written before a setting existed does not stop the resume over it
    del saved["settings"]["train"]["seed"]
    assert "train.seed" not in _keys(compare_records(saved, _record("train.seed=7"), [])[0])


def test_allowed_changes_are_typed_and_validated_with_the_config():
    assert (
        allow_list_problems(
            ["optim.lr_llm", "data.train", "data.train[0].weight", "visionzip", "data.train_samples"]
        )
        == []
    )
    problems = allow_list_problems(["optim.lr_lm", "train.mode", "lora.r", "train", "world_size"])
    assert len(problems) == 5 and "'optim.lr_lm' is not a setting" in problems[0]
    assert all("can never change on resume" in p for p in problems[1:])
    with pytest.raises(ConfigError, match="train.resume_allow_changes: 'optim.lr'"):
        load_config(DEMO, ["train.resume_allow_changes=[optim.lr]"])
    with pytest.raises(ConfigError, match="train.resume_allow_changes"):
        load_config(DEMO, ["train.resume_allow_changes=optim.lr_llm"])  # a list, not a string


def _checkpoint(root: Path, step: int, total: int = 10) -> Path:
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "COMPLETE").write_text("")
    (path / "trainer_state.json").write_text(json.dumps({"step": step, "total_steps": total}))
    return path


def test_a_fresh_run_never_shares_a_folder_with_another_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    check_output_dir(out, "never", None, [])  # empty: fine
    (out / "metrics.jsonl").write_text("{}\n")
    check_output_dir(out, "auto", None, [])  # killed before its first save: the same run restarts
    with pytest.raises(ResumeError, match=r"already holds another run's outputs \(metrics.jsonl\)"):
        check_output_dir(out, "never", None, [])
    old = [_checkpoint(out, 40), _checkpoint(out, 60)]
    with pytest.raises(ResumeError, match=r"\(checkpoint-40, checkpoint-60, metrics.jsonl\); a fresh run"):
        check_output_dir(out, "never", None, old)
    check_output_dir(out, "auto", old[-1], old)
    with pytest.raises(ResumeError, match="checkpoint-40 is older than checkpoint-60"):
        check_output_dir(out, str(old[0]), old[0], old)
    elsewhere = _checkpoint(tmp_path / "other", 5)
    with pytest.raises(ResumeError, match="already holds another run's outputs"):
        check_output_dir(out, str(elsewhere), elsewhere, old)


def test_the_step_target_against_the_checkpoint(tmp_path):
    ckpt = _checkpoint(tmp_path, 10)
    assert check_step_target(ckpt, 12, tmp_path, export_enabled=True) is True
    with pytest.raises(ResumeError, match="end at step 8, but .* is at step 10"):
        check_step_target(ckpt, 8, tmp_path, export_enabled=True)
    assert check_step_target(ckpt, 10, tmp_path, export_enabled=True) is False  # final/ missing: export
    (tmp_path / "final").mkdir()
    with pytest.raises(RunFinished, match="is finished: step 10/10"):
        check_step_target(ckpt, 10, tmp_path, export_enabled=True)


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path):
    lock = output_lock.acquire(tmp_path)
    with pytest.raises(output_lock.OutputDirLocked, match=rf"in use by another run \(PID {os.getpid()} on "):
        output_lock.acquire(tmp_path)
    lock.release()
    output_lock.acquire(tmp_path).release()

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from visionzip_core.training.output_lock import acquire; acquire(Path(sys.argv[1])); "
            "print('held', flush=True); time.sleep(60)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(output_lock.OutputDirLocked, match=f"PID {holder.pid} on "):
        output_lock.acquire(tmp_path)
    holder.kill()
    holder.wait()
    time.sleep(0.1)
    output_lock.acquire(tmp_path).release()  # the kernel dropped the dead holder's lock
