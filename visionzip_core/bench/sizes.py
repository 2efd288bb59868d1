"""Benchmark sizes: the models the benchmarks and the memory simulation build (random weights) and
the workload run on each. Each family holds its own table (``ModelFamily.bench_sizes``); this module
asks the registry for them.

Random weights are enough: compression changes shapes, not values, and step time and memory
depend only on shapes (VisionZip's selection is data-dependent, but its cost is not).
"""

from __future__ import annotations

from visionzip_core.bench.random_models import build_random_model
from visionzip_core.families import FAMILIES, family_for


def benchmarked_families() -> list[str]:
    """The registered families the benchmarks have sizes of."""
    return [f.name for f in FAMILIES if f.bench_sizes is not None]


def sizes_for(family: str) -> dict:
    """The sizes ``family``'s benchmarks build (its ``bench_sizes`` table)."""
    table = family_for(family).bench_sizes
    if table is None:
        raise ValueError(
            f"{family}: no benchmark sizes; benchmarked families: {', '.join(benchmarked_families())}"
        )
    return table


def size_names() -> list[str]:
    """Every size name of every benchmarked family, sorted (the scripts' ``--size`` choices)."""
    return sorted({name for family in benchmarked_families() for name in sizes_for(family)})


def sizes_help() -> str:
    """The bench scripts' ``--size`` help: what ``cpu`` and ``smoke`` are, and each benchmarked family's
    sizes, from the registry."""
    tables = [f"{family} {','.join(sizes_for(family))}" for family in benchmarked_families()]
    return (
        "benchmark size (default cpu: the CPU figures); smoke, where a family has it: its real image "
        "geometry at 64 wide, 2-layer models with a small vocabulary, for testing the scripts in "
        "seconds (its figures mean nothing); each family's sizes: " + "; ".join(tables)
    )


def parameter_count(family: str, size) -> int:
    """Parameters of ``family``'s model of benchmark ``size``, counted on a meta build (shapes only,
    well under a second for a 9B model)."""
    return sum(p.numel() for p in build_random_model(size, "meta", family=family).parameters())


def size_error(family: str, size_name: str, device: str) -> str | None:
    """Why ``--size size_name`` cannot run for ``family`` on ``device`` (None when it can): it must be
    one of the family's sizes, and a GPU-only size needs CUDA."""
    sizes = sizes_for(family)
    if size_name not in sizes:
        return f"--size {size_name}: not a {family} size; choose from {sorted(sizes)}"
    size = sizes[size_name]
    if size.gpu_only and not device.startswith("cuda"):
        billions = parameter_count(family, size) / 1e9
        return (
            f"--size {size_name} is a GPU size ({billions:.2f}B parameters in {size.dtype}; a step would "
            "take minutes and tens of GB on a CPU): run it where CUDA is available, or use --size cpu. "
            "Its structure is checked on the meta device by the tests (tests/test_bench_*.py)."
        )
    return None
