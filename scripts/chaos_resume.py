"""Kill training at random moments, resume it, and check the final weights equal an unbroken run.

    .venv/bin/python scripts/chaos_resume.py --trials 20 --processes 1 2 --seed 0

Each trial runs the demo config (the tiny model, a few steps, a checkpoint after every step so
that kills land inside saves too), kills it with SIGKILL (the launcher and every worker) or
SIGTERM (the launcher alone, as a scheduler would) after a random delay, reruns the same command
(``train.resume: auto``) to the end, and compares ``final/model.safetensors`` tensor by tensor,
bitwise, with one unbroken run per process count. Trials alternate over ``--processes``. Prints
one line per trial and ``N/N identical``; exits 1 if any trial differs or fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def command(out: Path, processes: int, args: argparse.Namespace) -> list[str]:
    launcher = (
        [sys.executable] if processes == 1 else [str(BIN / "torchrun"), "--nproc_per_node", str(processes)]
    )
    return launcher + [
        "train/finetune.py",
        "--config",
        "configs/demo.yaml",
        f"train.output_dir={out}",
        *([f"model.name_or_path={args.model}"] if args.model else []),
        f"train.max_steps={args.steps}",
        "train.save_steps=1",
        "train.save_total_limit=2",
        f"train.per_device_batch_size={args.batch}",
        "train.eval_steps=null",
        "train.logging_steps=1",
        "data.val=[]",
        "wandb.enabled=false",
        "export.enabled=true",
    ]


def env() -> dict:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled"}
    e.pop("RANK", None)
    return e


def run_to_end(out: Path, processes: int, args) -> float:
    start = time.perf_counter()
    proc = subprocess.run(
        command(out, processes, args), cwd=REPO, env=env(), capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{out}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def step_times(out: Path, proc: subprocess.Popen, steps: int, timeout: float = 600) -> tuple[float, float]:
    """Seconds until the run logs its first and its last step."""
    start, first = time.perf_counter(), None
    while True:
        step = last_step(out)
        if step >= 1 and first is None:
            first = time.perf_counter() - start
        if step >= steps:
            return first, time.perf_counter() - start
        if proc.poll() is not None or time.perf_counter() - start > timeout:
            raise RuntimeError(f"{out}: step {steps} never logged")
        time.sleep(0.02)


def last_step(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line).get("step", 0))
        except json.JSONDecodeError:
            pass
    return max(steps, default=0)


def max_difference(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a / "final/model.safetensors")), load_file(str(b / "final/model.safetensors"))
    if set(wa) != set(wb):
        return float("inf")
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)


def trial(
    i: int, processes: int, reference: Path, timing: tuple[float, float, float], root: Path, args
) -> bool:
    rng = random.Random(args.seed * 100_003 + i)
    sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
    first, last, total = timing
    # Mostly while steps and saves run (late start-up to shortly after the last step), sometimes
    # anywhere up to the end (export and teardown included).
    delay = rng.uniform(0.9 * first, last + 0.3) if rng.random() < 0.8 else rng.uniform(0.5 * first, total)
    out = root / f"trial-{i:02d}"
    proc = subprocess.Popen(
        command(out, processes, args),
        cwd=REPO,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    time.sleep(delay)
    finished = proc.poll() is not None
    if not finished:
        if sig == signal.SIGKILL:
            os.killpg(proc.pid, signal.SIGKILL)  # launcher and workers at once
        else:
            proc.send_signal(signal.SIGTERM)  # the launcher only; it must stop its workers
    try:
        code = proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        code = proc.wait()
        print(f"trial {i}: did not stop within 300 s of {sig.name}", flush=True)
        return False
    stopped_at = last_step(out)
    run_to_end(out, processes, args)
    diff = max_difference(reference, out)
    same = diff == 0.0
    what = (
        "finished before the signal"
        if finished
        else f"{sig.name} at {delay:.1f} s, step {stopped_at}, exit {code}"
    )
    print(
        f"trial {i:2d}: {processes} process(es), {what} -> resumed -> "
        f"{'identical' if same else f'DIFFERENT (max |diff| {diff:.3g})'}",
        flush=True,
    )
    if same and not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return same


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="alternated over trials")
    p.add_argument("--seed", type=int, default=0, help="picks each trial's signal and moment")
    p.add_argument("--steps", type=int, default=16, help="optimizer steps per run")
    p.add_argument("--batch", type=int, default=4, help="train.per_device_batch_size")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the trials' output folders")
    p.add_argument(
        "--model", default=None, help="model.name_or_path (default: the demo config's, builtin:demo-llava)"
    )
    args = p.parse_args(argv)
    root = args.work or Path(tempfile.mkdtemp(prefix="chaos-resume-"))
    root.mkdir(parents=True, exist_ok=True)
    references, timings = {}, {}
    for n in sorted(set(args.processes)):
        out = root / f"unbroken-{n}"
        shutil.rmtree(out, ignore_errors=True)
        log = root / f"unbroken-{n}.log"
        with log.open("w") as f:  # a file, not a pipe: nobody reads while the run is polled
            proc = subprocess.Popen(command(out, n, args), cwd=REPO, env=env(), stdout=f, stderr=f)
            start = time.perf_counter()
            first, last = step_times(out, proc, args.steps)
            proc.wait(timeout=900)
        if proc.returncode != 0:
            raise SystemExit(f"unbroken run with {n} process(es) failed (exit {proc.returncode}); see {log}")
        references[n], timings[n] = out, (first, last, time.perf_counter() - start)
        print(
            f"unbroken run, {n} process(es): steps 1-{args.steps} logged at {first:.1f}-{last:.1f} s, "
            f"done in {timings[n][2]:.1f} s",
            flush=True,
        )
    results = []
    for i in range(args.trials):
        n = args.processes[i % len(args.processes)]
        try:
            results.append(trial(i, n, references[n], timings[n], root, args))
        except RuntimeError as e:
            print(f"trial {i:2d}: FAILED: {e}", flush=True)
            results.append(False)
    print(f"{sum(results)}/{len(results)} identical")
    if not args.work and all(results):
        shutil.rmtree(root, ignore_errors=True)
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
