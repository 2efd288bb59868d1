"""A command forked from the warm interpreter (tests/warm_python.py) behaves as the same command
started cold: arguments, working folder, environment, import path, output, exit code, signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

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
