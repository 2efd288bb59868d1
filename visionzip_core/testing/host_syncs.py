"""Count host-device synchronisations in a piece of code, on any device, CPU included.

On a GPU every read of a device value by the host (``.item()``, ``int(t)``, ``.tolist()``, a
boolean mask whose output size depends on the data, ``nonzero``, ``torch.unique`` ...) stalls the
host until the device queue drains. Such reads cannot be timed on a CPU, but they can be counted:
:class:`HostSyncCounter` watches the ATen operators that need a value on the host (a
``TorchDispatchMode``) and, for the duration of the ``with`` block only, the two ``Tensor`` methods
that read data without an operator (``tolist``, ``numpy``). Nothing is patched outside the block.

On a CPU every such read is counted, including reads of tensors that would stay on the host on a
GPU; compare counts side by side (VisionZip against the stock model), never against zero.

:func:`count_cuda_syncs` is the GPU counterpart: torch's own sync debug mode, counted.
"""

from __future__ import annotations

import collections
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

#: Operators that always read a device value on the host (or size an output by the data).
_ALWAYS = {
    aten._local_scalar_dense.default: "item",  # .item(), int(t), float(t), bool(t) of one value
    aten.is_nonzero.default: "item",
    aten.nonzero.default: "nonzero",
    aten.argwhere.default: "nonzero",
    aten.masked_select.default: "boolean index",
    aten._unique.default: "unique",
    aten._unique2.default: "unique",
    aten.unique_dim.default: "unique",
    aten.unique_consecutive.default: "unique",
    aten.unique_dim_consecutive.default: "unique",
    aten.equal.default: "item",
}
#: Indexing operators: a sync only when an index is a boolean mask.
_INDEXING = {
    aten.index.Tensor,
    aten.index_put.default,
    aten.index_put_.default,
    aten._index_put_impl_.default,
}


def _has_mask(indices: Any) -> bool:
    return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in indices or ())


class HostSyncCounter(TorchDispatchMode):
    """``with HostSyncCounter() as syncs: ...`` then ``syncs.total`` and ``syncs.kinds``
    (``{"item": 3, "tolist": 1, ...}``).

    Counted: ``.item()``/``int()``/``float()``/``bool()`` of a tensor, ``.tolist()``, ``.numpy()``,
    ``nonzero``/``argwhere``, boolean-mask indexing (read or write) and ``masked_select``,
    ``torch.unique*``, ``repeat_interleave`` and ``bincount`` without a given output size, and
    copies from a non-CPU device to the CPU.
    """

    def __init__(self) -> None:
        super().__init__()
        self.kinds: collections.Counter[str] = collections.Counter()
        self._saved: dict[str, Callable] = {}

    @property
    def total(self) -> int:
        return sum(self.kinds.values())

    def __enter__(self):
        # Tensor.tolist and Tensor.numpy read memory directly, past the dispatcher: wrap them for
        # this block only. Their own reads are counted once (the inner operators are not seen).
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counted(tensor, *args, _name=name, _original=original, **kwargs):
                self.kinds[_name] += 1
                with _Paused(self):
                    return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for name, original in self._saved.items():
                setattr(torch.Tensor, name, original)
            self._saved.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _ALWAYS.get(func)
        if (
            kind is None
            and func in _INDEXING
            and _has_mask(args[1] if len(args) > 1 else kwargs.get("indices"))
        ):
            kind = "boolean index"
        elif kind is None and func in (aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor):
            if kwargs.get("output_size") is None:
                kind = "repeat_interleave"
        elif kind is None and func is aten.bincount.default:
            kind = "bincount"
        elif kind is None and func in (aten._to_copy.default, aten.copy_.default):
            kind = _device_to_host(func, args, kwargs)
        if kind is not None:
            self.kinds[kind] += 1
        return func(*args, **kwargs)


def _device_to_host(func, args, kwargs) -> str | None:
    if func is aten._to_copy.default:
        source, target = args[0], kwargs.get("device")
        to_cpu = target is not None and torch.device(target).type == "cpu"
    else:
        target, source = args[0], args[1]
        to_cpu = target.device.type == "cpu"
    return "device to host copy" if to_cpu and source.device.type != "cpu" else None


class _Paused:
    """Runs the body with the counter's dispatch mode off (a wrapped method's own operators)."""

    def __init__(self, mode: HostSyncCounter):
        self.mode = mode

    def __enter__(self):
        from torch.utils._python_dispatch import _pop_mode_temporarily

        self._ctx = _pop_mode_temporarily()
        self._ctx.__enter__()

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def count_host_syncs(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, HostSyncCounter]:
    """``(fn(*args, **kwargs), counter)``: the host syncs one call makes (see :class:`HostSyncCounter`)."""
    with HostSyncCounter() as counter:
        result = fn(*args, **kwargs)
    return result, counter


def count_cuda_syncs(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, int]:
    """``(fn(*args, **kwargs), n)``: the synchronising CUDA calls torch's sync debug mode reports
    during one call (``torch.cuda.set_sync_debug_mode("warn")``, restored afterwards). CUDA only."""
    if not torch.cuda.is_available():
        raise RuntimeError("count_cuda_syncs needs a CUDA device; use count_host_syncs on a CPU")
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fn(*args, **kwargs)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return result, sum("synchronizing" in str(w.message).lower() for w in caught)
