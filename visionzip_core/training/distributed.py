"""Process-group set-up that works the same under ``deepspeed``, ``torchrun`` and plain ``python``.

Hazards handled here (each seen on real runs):
  - Plain ``python train.py`` has none of RANK/WORLD_SIZE/MASTER_*; DeepSpeed then falls into
    MPI discovery and fails. We fill single-process defaults when they are absent.
  - The ``deepspeed`` launcher appends ``--local_rank=N``; the entry point must accept it.
  - On CPU the backend must be gloo (nccl needs CUDA).
  - ZeRO-3 with several processes can abort at exit inside gloo's threads unless the engine is
    destroyed and the group torn down in order; see :func:`shutdown`.
  - Rank 0 alone preflights the dataset, builds the ZeRO-3 export and scores generation while the
    other ranks wait in a collective. DeepSpeed's default timeout (10 minutes) kills such a wait on
    a large dataset; the group's timeout is ``train.collective_timeout_min`` (long by default).
"""

from __future__ import annotations

import gc
import os
from datetime import timedelta

import torch

from visionzip_core.training.repo_paths import REPO_ROOT, in_checkout


def set_env_defaults() -> None:
    """Environment for a launcher-less run and for quiet, cached first-use builds.

    Call before importing deepspeed: it reads DS_ACCELERATOR and TORCH_EXTENSIONS_DIR at import.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed compiles ops (e.g. deepspeed_shm_comm with 2+ CPU processes) on first use; keep the
    # builds in the project's cache so that they are reused across runs and survive ~/.cache cleans.
    # An installed package leaves torch's default (~/.cache): never write into site-packages.
    if in_checkout():
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".cache" / "torch_extensions"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Micro-batches change shape from step to step (token budgets, packing, images or not): with
    # fixed-size cached blocks the allocator fragments and a long run can fail out of memory well
    # below the peak it needs. Expandable segments grow instead. The user's own setting wins (the
    # variable has two names since torch 2.9); read when CUDA first allocates, so set it here.
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_ALLOC_CONF"] = "expandable_segments:True"
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0",
            LOCAL_RANK=os.environ.get("LOCAL_RANK", "0"),
            WORLD_SIZE="1",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
            # Port 0: the single process's store takes whatever port is free when it listens.
            # Picking one here and listening later raced other processes for it (EADDRINUSE).
            MASTER_PORT=os.environ.get("MASTER_PORT", "0"),
        )


def init(
    local_rank_arg: int | None = None, quiet: bool = True, timeout: timedelta = timedelta(minutes=120)
) -> torch.device:
    """Start the process group (gloo on CPU, nccl on CUDA) and return this process's device.

    ``quiet``: DeepSpeed's build notice for its CPU communication op ("... built successfully",
    printed by every process of every run) is dropped. ``timeout``: how long any collective may
    wait for the slowest rank (``train.collective_timeout_min``), including the waits while rank 0
    alone preflights the data or exports; a rank that is truly stuck is reported after it.
    """
    import contextlib
    import io

    import deepspeed

    if local_rank_arg is not None and local_rank_arg >= 0:
        os.environ.setdefault("LOCAL_RANK", str(local_rank_arg))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
    return device


def apply_backend_settings(tf32: bool) -> None:
    """``train.tf32``: TensorFloat-32 for fp32 matmuls and convolutions (Ampere and later), as
    LLaVA's training scripts use; in bf16 runs it still speeds up what stays in fp32. No effect on CPU.
    Uses torch's per-backend precision API (mixing it with the legacy ``allow_tf32`` flags is an error)."""
    precision = "tf32" if tf32 else "ieee"
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank. ALL RANKS must call this."""
    if not torch.distributed.is_initialized() or world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank. ALL RANKS must call this."""
    if not torch.distributed.is_initialized() or world_size() == 1:
        return [obj]
    box = [None] * world_size()
    torch.distributed.all_gather_object(box, obj)
    return box


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks, in float64. ALL RANKS must call this."""
    if not torch.distributed.is_initialized() or world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    if torch.cuda.is_available():
        t = t.cuda()
    torch.distributed.all_reduce(t)
    return t.cpu().tolist()


def _comm_device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def sum_over_ranks(device_values: list[torch.Tensor], host_values: list[float]) -> list[float]:
    """``device_values`` (0-d tensors, e.g. a step's summed loss) and ``host_values``, each summed
    over ranks, in float64: ONE all-reduce and ONE host read for all of them. ALL RANKS must call this.

    Keeping the per-micro-batch losses on the device until here is what spares a host sync (a
    stall of the GPU queue) per micro-batch.
    """
    device = _comm_device()
    parts = [v.detach().to(device, torch.float64).reshape(1) for v in device_values]
    parts.append(torch.tensor(host_values, dtype=torch.float64).to(device, non_blocking=True))
    t = torch.cat(parts)
    if torch.distributed.is_initialized() and world_size() > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


def gather_per_rank(values: list[float]) -> list[list[float]]:
    """``values`` of every rank, in rank order (one all-gather). ALL RANKS must call this."""
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    if not torch.distributed.is_initialized() or world_size() == 1:
        return [t.tolist()]
    out = [torch.empty_like(t) for _ in range(world_size())]
    torch.distributed.all_gather(out, t)
    return torch.stack(out).tolist()


def shutdown(engine=None) -> None:
    """Tear down in the order that exits cleanly under ZeRO-3 with several gloo processes."""
    if engine is not None:
        try:
            engine.destroy()
        except Exception:  # noqa: BLE001 - best effort at exit; the run's result is already written
            pass
        del engine
    gc.collect()
    if torch.distributed.is_initialized():
        try:
            torch.distributed.barrier()
        finally:
            torch.distributed.destroy_process_group()
