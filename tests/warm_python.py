"""``python script.py ...`` without paying for the imports each time: a process that imported the
trainer's and the commands' heavy modules once (torch, transformers, DeepSpeed, matplotlib, ...)
forks one child per command, and the child runs the script as ``python`` would.

On 2 cores a fresh interpreter spends 6-15 s importing before a tiny run's first step, which is most
of such a test. The child is still a process of its own (its own pid, exit code, signals, process
group, environment, working folder, stdout and stderr), so what the tests assert on is the same;
what it does not show is the cold start itself. The tests that are about the start (``--help``, the
log-noise checks, the launchers, the installed wheel) start fresh interpreters, and every entry
point keeps at least one such test.

    from warm_python import run, popen
    proc = run([sys.executable, "train/finetune.py", ...], cwd=REPO, env=env, capture_output=True, text=True)

A command this cannot run warm (not ``sys.executable script`` or ``-c code``, interpreter flags, an
environment that differs from the warm process's in a variable read at import time) goes to
:mod:`subprocess` unchanged. ``VISIONZIP_TEST_COLD=1`` sends every command there.

Two more things make a child cheap:

- ``warm_ranks=True`` with a one-node ``torchrun --nproc_per_node N script ...`` command forks the N
  workers warm, each with the environment torchrun's agent gives it (``RANK``, ``LOCAL_RANK``,
  ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT`` ...), their output merged as torchrun merges it;
  the first rank that fails stops the others and the run exits 1, as under torchrun. For tests of
  several processes, not of the launcher: the launcher tests run torchrun itself.
- A child ends as ``python`` ends (exit code, traceback, threads joined, atexit functions, open
  files flushed, standard streams flushed) but without tearing down the modules it shares with the
  warm process: that tear-down writes to every shared page, which the kernel then copies (about
  2 s a child on 2 cores). The warm process freezes its objects (``gc.freeze``) for the same reason:
  a child's collections walk only the child's own objects.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

# Variables the scripts read at run time (not at import), so a child may set them differently
# from the warm process. Anything else that differs means a cold start.
_RUNTIME_ENV = (
    "WANDB_",
    "TORCHINDUCTOR_",
    "PYTEST_",  # PYTEST_CURRENT_TEST names the running test
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)
_RUNTIME_KEYS = {"TORCH_EXTENSIONS_DIR", "PYTHONUNBUFFERED"}

# What a run imports; imported once in the warm process. DeepSpeed's ZeRO optimizer check imports
# its Muon optimizer, which imports torch's inductor (seconds on every start).
_PRELOAD = """
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot
import deepspeed
import deepspeed.runtime.zero.muon.muon_optimizer
import datasets
import peft
import wandb
import transformers
from transformers import (
    CLIPImageProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration,
    Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration,
)
import visionzip_core.training.recipe
import visionzip_core.cli.check_data, visionzip_core.cli.evaluate, visionzip_core.cli.generate
import visionzip_core.cli.plan, visionzip_core.cli.show_tokens
"""

# The warm process: reads one JSON request per line on stdin, answers on the fd it is given.
_SERVER = r"""
import gc, json, os, runpy, signal, sys, time, traceback, types
if sys.path and sys.path[0] == "":  # imports resolve as for a script elsewhere, not from this folder
    sys.path.pop(0)
answer = os.fdopen(int(sys.argv[1]), "w", buffering=1)
preload_error = None
before = set(os.environ)
try:
    exec(compile(sys.argv[2], "<preload>", "exec"), {})
except Exception:
    preload_error = traceback.format_exc()
added = sorted(set(os.environ) - before)  # what the imports set, as they would in any process
# What the imports made is never garbage: out of the collector's sight, a child's collections walk
# only its own objects, and do not write to (so copy) the pages it shares with this process.
gc.collect()
gc.freeze()
answer.write(json.dumps({"ready": True, "error": preload_error, "added": added}) + "\n")
sys.stdout.flush(); sys.stderr.flush()

code_module = None

def child(req):
    answer.close()
    # Appending: the ranks of one run share the files, as torchrun's workers share its stdout.
    out = os.O_WRONLY | os.O_APPEND
    fds = [os.open(os.devnull, os.O_RDONLY), os.open(req["stdout"], out), os.open(req["stderr"], out)]
    for fd, target in zip(fds, (0, 1, 2)):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    args = req["args"]
    source = args[1] if args[0] == "-c" else open(args[0]).read()
    if "training.recipe" in source or "training import recipe" in source:
        # Importing the recipe sets the process's environment defaults (a launcher-less run's
        # RANK, WORLD_SIZE, ...); here it was imported before this child's environment was set.
        from visionzip_core.training import distributed
        distributed.set_env_defaults()
    if args[0] == "-c":
        sys.argv = ["-c", *args[2:]]
        sys.path.insert(0, "")
        global code_module
        code_module = sys.modules["__main__"] = types.ModuleType("__main__")
        exec(compile(args[1], "<string>", "exec"), vars(code_module))
    else:
        sys.argv = list(args)
        sys.path.insert(0, os.path.dirname(os.path.abspath(args[0])))
        runpy.run_path(args[0], run_name="__main__")

def exit_as_python(main):
    # Ends the child as `python script` ends (the exit code of its SystemExit or exception, the
    # traceback through sys.excepthook, its threads joined, its atexit functions run, the standard
    # streams flushed), less the tear-down of every module: that writes to the pages the child shares
    # with the warm process, which copies them (about 2 s a child, as long as most tiny runs).
    code, interrupted = 0, False
    try:
        main()
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException as e:
        sys.excepthook(type(e), e, e.__traceback__)
        code, interrupted = 1, isinstance(e, KeyboardInterrupt)
    import atexit, threading
    threading._shutdown()
    atexit._run_exitfuncs()
    # What the script still holds goes as at the interpreter's end (a file left open is flushed and
    # closed): its module's names, then the cycles among its objects.
    if code_module is not None:  # `-c` code's module (a script's went when runpy returned)
        vars(code_module).clear()
    gc.collect()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    if interrupted:  # as the interpreter ends on an unhandled KeyboardInterrupt: by SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code & 0xFF)

def rank_env(rank, ranks):
    # What torchrun's agent sets for a worker of a one-node run (the rendezvous address and port
    # come with the request). Without TORCHELASTIC_USE_AGENT_STORE rank 0 hosts the store itself.
    return dict(
        RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0", ROLE_RANK=str(rank), ROLE_NAME="default",
        WORLD_SIZE=str(ranks), LOCAL_WORLD_SIZE=str(ranks), GROUP_WORLD_SIZE="1", ROLE_WORLD_SIZE=str(ranks),
        TORCHELASTIC_RESTART_COUNT="0", TORCHELASTIC_MAX_RESTARTS="0",
    )

def wait_ranks(pids):
    # As torchrun's agent does: the first rank that fails stops the others (SIGTERM, SIGKILL after
    # 30 s), and the run's exit code is 1 if any rank failed.
    codes, kill_at = {}, None
    while len(codes) < len(pids):
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid:
            codes[pid] = os.waitstatus_to_exitcode(status)
            if codes[pid] != 0 and kill_at is None:
                for other in set(pids) - set(codes):
                    os.kill(other, signal.SIGTERM)
                kill_at = time.monotonic() + 30
            continue
        if kill_at is not None and time.monotonic() > kill_at:
            for other in set(pids) - set(codes):
                os.kill(other, signal.SIGKILL)
            kill_at = float("inf")
        time.sleep(0.05)
    return 0 if all(code == 0 for code in codes.values()) else 1

for line in sys.stdin:
    req = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush()
    pids = []
    for rank in range(req.get("ranks") or 1):
        pid = os.fork()
        if pid == 0:
            del line
            if req.get("ranks"):
                req["env"].update(rank_env(rank, req["ranks"]))
            exit_as_python(lambda: child(req))
        pids.append(pid)
    answer.write(json.dumps({"pid": pids[0], "pids": pids}) + "\n")
    if req.get("ranks"):
        code = wait_ranks(pids)
    else:
        code = os.waitstatus_to_exitcode(os.waitpid(pids[0], 0)[1])
    answer.write(json.dumps({"returncode": code}) + "\n")
"""


def _cold() -> bool:
    return os.environ.get("VISIONZIP_TEST_COLD") == "1"


def _differs_at_import(env: dict, base: dict, set_by_imports: set[str]) -> list[str]:
    """Variables of ``env`` that differ from ``base`` and may have been read at import time.
    ``set_by_imports``: variables the modules set when imported (torch's inductor sets its cache
    folder), in the warm process as in any process that imports them (the tests' own included)."""
    keys = set(env) ^ set(base) | {k for k in env.keys() & base.keys() if env[k] != base[k]}
    return sorted(
        k for k in keys if not (k.startswith(_RUNTIME_ENV) or k in _RUNTIME_KEYS or k in set_by_imports)
    )


class _Server:
    """The warm process (one per test session, started on first use)."""

    def __init__(self):
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
        self.env.pop("RANK", None)
        read, write = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER, str(write), _PRELOAD],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=self.env,
            pass_fds=(write,),
            text=True,
        )
        os.close(write)
        self.answers = os.fdopen(read, "r")
        ready = self._answer()
        if ready.get("error"):
            raise RuntimeError(f"the warm process could not import its modules:\n{ready['error']}")
        self.set_by_imports = set(ready["added"])
        self.lock = threading.Lock()

    def _answer(self) -> dict:
        line = self.answers.readline()
        if not line:
            raise RuntimeError(f"the warm process exited ({self.proc.poll()})")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.answers.close()


_server: _Server | None = None


def _get_server() -> _Server:
    global _server
    if _server is None or _server.proc.poll() is not None:
        _server = _Server()
        atexit.register(_server.close)
    return _server


class WarmProcess:
    """A forked child running one command; the part of :class:`subprocess.Popen` the tests use."""

    def __init__(self, args: list[str], cwd, env: dict, stdout: Path, stderr: Path, ranks: int | None = None):
        self.args = args
        self._server = _get_server()
        request = {
            "args": args,
            "cwd": str(cwd or os.getcwd()),
            "env": env,
            "stdout": str(stdout),
            "stderr": str(stderr),
            "ranks": ranks,
        }
        self._server.proc.stdin.write(json.dumps(request) + "\n")
        self._server.proc.stdin.flush()
        started = self._server._answer()
        #: the child's pid; with ``ranks``, rank 0's (``pids``: every rank's, by rank)
        self.pid, self.pids = started["pid"], started["pids"]
        self.returncode: int | None = None
        self._waiter = threading.Thread(target=self._wait_answer, daemon=True)
        self._waiter.start()

    def _wait_answer(self) -> None:
        try:
            self.returncode = self._server._answer()["returncode"]
        finally:
            self._server.lock.release()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._waiter.join(timeout)
        if self._waiter.is_alive():
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """To the child; with ``ranks``, to every rank (as torchrun forwards the signals it gets)."""
        if self.returncode is None:
            for pid in self.pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _warm_args(cmd) -> list[str] | None:
    """The script and its arguments when ``cmd`` is ``sys.executable script ...`` or ``-c code``."""
    cmd = [str(c) for c in cmd]
    if len(cmd) < 2 or cmd[0] != sys.executable:
        return None
    if cmd[1] == "-c" and len(cmd) >= 3:
        return cmd[1:]
    if cmd[1].startswith("-"):
        return None
    return cmd[1:]


def _can_run_warm(cmd, env: dict | None) -> list[str] | None:
    """The arguments to run warm, with the warm process reserved for them; None: run it cold."""
    if _cold():
        return None
    args = _warm_args(cmd)
    if args is None:
        return None
    server = _get_server()
    if env is not None and (differ := _differs_at_import(env, server.env, server.set_by_imports)):
        _log_cold(args, f"environment differs in {differ}")
        return None
    if not server.lock.acquire(blocking=False):  # another warm child still runs: this one starts cold
        _log_cold(args, "another warm child runs")
        return None
    return args


def _log_cold(args: list[str], why: str) -> None:
    """``VISIONZIP_TEST_WARM_LOG=FILE`` appends each command that could not run warm, and why."""
    if path := os.environ.get("VISIONZIP_TEST_WARM_LOG"):
        with open(path, "a") as f:
            f.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?')}: {args[0]}: {why}\n")


def free_port() -> int:
    """A port no one listens on now: the launchers' default (29500) may be taken by another job on
    a shared machine, and the rendezvous then fails with EADDRINUSE."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_ranks(cmd, env: dict | None) -> tuple[list[str], dict, int] | None:
    """``([sys.executable, script, ...], env, N)`` for ``torchrun [--master_port P] --nproc_per_node N
    script ...`` (this environment's torchrun, no other option): the command each of the N workers
    runs, and the environment with the rendezvous address torchrun would give them."""
    cmd = [str(c) for c in cmd]
    if not cmd or Path(cmd[0]) != Path(sys.executable).parent / "torchrun":
        return None
    options, i = {}, 1
    while i + 1 < len(cmd) and cmd[i].startswith("--"):
        options[cmd[i]] = cmd[i + 1]
        i += 2
    if (
        set(options) - {"--master_port", "--nproc_per_node"}
        or not options.get("--nproc_per_node", "").isdigit()
    ):
        return None
    port = options.get("--master_port") or str(free_port())
    env = {**(env if env is not None else os.environ), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    return [sys.executable, *cmd[i:]], env, int(options["--nproc_per_node"])


def _warm_plan(cmd, env: dict | None, warm_ranks: bool) -> tuple[list[str] | None, dict | None, int | None]:
    """``(args, env, ranks)`` of ``cmd`` run warm (``ranks``: workers of ``warm_ranks``' torchrun
    command, else None), or ``(None, env, None)``: run ``cmd`` as given."""
    if warm_ranks and (as_ranks := _as_ranks(cmd, env)):
        python_cmd, rank_env, ranks = as_ranks
        if (args := _can_run_warm(python_cmd, rank_env)) is not None:
            return args, rank_env, ranks
        return None, env, None
    return _can_run_warm(cmd, env), env, None


def run(
    cmd,
    *,
    cwd=None,
    env=None,
    capture_output=False,
    text=False,
    timeout=None,
    check=False,
    warm_ranks=False,
    **kw,
):
    """:func:`subprocess.run` for ``[sys.executable, script, ...]``, run warm where it can be.
    ``warm_ranks``: ``cmd`` is a one-node ``torchrun`` command, whose workers are forked warm
    (:func:`_as_ranks`); where they cannot be, torchrun runs as given."""
    args, env, ranks = (None, env, None) if kw else _warm_plan(cmd, env, warm_ranks)
    if args is None:
        return subprocess.run(
            cmd,
            cwd=cwd,
            env=env,
            capture_output=capture_output,
            text=text,
            timeout=timeout,
            check=check,
            **kw,
        )
    with tempfile.TemporaryDirectory(prefix="warm-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        out.touch()
        err.touch()
        proc = WarmProcess(args, cwd, env if env is not None else dict(os.environ), out, err, ranks)
        try:
            proc.wait(timeout)
        except BaseException:  # a timeout or an interrupt: the child goes too, as with subprocess.run
            proc.kill()
            proc.wait()
            raise
        stdout, stderr = out.read_bytes(), err.read_bytes()
    if text:  # as subprocess's text mode reads them: universal newlines
        stdout, stderr = (
            b.decode(errors="replace").replace("\r\n", "\n").replace("\r", "\n") for b in (stdout, stderr)
        )
    if not capture_output:
        # Not captured: pass it on, as a child sharing the test's stdout and stderr would.
        (sys.stdout.buffer if not text else sys.stdout).write(stdout)
        (sys.stderr.buffer if not text else sys.stderr).write(stderr)
        stdout = stderr = None
    done = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if check:
        done.check_returncode()
    return done


def popen(cmd, *, cwd=None, env=None, stdout=None, stderr=None, warm_ranks=False):
    """:class:`subprocess.Popen` for ``[sys.executable, script, ...]`` whose output is not read
    (``stdout``/``stderr`` ``DEVNULL`` or None), run warm where it can be; ``warm_ranks`` as in
    :func:`run`. torchrun run as given starts each worker in a session of its own: see
    :func:`kill_all` for stopping every process of either kind."""
    read = any(s not in (None, subprocess.DEVNULL) for s in (stdout, stderr))
    args, env, ranks = (None, env, None) if read else _warm_plan(cmd, env, warm_ranks)
    if args is None:
        return subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=stdout, stderr=stderr, start_new_session=bool(warm_ranks)
        )
    return WarmProcess(
        args, cwd, env if env is not None else dict(os.environ), Path(os.devnull), Path(os.devnull), ranks
    )


def kill_all(proc) -> None:
    """SIGKILL every process of a run, as a node failure would: a :class:`WarmProcess`'s child or
    ranks, or a launcher and its workers (torchrun starts each worker in a session of its own, and
    killing the launcher alone lets the workers checkpoint and exit)."""
    if isinstance(proc, WarmProcess):
        proc.kill()
    else:
        for pid in [*_children(proc.pid), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    proc.wait()


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found
