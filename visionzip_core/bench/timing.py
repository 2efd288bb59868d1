"""How the benchmarks time budgets against each other: an interleaved schedule and medians."""

from __future__ import annotations

import statistics
from collections.abc import Iterable


def interleaved_schedule(budgets: Iterable[int], rounds: int) -> list[int]:
    """``rounds`` passes over ``budgets``, each pass rotated by one, so that no budget always runs
    first or right after the same neighbour (drift and cache effects spread over all budgets)."""
    order = list(budgets)
    out: list[int] = []
    for r in range(rounds):
        shift = r % len(order)
        out.extend(order[shift:] + order[:shift])
    return out


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))
