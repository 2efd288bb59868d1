"""Resuming safely, end to end through train/finetune.py (CPU, tiny LLaVA, a few steps per run).

    pytest -m slow tests/test_train_resume.py

A resume with other settings stops before weights load and names every changed key; a finished
run exits without retraining; a fresh run never shares a folder with another run; one writer per
folder; NaN/inf grad norms count as divergence; a full disk keeps the earlier checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_e2e import REPO, _base, _cmd, _env, metrics, train

pytestmark = pytest.mark.slow


def _mtimes(folder: Path) -> dict[str, int]:
    """Every file's modification time, but the lock file's (each run records itself there)."""
    files = [p for p in folder.rglob("*") if p.is_file() and p.name != ".lock"]
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in files}


def test_changed_settings_stop_the_resume_before_weights_load_and_named_ones_may_change(
    tiny_llava_dir, base_run, tmp_path
):
    out = tmp_path / "run"
    shutil.copytree(base_run, out)  # a finished 4-step run of _base (a resume ignores the folder's name)
    assert (
        json.loads((out / "checkpoint-4/run_settings.json").read_text())["settings"]["optim"]["lr_llm"]
        == 2e-3
    )
    before = _mtimes(out)
    changed = [
        "train.max_steps=8",
        "optim.lr_llm=1e-3",
        "train.per_device_batch_size=2",
        "visionzip.dominant=10",
        "visionzip.enabled=false",
        "data.seed=3",
        "train.mode=projector",
        "deepspeed.config=configs/deepspeed/zero3.json",
        "data.train.0.weight=0.5",
        "train.logging_steps=3",  # free: changes nothing that is computed
    ]
    proc = train(_base(tiny_llava_dir, out) + changed, expect=2)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("  - ")]
    keys = [line[4:].split(":")[0] for line in lines]
    assert keys == [
        "data.seed",
        "data.train[0].weight",
        "deepspeed.zero_stage",
        "optim.lr_llm",
        "train.mode",
        "train.per_device_batch_size",
        "visionzip.dominant",
        "visionzip.enabled",
    ], proc.stderr
    assert "cannot change on resume" in lines[keys.index("train.mode")]
    assert "resume_allow_changes=[data.seed,data.train,optim.lr_llm," in proc.stderr
    assert "Loading weights" not in proc.stdout + proc.stderr and "resumed from" not in proc.stdout
    assert _mtimes(out) == before  # nothing written, nothing removed

    # A named change goes through, is logged, and takes effect (the checkpoint's lr would win otherwise).
    proc = train(
        _base(tiny_llava_dir, out)
        + ["train.max_steps=6", "optim.lr_llm=1e-3", "train.resume_allow_changes=[optim.lr_llm]"]
    )
    assert "resume: optim.lr_llm changed from 0.002 to 0.001" in proc.stdout
    steps = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert steps[4]["lr"]["llm"] == pytest.approx(
        steps[4]["lr"]["projector"] / 2
    )  # 1e-3 vs 2e-3, same schedule


def test_a_finished_run_exits_at_once_and_only_reexports_a_missing_final(tiny_llava_dir, tmp_path):
    out = tmp_path / "run"
    args = _base(tiny_llava_dir, out) + ["train.max_steps=5"]  # 5: not a multiple of save_steps=2
    train(args)
    assert (out / "checkpoint-5/COMPLETE").is_file()  # the last step is saved
    before, rows = _mtimes(out), metrics(out)

    proc = train(args)
    assert f"{out} is finished: step 5/5" in proc.stdout
    assert _mtimes(out) == before and metrics(out) == rows  # no training, no new final/, no new rows

    proc = train(_base(tiny_llava_dir, out) + ["train.max_steps=3"], expect=2)
    assert (
        "train.max_steps: this run would end at step 3" in proc.stderr
        and "checkpoint-5 is at step 5" in proc.stderr
    )
    assert not (out / "checkpoint-3").exists()

    # An export interrupted after the last save: export again, without training.
    weights = load_file(str(out / "final/model.safetensors"))
    for p in sorted((out / "final").rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    (out / "final").rmdir()
    proc = train(args)
    assert "final/ is missing: export only" in proc.stdout
    again = load_file(str(out / "final/model.safetensors"))
    assert set(again) == set(weights) and all(torch.equal(again[k], weights[k]) for k in weights)
    assert metrics(out) == rows

    # A fresh run must not share the folder with this one's checkpoints.
    proc = train(_base(tiny_llava_dir, out) + ["train.resume=never"], expect=2)
    assert (
        f"train.output_dir: {out} already holds another run's outputs (checkpoint-4, checkpoint-5, final"
        in proc.stderr
    )
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("warning:")]
    assert len(errors) == 1, proc.stderr  # one line, printed once (not once per rank)


def test_a_second_run_on_the_same_folder_is_refused(tiny_llava_dir, tmp_path):
    """A dead run's lock does not block: test_train_e2e.py's SIGKILL resume test."""
    out, release = tmp_path / "run", tmp_path / "release"
    args = _base(tiny_llava_dir, out) + ["train.max_steps=6"]
    # The first run waits after each step until the second has been refused, on any machine load.
    first = subprocess.Popen(
        _cmd("python", args + [f"debug.hold_until={release}"]),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 600
        while not Path(f"{release}.waiting").is_file():  # the first run holds the folder, mid-way
            assert first.poll() is None and time.time() < deadline, "first run ended before training"
            time.sleep(0.2)
        started = time.time()
        second = train(args, expect=2)
        assert time.time() - started < 60
        assert f"is in use by another run (PID {first.pid} on " in second.stderr, second.stderr
        assert len([line for line in second.stderr.splitlines() if line.startswith("error:")]) == 1
    finally:
        release.touch()
    assert first.wait(timeout=240) == 0, first.stderr[-3000:]
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]  # each row once


def test_nonfinite_grad_norm_stops_the_run_like_a_nonfinite_loss(tiny_llava_dir, tmp_path):
    out = tmp_path / "run"
    # The first step (lr 2.5e5 after warmup) blows the weights up; the next grad norm is inf.
    overrides = ["optim.lr_llm=1e6", "optim.warmup_ratio=0.5", "train.save_steps=1", "train.max_steps=8"]
    proc = train(_base(tiny_llava_dir, out) + overrides, expect=3)
    assert "grad norm is inf" in proc.stderr and "at step 2" in proc.stderr, proc.stderr
    assert f"last good checkpoint: {out}/checkpoint-1" in proc.stderr
    assert not (out / "final").exists() and not (out / "checkpoint-2").exists()


def test_skipped_nonfinite_steps_leave_the_weights_untouched_up_to_the_limit(tiny_llava_dir, tmp_path):
    common = ["optim.scheduler=constant", "optim.warmup_ratio=0", "train.save_steps=10", "data.val=[]"]
    reference, skipped = tmp_path / "reference", tmp_path / "skipped"
    train(_base(tiny_llava_dir, reference) + common + ["train.max_steps=2"])
    proc = train(
        _base(tiny_llava_dir, skipped)
        + common
        + ["train.max_steps=3", "debug.nan_at_step=3", "train.max_nonfinite_steps=1"]
    )
    assert "step 3: loss is nan; update skipped (1 of train.max_nonfinite_steps=1)" in proc.stderr
    assert metrics(skipped)[-1]["nonfinite_steps"] == 1
    a, b = (
        load_file(str(reference / "final/model.safetensors")),
        load_file(str(skipped / "final/model.safetensors")),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)  # step 3 made no update


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tiny_llava_dir, tmp_path):
    disk = tmp_path / "disk"
    if os.geteuid() != 0 or not _mount_tmpfs(disk, "4m"):  # a checkpoint of the tiny model is ~2.6 MB
        pytest.skip("needs root to mount a small tmpfs")
    try:
        out = disk / "run"
        args = _base(tiny_llava_dir, out) + ["data.val=[]"]
        proc = train(args, expect=74)
        assert f"error: no space left on tmpfs (mounted at {disk}) while saving checkpoint-4" in proc.stderr
        assert f"kept {out}/checkpoint-2" in proc.stderr and "Traceback" not in proc.stderr
        assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
        assert (out / "checkpoint-2/COMPLETE").is_file()
        # Room again: the run resumes from the kept checkpoint and finishes.
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        proc = train(args)
        assert f"resumed from {out}/checkpoint-2" in proc.stdout and (out / "final").is_dir()
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_two_processes_refuse_a_changed_world_size_once_and_finish_cleanly(zero2_two_process_run):
    out, args = zero2_two_process_run  # a finished 3-step run of two processes (also test_multinode.py's)
    assert (out / "checkpoint-3/COMPLETE").is_file()
    proc = train(args, expect=2)  # one process now
    assert proc.stderr.count("error: resuming from") == 1
    assert "world_size: 2 in the checkpoint, 1 now (cannot change on resume" in proc.stderr
    proc = train(args, launcher="ranks2")
    assert proc.stdout.count(f"{out} is finished: step 3/3") == 1
