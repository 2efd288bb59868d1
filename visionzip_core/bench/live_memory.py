"""Peak memory of one step: CUDA's allocator statistics on a GPU, a tracker of live tensor storage
(:class:`LiveTensorMemory`) on the CPU, where torch keeps no allocator statistics."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorMemory(TorchDispatchMode):
    """Peak bytes of live tensor storage while active, for CPU where torch keeps no allocator stats.

    Every storage produced by an op inside the mode is counted until it is freed (a weakref
    finalizer on the storage, which torch keeps alive exactly as long as the memory). That includes
    activations saved by autograd, gradients, optimizer states and temporaries; kernel-internal
    scratch buffers that never become tensors are not seen. Storages that existed before, passed as
    ``resident``, form the starting level (weights, inputs, optimizer states) and are tracked too, so
    that gradients freed by ``zero_grad`` count down.
    """

    def __init__(self, resident: Iterable[torch.Tensor] = ()):
        super().__init__()
        self._live: dict[int, int] = {}
        self.current = self.peak = 0
        for t in resident:
            self._track(t)
        self.start = self.current
        self.peak = self.current

    def _release(self, key: int, nbytes: int) -> None:
        if self._live.pop(key, None) is not None:
            self.current -= nbytes

    def _counts(self, t: torch.Tensor) -> bool:
        """Whether ``t``'s storage is memory to count: real devices here, the meta device in
        :class:`visionzip_core.bench.memory_sim.MetaTensorMemory`."""
        return t.device.type != "meta"

    def _track(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or not self._counts(t):
            return
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._live:
            return
        nbytes = storage.nbytes()
        self._live[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._release, key, nbytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            self._track(t)
        return out


def peak_memory_bytes(
    step: Callable[[], object], device: torch.device, resident: Callable[[], Iterable[torch.Tensor]]
) -> tuple[int, int]:
    """``(peak, start)`` bytes of one call of ``step``.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset (everything the caching allocator
    handed out). CPU: :class:`LiveTensorMemory` over the tensors ``resident()`` returns.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device), start
    with LiveTensorMemory(resident()) as tracker:
        step()
    return tracker.peak, tracker.start


def model_tensors(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> list[torch.Tensor]:
    """Parameters, buffers, existing gradients and optimizer states: the resident tensors."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        for state in optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return tensors
