"""Graceful stop on SIGTERM/SIGINT, agreed by every rank, and workers that never outlive their launcher.

- The first SIGTERM or SIGINT only sets a flag. The trainer asks :meth:`StopRequest.agreed` once
  per optimizer step (ALL RANKS: one tiny all-reduce), so a signal that reached only some ranks
  still stops all of them after the same step: they save a checkpoint together and exit with
  :data:`EXIT_PREEMPTED`. A later signal exits at once.
- One preemption often reaches a worker twice within a moment: SLURM signals every process of
  the step, and torchrun / the deepspeed launcher forward the signal they get to their workers.
  A repeat within :data:`REPEAT_WINDOW_S` of the first counts as the same request.
- A worker watches its launcher chain (``torchrun``, or ``deepspeed`` -> ``deepspeed.launcher.launch``):
  ``PR_SET_PDEATHSIG`` delivers SIGTERM when the direct parent dies (``kill -9`` of the torchrun
  agent), and a thread polls the other launcher processes (the ``deepspeed`` runner, which on
  SIGTERM dies without telling the per-node launcher). Launcher death becomes the same graceful stop.
  Plain ``python train/finetune.py`` has no launcher and nothing is watched.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

from visionzip_core.training import distributed as dist

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request after a complete checkpoint; rerun to resume
REPEAT_WINDOW_S = 2.0
# argv entries (a script's base name or a ``-m`` module) that mark a launcher process
_LAUNCHERS = {
    "torchrun",
    "torch.distributed.run",
    "torch.distributed.launch",
    "deepspeed",
    "deepspeed.launcher.launch",
    "deepspeed.launcher.runner",
}
_PR_SET_PDEATHSIG = 1


class StopRequest:
    """Set by a signal or by the launcher watch; read on every rank through :meth:`agreed`."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._first_at = 0.0

    def install(self) -> StopRequest:
        """Handle SIGTERM and SIGINT in this process (only the main thread can; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        return self

    def request(self, reason: str) -> None:
        if self.reason is None:
            self.reason, self._first_at = reason, time.monotonic()
            print(
                f"rank {dist.rank()}: {reason}; stopping after this optimizer step with a checkpoint "
                f"(exit {EXIT_PREEMPTED}). Signal again to exit at once.",
                file=sys.stderr,
                flush=True,
            )

    def _on_signal(self, signum: int, frame) -> None:
        if self.reason is not None and time.monotonic() - self._first_at > REPEAT_WINDOW_S:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)  # the default action: exit at once (128 + signum)
            return
        self.request(f"received {signal.Signals(signum).name}")

    def agreed(self) -> bool:
        """Whether any rank was asked to stop. ALL RANKS must call this at the same point."""
        return dist.all_reduce_sum([1.0 if self.reason is not None else 0.0])[0] > 0


def _stat(pid: int) -> tuple[int, str] | None:
    """``(parent pid, start time)`` of a live process, from /proc; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if fields[0] in ("Z", "X"):  # a zombie has exited; its parent has not reaped it yet
        return None
    return int(fields[1]), fields[19]


def _is_launcher(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return False
    # e.g. [python, -u, -m, deepspeed.launcher.launch, ...] or [python, /venv/bin/torchrun, ...]
    return any(os.path.basename(part) in _LAUNCHERS for part in argv[:5])


def launcher_chain() -> list[tuple[int, str]]:
    """``(pid, start time)`` of this process's launcher ancestors, nearest first ([] on non-Linux)."""
    chain, pid = [], os.getppid()
    while pid > 1 and _is_launcher(pid):
        stat = _stat(pid)
        if stat is None:
            break
        chain.append((pid, stat[1]))
        pid = stat[0]
    return chain


def watch_launcher(stop: StopRequest, poll_s: float = 1.0) -> list[int]:
    """Turn the death of any launcher above this worker into ``stop``. Returns the watched pids."""
    chain = launcher_chain()
    if not chain:
        return []
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the polling thread below still catches it, within poll_s
    if os.getppid() != chain[0][0]:  # the parent died before prctl took effect
        stop.request("the launcher exited")

    def poll() -> None:
        while stop.reason is None:
            for pid, started in chain:
                stat = _stat(pid)
                if stat is None or stat[1] != started:
                    stop.request(f"the launcher (pid {pid}) exited")
                    return
            time.sleep(poll_s)

    threading.Thread(target=poll, name="launcher-watch", daemon=True).start()
    return [pid for pid, _ in chain]
