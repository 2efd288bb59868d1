"""Atomic, resumable checkpoints: engine states, trainer state, per-rank RNG, exact data position.

Layout of ``output_dir/checkpoint-N/``::

    engine/               DeepSpeed model + optimizer + scheduler states (frozen weights excluded)
    trainer_state.json    step, epoch, samples consumed this epoch per rank, world size, run ids
    run_settings.json     the resolved settings the run computes with (checked on resume, see resume.py)
    rng_state_rank{r}.pt  python, numpy, torch (and CUDA) generator states of rank r
    COMPLETE              written last; a folder without it is never resumed from

Writes go to ``checkpoint-N.tmp-<nonce>``; after every rank has written and flushed its files,
rank 0 writes the marker and renames the folder. A kill at any moment leaves either the previous
complete checkpoints or a ``.tmp-`` folder that ``resume: auto`` ignores (and removes).
A save that runs out of disk space removes its ``.tmp-`` folder and raises :class:`NoSpaceLeft`;
the earlier checkpoints are untouched (retention runs only after a save succeeds).
Assumes ``output_dir`` is on a file system every rank sees (as DeepSpeed does).

Every ``.pt`` file is read with ``torch.load(weights_only=True)``: DeepSpeed's own loader unpickles
with ``weights_only=False``, which runs whatever code a crafted file carries, so the engine
instance's checkpoint engine is adapted to the restricted unpickler (allowing only the few
DeepSpeed classes its state holds, for the duration of the load). A checkpoint is verified
(every file opened that way, tensor data memory-mapped, not read) before the engine touches it:
``resume: auto`` falls back to the previous complete checkpoint when a file is truncated or
unreadable, and refuses outright a file holding anything but tensors and that state.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import types
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from visionzip_core.training import distributed as dist

MARKER = "COMPLETE"
ENGINE_TAG = "engine"
_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message is one line naming the file.

    ``unsafe`` is True when the file holds objects other than tensors and DeepSpeed's state
    (never fallen back from: someone wrote it on purpose).
    """

    def __init__(self, message: str, unsafe: bool = False):
        super().__init__(message)
        self.unsafe = unsafe


def _deepspeed_safe_globals() -> list:
    """Classes DeepSpeed pickles into its own states; plain data (no code runs when rebuilt)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


def safe_torch_load(path: str | os.PathLike, map_location=None, mmap: bool = False):
    """``torch.load(weights_only=True)`` that also admits DeepSpeed's state classes.

    Raises :class:`CheckpointError` (one line naming ``path``): ``unsafe`` when the file holds any
    other object, otherwise for a truncated, corrupt or unreadable file.
    """
    import pickle

    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        text = " ".join(str(err).split())
        found = re.search(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL) (\S+)", text)
        if "Weights only load failed" in text or found:
            what = found.group(1).rstrip(".,") if found else "a non-tensor object"
            raise CheckpointError(
                f"{path}: refused to load: it holds {what}, not only tensors and DeepSpeed's state "
                "(checkpoints are never unpickled with code)",
                unsafe=True,
            ) from None
        raise CheckpointError(f"{path}: cannot be read (corrupt): {text[:200]}") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile, KeyError) as err:
        text = " ".join(str(err).split())[:200]
        raise CheckpointError(
            f"{path}: cannot be read (truncated or corrupt): {text.split('. ')[0]}"
        ) from None


def verify_checkpoint(path: Path) -> None:
    """Open every file of checkpoint ``path`` the way resume will (tensors mapped, not read).

    Raises :class:`CheckpointError` naming the first file that cannot be used.
    """
    state_file = path / "trainer_state.json"
    try:
        TrainerState.from_json(state_file.read_text())
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"{state_file}: cannot be read: {' '.join(str(err).split())[:200]}") from None
    files = sorted((path / ENGINE_TAG).glob("*.pt")) + sorted(path.glob("rng_state_rank*.pt"))
    if not list((path / ENGINE_TAG).glob("*model_states.pt")):
        raise CheckpointError(f"{path / ENGINE_TAG}: no model states file")
    for f in files:
        safe_torch_load(f, map_location="cpu", mmap=True)


def use_safe_loading(engine) -> None:
    """Make this engine instance read checkpoint files with :func:`safe_torch_load` (no class patched)."""
    checkpoint_engine = engine.checkpoint_engine

    def load(self, path: str, map_location=None):
        return safe_torch_load(path, map_location=map_location)

    checkpoint_engine.load = types.MethodType(load, checkpoint_engine)


@dataclass
class TrainerState:
    """Where the run is. ``batches_in_epoch`` counts the micro-batches each rank consumed in
    ``epoch`` (``None`` in checkpoints written before it existed); ``samples_in_epoch`` the samples
    rank 0 consumed."""

    step: int = 0
    epoch: int = 0
    samples_in_epoch: int = 0
    batches_in_epoch: int | None = None
    world_size: int = 1
    total_steps: int = 0
    wandb_run_id: str | None = None
    nonfinite_steps: int = 0

    @classmethod
    def from_json(cls, text: str) -> TrainerState:
        fields = json.loads(text)
        fields.pop("extra", None)  # an unused key earlier versions wrote
        return cls(**fields)


def checkpoint_step(path: Path) -> int:
    """The step of a ``checkpoint-N`` folder."""
    return int(path.name.rsplit("-", 1)[1])


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / MARKER).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def resolve_resume(
    resume: str, output_dir: str | os.PathLike, warn: Callable[[str], None] = print
) -> Path | None:
    """The checkpoint to resume from: ``auto`` = latest complete one (or None), ``never``, or a path.

    Each candidate is verified (:func:`verify_checkpoint`). Under ``auto`` an unreadable one is
    passed over with a warning for the previous complete checkpoint; a named path must verify.
    Raises :class:`CheckpointError` for a file holding code, or when no candidate verifies.
    """
    if resume == "never":
        return None
    if resume == "auto":
        found = complete_checkpoints(output_dir)
        for i, path in enumerate(reversed(found)):
            try:
                verify_checkpoint(path)
                return path
            except CheckpointError as err:
                if err.unsafe:
                    raise
                older = found[-2 - i] if i + 1 < len(found) else None
                if older is None:
                    raise CheckpointError(
                        f"train.resume: {err}; no older complete checkpoint to resume"
                    ) from None
                warn(
                    f"warning: {err}; resuming from the previous checkpoint {older} instead "
                    "(the damaged one is replaced when this run saves that step)"
                )
        return None
    path = Path(resume)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"train.resume: {path} is not a complete checkpoint (no {MARKER} marker)")
    verify_checkpoint(path)
    return path


def remove_incomplete(output_dir: str | os.PathLike) -> list[Path]:
    """Delete ``checkpoint-*.tmp-*`` folders left by interrupted saves (call on rank 0 before training)."""
    root = Path(output_dir)
    stale = [p for p in root.glob("checkpoint-*.tmp-*") if p.is_dir()] if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class NoSpaceLeft(OSError):
    """A checkpoint did not fit on the disk; its partial folder is gone, earlier ones are kept."""


def _mount_of(path: Path) -> tuple[str, str]:
    """``(device, mount point)`` of the file system holding ``path``."""
    mount = path.resolve()
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    try:
        for line in Path("/proc/self/mounts").read_text().splitlines():
            device, point, *_ = line.split()
            if point == str(mount):
                return device, point
    except OSError:
        pass
    return "?", str(mount)


def _out_of_space(error: BaseException, root: Path) -> bool:
    """Whether ``error`` is the disk filling up. torch's zip writer hides the errno ("unexpected
    pos 36992 vs 36880", "file write failed"), so an error with no errno counts when the file
    system has (almost) nothing left."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        st = os.statvfs(root)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 16 * 2**20


def _write_marker(tmp: Path, final: Path, root: Path, step: int, nonce: str) -> None:
    (tmp / MARKER).write_text(f"step {step}\n")
    _fsync_tree(tmp)
    old = None
    if final.exists():  # only when a run with resume=never re-saves over an earlier run's step
        old = root / f"checkpoint-{step}.old-{nonce}"
        final.rename(old)
    os.replace(tmp, final)
    _fsync_dir(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _agree_on_failure(error: BaseException | None, root: Path, tmp: Path, step: int) -> None:
    """ALL RANKS: if any rank failed to write, every rank raises (no rank waits at a barrier for a
    failed one), after rank 0 removed the partial folder."""
    full = error is not None and _out_of_space(error, root)
    failed, full_any = dist.all_reduce_sum([float(error is not None), float(full)])
    if not failed:
        return
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
    if full_any:
        device, mount = _mount_of(root)
        kept = complete_checkpoints(root)
        keep = f"kept {kept[-1]}" if kept else "no earlier checkpoint"
        raise NoSpaceLeft(
            errno.ENOSPC,
            f"no space left on {device} (mounted at {mount}) while saving checkpoint-{step}: removed the "
            f"partial checkpoint, {keep}. Free space, then rerun (resume: auto continues from there)",
        ) from error
    if error is not None:
        raise error
    raise RuntimeError(f"checkpoint-{step}: another process failed to write its part; see its error")


def save_checkpoint(
    engine,
    state: TrainerState,
    output_dir: str | os.PathLike,
    nonce: str,
    keep: int,
    record: dict | None = None,
) -> Path:
    """Write ``checkpoint-{state.step}`` atomically and keep the last ``keep``. ALL RANKS must call this.

    ``record`` (rank 0) is written as ``run_settings.json``: what the run computes with.
    """
    root = Path(output_dir)
    final = root / f"checkpoint-{state.step}"
    tmp = root / f"checkpoint-{state.step}.tmp-{nonce}"
    error = None
    try:
        # Frozen weights are re-read from the base checkpoint on resume: projector/LoRA checkpoints
        # stay megabytes instead of a full copy of the model.
        engine.save_checkpoint(str(tmp), tag=ENGINE_TAG, save_latest=False, exclude_frozen_parameters=True)
        torch.save(rng_state(), tmp / f"rng_state_rank{dist.rank()}.pt")
        if dist.is_main():
            (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=1))
            if record is not None:
                (tmp / "run_settings.json").write_text(json.dumps(record, indent=1))
        _fsync_tree(tmp)
    except (OSError, RuntimeError) as e:
        error = e
    _agree_on_failure(error, root, tmp, state.step)
    error = None
    if dist.is_main():
        try:
            _write_marker(tmp, final, root, state.step, nonce)
        except OSError as e:
            error = e
    _agree_on_failure(error, root, tmp, state.step)
    if dist.is_main():
        for stale in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(engine, path: Path) -> TrainerState:
    """Restore engine states from ``path`` and return its trainer state. ALL RANKS must call this.

    RNG states are restored separately by :func:`restore_rng`, as the very last step before
    training resumes, so that nothing built in between consumes them.
    """
    state = TrainerState.from_json((path / "trainer_state.json").read_text())
    if state.world_size != dist.world_size():
        raise ValueError(
            f"train.resume: {path} was written by {state.world_size} processes; resume it with "
            f"{state.world_size} (this run has {dist.world_size()}) so that the data position stays exact"
        )
    if engine.load_universal_checkpoint():
        # DeepSpeed's universal-checkpoint reader unpickles with weights_only=False outside the
        # checkpoint engine; it is not used by this trainer's own checkpoints.
        raise CheckpointError(f"{path}: universal checkpoints are not supported; remove load_universal")
    use_safe_loading(engine)
    load_path, _ = engine.load_checkpoint(
        str(path),
        tag=ENGINE_TAG,
        load_module_strict=False,  # frozen weights were not saved; they come from the base model
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if load_path is None:
        raise RuntimeError(f"train.resume: DeepSpeed could not load {path / ENGINE_TAG}")
    return state


def restore_rng(path: Path) -> None:
    set_rng_state(safe_torch_load(path / f"rng_state_rank{dist.rank()}.pt"))
