"""Resume after kill -9, checked against an unbroken run: a run of 4 steps with checkpoints at 2 and 4
is held after step 3 (``debug.hold_until``, ``debug.hold_from_step``: a file, not a sleep, so the kill
lands mid-way on any machine load), killed there, rerun to the end and compared with the unbroken run."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch
import warm_python
from safetensors.torch import load_file
from test_train_e2e import REPO, _cmd, _env, metrics, train

STEPS, SAVE_STEPS = 4, 2


def kill_after_checkpoint_2_and_resume(
    args: list[str], out: Path, hold: Path, launcher: str = "python"
) -> None:
    """Run ``args`` (``STEPS`` steps, checkpoints every ``SAVE_STEPS``, output ``out``) held after step 3,
    kill -9 it there (checkpoint-2 complete, step 3's update in memory only; every process of the run,
    as a node failure would), then rerun ``args`` unheld to the end; the rerun must say it resumed
    from checkpoint-2. ``debug.*`` switches are not settings: the rerun without the hold is the same
    run to the resume check. ``launcher``: as in ``test_train_e2e.train``."""
    held = args + [f"debug.hold_until={hold}", "debug.hold_from_step=3"]
    victim = warm_python.popen(
        _cmd(launcher, held),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        warm_ranks=launcher == "ranks2",
    )
    try:
        deadline = time.time() + 600
        while not Path(f"{hold}.waiting").is_file():
            assert victim.poll() is None and time.time() < deadline, f"exit {victim.poll()} before step 3"
            time.sleep(0.2)
    finally:
        warm_python.kill_all(victim)
    assert (out / "checkpoint-2" / "COMPLETE").is_file()
    assert not (out / "checkpoint-4").exists() and not (out / "final").exists()
    proc = train(args, launcher)
    assert f"resumed from {out}/checkpoint-2" in proc.stdout


def unbroken_and_resumed(args_for: Callable[[Path], list[str]], root: Path) -> tuple[Path, Path]:
    """The unbroken run of ``args_for(root / "unbroken")``, then
    ``kill_after_checkpoint_2_and_resume`` of ``args_for(root / "run")``, for a case no finished run
    of the same settings exists for: ``(unbroken, resumed)`` output folders. One after the other, so
    each run forks from the warm interpreter: side by side, one of them would start cold, and its
    imports cost more than the overlap saves (8-10 s a case against 14-24 s, tiny models, 2 cores)."""
    unbroken, out = root / "unbroken", root / "run"
    train(args_for(unbroken))
    kill_after_checkpoint_2_and_resume(args_for(out), out, root / "release")
    return unbroken, out


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def assert_same_run(unbroken: Path, resumed: Path, subfolders: tuple[str, ...] = ("final",)) -> None:
    """Equal exported weights in each of ``subfolders`` (e.g. ``final/adapter`` too), equal losses
    step by step, and the same samples in the same order (both runs with ``debug.log_samples=true``)."""
    for sub in subfolders:
        a, b = _weights(unbroken / sub), _weights(resumed / sub)
        assert a and set(a) == set(b), sub
        assert [k for k in a if not torch.equal(a[k], b[k])] == [], sub
    losses = [[(r["step"], r["loss"]) for r in metrics(d) if "loss" in r] for d in (unbroken, resumed)]
    assert [s for s, _ in losses[1]] == list(range(1, STEPS + 1))  # each step logged once
    assert losses[0] == losses[1]
    samples = [(d / "debug/samples-rank0.jsonl").read_text() for d in (unbroken, resumed)]
    assert samples[0] == samples[1]  # none skipped or repeated
