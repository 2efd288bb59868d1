"""The stop request: first signal sets a flag, a repeat within the window is the same request,
a later one exits at once; no launcher is watched without one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from visionzip_core.training import preemption

_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    from visionzip_core.training import preemption
    stop = preemption.StopRequest().install()
    os.kill(os.getpid(), signal.SIGTERM)   # first: a flag only
    os.kill(os.getpid(), signal.SIGINT)    # a repeat inside the window: the same request
    time.sleep(0.2)
    assert stop.reason == "received SIGTERM" and stop.agreed(), stop.reason
    print("still running", flush=True)
    time.sleep(preemption.REPEAT_WINDOW_S + 0.3)
    os.kill(os.getpid(), signal.SIGTERM)   # a second request: exits at once
    time.sleep(5)
    print("not reached", flush=True)
    """
)


def test_first_signal_requests_a_stop_and_a_later_one_exits_at_once():
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=60
    )
    assert "still running" in proc.stdout and "not reached" not in proc.stdout, proc.stderr
    assert proc.returncode == -signal.SIGTERM
    assert "received SIGTERM; stopping after this optimizer step" in proc.stderr


def test_no_stop_requested_means_no_agreement():
    assert not preemption.StopRequest().agreed()


def test_launchers_are_recognised_by_their_command_line():
    named = subprocess.Popen(["bash", "-c", "exec -a torchrun sleep 30"])
    module = subprocess.Popen(
        [sys.executable, "-u", "-c", "import time; time.sleep(30)", "deepspeed.launcher.launch"]
    )
    plain = subprocess.Popen(["sleep", "30"])
    try:
        import time

        time.sleep(0.5)  # let bash exec
        assert preemption._is_launcher(named.pid)
        assert not preemption._is_launcher(plain.pid)
        assert not preemption._is_launcher(os.getpid())
        # a module launcher's name sits a few arguments in: [python, -u, -m, deepspeed.launcher.launch]
        assert preemption._is_launcher(module.pid)
    finally:
        for p in (named, module, plain):
            p.kill()
            p.wait()
