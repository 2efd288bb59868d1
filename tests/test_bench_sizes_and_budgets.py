"""What the bench scripts tell the user about sizes and budgets comes from the registry: a GPU size's
refusal states that size's own parameter count, and ``--budgets`` lists every benchmarked family's
table with its unit."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from visionzip_core.bench.budgets import budget_unit, budgets_for
from visionzip_core.bench.sizes import benchmarked_families, size_error, sizes_for

ROOT = Path(__file__).resolve().parents[1]

# Parameters of the released checkpoints the GPU sizes copy (their downloads' counts).
RELEASED_BILLIONS = {
    "qwen2.5-vl-7b": "8.29B",
    "qwen3-vl-8b": "8.77B",
    "qwen3.5-9b": "9.41B",  # without the multi-token-prediction head
    "llava-onevision-7b": "8.03B",
}


def test_gpu_size_refusal_states_its_own_parameter_count():
    refused = {}
    for family in benchmarked_families():
        for name, size in sizes_for(family).items():
            if size.gpu_only:
                refused[name] = size_error(family, name, "cpu")
                assert size_error(family, name, "cuda") is None
    assert set(refused) == set(RELEASED_BILLIONS)
    for name, message in refused.items():
        assert f"({RELEASED_BILLIONS[name]} parameters in bfloat16;" in message, message
        assert len(message.splitlines()) == 1


@pytest.mark.parametrize("script", ["bench_train", "bench_prefill"])
def test_budgets_help_lists_every_benchmarked_family(script, capsys):
    spec = importlib.util.spec_from_file_location(script, ROOT / "scripts" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    for family in benchmarked_families():
        table = ",".join(map(str, budgets_for(family)))
        assert f"{family} ({budget_unit(family)}) {table}" in text, family
    assert budget_unit("llava-1.5") == "per image"
    assert budget_unit("llava-onevision") == "per crop"
    assert budget_unit("qwen3-vl") == "percent kept"
