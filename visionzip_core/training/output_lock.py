"""One writer per output folder: an exclusive ``flock`` on ``output_dir/.lock`` for the run's lifetime.

Rank 0 takes the lock before the run writes anything (metrics, checkpoints, clean-ups) and keeps
it until the process exits. The kernel drops a ``flock`` when its holder dies, ``kill -9``
included, so a lock left by a dead run never blocks the next one. The file itself stays; it
records the holder (host, PID, start time) for the message a second run prints. Do not delete
it while a run holds it: a new file would be a new, free lock.

Network file systems (only rank 0 locks, so what matters is the file system of ``output_dir``):
  - NFS (Linux client): ``flock`` is carried by NFS byte-range locks, so it excludes runs on other
    hosts too, as long as locking works on the mount. A mount with ``nolock`` (or ``local_lock``)
    keeps locks on one host: two hosts can then both write. If the holder's host crashes, the
    server releases the lock when its lease expires (NFSv4: about 90 s).
  - Lustre: cluster-wide only when mounted with ``-o flock``; ``localflock`` locks per node; with
    neither, ``flock`` fails. GPFS/BeeGFS: cluster-wide by default.
  - Where ``flock`` fails (ENOLCK, ENOSYS, EOPNOTSUPP, EINVAL) the run warns once and goes on
    without the lock: nothing then stops a second run in the same folder.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from visionzip_core.training import distributed as dist

LOCK_FILE = ".lock"


class OutputDirLocked(RuntimeError):
    """Another live run holds ``output_dir`` (or the folder cannot be created or locked at all)."""


class OutputLock:
    """A held lock (or a no-op where the file system has none); released by :meth:`release` or exit."""

    def __init__(self, fd: int | None, path: Path):
        self.fd, self.path = fd, path

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096).decode(errors="replace")
    try:
        info = json.loads(raw)
        return f"PID {info['pid']} on {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not written its details yet"


def acquire(output_dir: Path) -> OutputLock:
    """Lock ``output_dir`` for this process, or raise :class:`OutputDirLocked` naming the holder."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's details stay readable
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise OutputDirLocked(
            f"train.output_dir: {output_dir} is in use by another run ({holder}); wait for it to end, "
            "or use another train.output_dir"
        ) from None
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            os.close(fd)
            raise
        print(
            f"warning: cannot lock {path} ({os.strerror(e.errno)}): this file system has no flock, so "
            "nothing stops a second run from writing into the same train.output_dir",
            file=sys.stderr,
            flush=True,
        )
        os.close(fd)
        return OutputLock(None, path)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())
    details = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": started})
    os.ftruncate(fd, 0)
    os.pwrite(fd, (details + "\n").encode(), 0)
    return OutputLock(fd, path)


MARKER_FILE = ".rank0-marker"


def write_marker(output_dir: Path) -> str:
    """Rank 0: write a fresh random token into ``output_dir``; the other nodes look for it."""
    token = os.urandom(8).hex()
    (output_dir / MARKER_FILE).write_text(token + "\n")
    return token


def sees_marker(output_dir: Path, token: str) -> bool:
    """Whether this node sees rank 0's ``output_dir`` (the token rank 0 just wrote is there)."""
    try:
        return (output_dir / MARKER_FILE).read_text().strip() == token
    except OSError:
        return False


def check_shared(output_dir: Path) -> None:
    """Raise :class:`OutputDirLocked` unless every node sees rank 0's ``output_dir``.

    Rank 0 of node 0 alone writes checkpoints, metrics and exports, and every rank reads the
    checkpoint on resume: a node-local folder per node would split the run silently. Each node's
    first process (``LOCAL_RANK`` 0) looks for a token rank 0 has just written. ALL RANKS must call this.
    """
    if dist.world_size() == 1:
        return
    token = dist.broadcast_object(write_marker(output_dir) if dist.is_main() else None)
    first_on_node = int(os.environ.get("LOCAL_RANK", "0")) == 0
    blind = None if not first_on_node or sees_marker(output_dir, token) else socket.gethostname()
    hosts = [h for h in dist.all_gather_object(blind) if h is not None]
    if dist.is_main():
        (output_dir / MARKER_FILE).unlink(missing_ok=True)  # leave nothing behind
    if hosts:
        raise OutputDirLocked(not_shared_message(output_dir, hosts))


def not_shared_message(output_dir: Path, hosts: list[str]) -> str:
    return (
        f"train.output_dir: {output_dir} is not the same folder on every node (rank 0's marker file "
        f"is missing on {', '.join(hosts)}); put it on a file system all nodes share, since rank 0 "
        "writes checkpoints that every rank reads on resume"
    )


def claim(output_dir: Path) -> OutputLock | None:
    """One writer per output folder: rank 0 locks it before anything is written; every rank learns
    the outcome (raises :class:`OutputDirLocked` on every rank). ALL RANKS must call this."""
    lock, refusal = None, None
    if dist.is_main():
        try:
            lock = acquire(Path(output_dir))
        except OutputDirLocked as e:
            refusal = str(e)
        except OSError as e:  # e.g. a file in the way, no permission: say so on every rank, no hang
            refusal = f"train.output_dir: cannot use {output_dir} ({e.strerror or e})"
    refusal = dist.broadcast_object(refusal)
    if refusal:
        raise OutputDirLocked(refusal)
    try:
        check_shared(Path(output_dir))
    except OutputDirLocked:
        if lock is not None:
            lock.release()
        raise
    return lock
