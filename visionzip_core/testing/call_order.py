"""Record the order in which a forward calls the modules that own parameters.

DeepSpeed ZeRO-3 gathers a module's partitioned parameters with a collective when the module is
called, so two ranks whose forwards call parameter-owning modules in different orders (or a
different number of times) issue mismatched collectives, and the run dies ("Received data size
doesn't match expected size" under gloo, a hang under NCCL). Comparing the recorded orders of
every batch kind a rank can draw proves on one CPU process that ranks stay aligned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn


@contextmanager
def recording_call_order(model: nn.Module) -> Iterator[list[str]]:
    """``with recording_call_order(model) as order: model(**batch)``: ``order`` lists the qualified
    names of the modules owning parameters directly (as ZeRO-3 partitions them), one entry per
    call, in call order. The hooks are removed when the block ends."""
    order: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            handles.append(module.register_forward_pre_hook(lambda _m, _a, _name=name: order.append(_name)))
    try:
        yield order
    finally:
        for handle in handles:
            handle.remove()


def call_order(model: nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[str]:
    """The parameter-owning modules ``fn(*args, **kwargs)`` calls in ``model``, in order."""
    with recording_call_order(model) as order:
        fn(*args, **kwargs)
    return order


def first_difference(orders: dict[str, list[str]]) -> str | None:
    """None when every order is the same; else one line naming the first batch kind that differs,
    the position and the module names there."""
    (base_kind, base), *rest = orders.items()
    for kind, order in rest:
        if order == base:
            continue
        at = next((i for i, (a, b) in enumerate(zip(base, order)) if a != b), min(len(base), len(order)))
        here = base[at] if at < len(base) else "<end>"
        there = order[at] if at < len(order) else "<end>"
        return (
            f"{kind} calls {there} at call {at} where {base_kind} calls {here} "
            f"({len(order)} against {len(base)} calls)"
        )
    return None
