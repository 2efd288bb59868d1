"""A command forked from the warm interpreter (tests/warm_python.py) behaves as the same command
started cold: arguments, working folder, environment, import path, output, exit code, signals, the
way it ends; torchrun's workers forked warm (``warm_ranks``) as torchrun starts them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import warm_python

SCRIPT = """
import json, os, sys
print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0],
                  "probe": os.environ.get("WARM_PROBE_WANDB_X"), "wandb": os.environ.get("WANDB_PROBE"),
                  "main": __name__}))
print("to stderr\\r\\nnext", file=sys.stderr)
sys.exit(int(sys.argv[1]))
"""


def _both(cmd, **kw):
    cold = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)
    warm = warm_python.run(cmd, capture_output=True, text=True, timeout=120, **kw)
    return cold, warm


def test_a_script_and_c_code_run_warm_as_they_run_cold(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "WANDB_PROBE": "runtime-read"}
    for cmd in ([sys.executable, str(script), "3", "x y"], [sys.executable, "-c", SCRIPT, "4"]):
        cold, warm = _both(cmd, cwd=work, env=env)
        assert (warm.returncode, warm.stdout, warm.stderr) == (cold.returncode, cold.stdout, cold.stderr)
        assert warm.returncode in (3, 4) and '"runtime-read"' in warm.stdout and '"__main__"' in warm.stdout


def test_it_forks_instead_of_starting_and_falls_back_to_a_cold_start_when_it_must(tmp_path):
    pids = "import os; print(os.getppid())"
    warm = warm_python.run([sys.executable, "-c", pids], capture_output=True, text=True)
    server = warm_python._get_server()
    assert int(warm.stdout) == server.proc.pid  # the warm process's child
    # A variable the imports set (torch's inductor, its cache folder), set differently by the time
    # of the command (the suite's own imports set it later): still warm.
    later = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    warm = warm_python.run([sys.executable, "-c", pids], env=later, capture_output=True, text=True)
    assert int(warm.stdout) == server.proc.pid
    # A variable read at import time that differs from the warm process's: a cold start.
    cold = warm_python.run(
        [sys.executable, "-c", pids],
        env={**os.environ, "HF_HOME": "/elsewhere"},
        capture_output=True,
        text=True,
    )
    assert int(cold.stdout) == os.getpid()
    flags = warm_python.run([sys.executable, "-I", "-c", pids], capture_output=True, text=True)
    assert int(flags.stdout) == os.getpid()


def test_a_killed_child_reports_the_signal_as_popen_does(tmp_path):
    mark = tmp_path / "started"
    code = f"import pathlib, time; pathlib.Path({str(mark)!r}).touch(); time.sleep(60)"
    proc = warm_python.popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL)
    assert isinstance(proc, warm_python.WarmProcess)
    deadline = time.time() + 60
    while not mark.exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    # the warm process serves the next command
    assert warm_python.run([sys.executable, "-c", "raise SystemExit(5)"]).returncode == 5


ENDINGS = [
    "import sys; sys.exit('a message')",
    "raise ValueError('the last line')",
    "import atexit; atexit.register(print, 'at exit')",
    "import threading, time; threading.Thread(target=lambda: (time.sleep(0.5), print('joined'))).start()",
    "import sys; sys.stdout.write('no newline')",
    "f = open('unclosed.txt', 'w'); f.write('flushed at the end')",
    "class A:\n    def __del__(self): print('finalised')\na = A(); a.cycle = a",
]


def test_a_command_ends_as_it_ends_cold(tmp_path):
    """Exit code, messages, threads, atexit, open files, finalisers: a warm child skips only the
    tear-down of the modules it shares with the warm process (tests/warm_python.py)."""
    for i, code in enumerate(ENDINGS):
        ends = []
        for start in (subprocess.run, warm_python.run):
            work = tmp_path / f"{i}-{start.__module__}"
            work.mkdir()
            proc = start([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, timeout=120)
            written = [f.read_text() for f in work.iterdir()]
            ends.append((proc.returncode, proc.stdout, proc.stderr.splitlines()[-1:], written))
        assert ends[0] == ends[1], code


RANKS = """
import json, os, sys, time
import torch, torch.distributed as dist
names = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
         "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "TORCHELASTIC_RESTART_COUNT",
         "TORCHELASTIC_MAX_RESTARTS"]
dist.init_process_group("gloo")
total = torch.ones(1) * (dist.get_rank() + 1)
dist.all_reduce(total)
# One write per line: the ranks share the output, and print's text and newline are two writes unbuffered.
sys.stdout.write(json.dumps({**{k: os.environ.get(k) for k in names}, "sum": total.item()}) + "\\n")
sys.stdout.flush()
if sys.argv[1] == "fail":
    if dist.get_rank() == 1:
        sys.exit(3)
    time.sleep(300)  # waits for the failed rank: its launcher stops it
dist.destroy_process_group()
"""


def test_warm_ranks_get_torchrun_s_environment_and_a_failed_rank_stops_the_run(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    for how in ("pass", "fail"):
        ends = []
        for warm in (False, True):
            cmd = [torchrun, "--master_port", str(warm_python.free_port()), "--nproc_per_node", "2"]
            started = time.time()
            proc = warm_python.run(
                [*cmd, str(script), how],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                warm_ranks=warm,
            )
            assert time.time() - started < 100, how  # rank 0 was stopped, not left to its sleep
            ends.append((proc.returncode, sorted(proc.stdout.splitlines())))
        assert ends[0] == ends[1], how
        assert [json.loads(line)["RANK"] for line in ends[1][1]] == ["0", "1"]
        assert ends[1][0] == (0 if how == "pass" else 1)
