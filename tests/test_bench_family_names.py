"""The benchmarks and test tools ask the family: ``visionzip_core/bench/``, ``visionzip_core/testing/``
and the benchmark scripts never pick a family by its name in code. A new family brings its
benchmarks by implementing ``ModelFamily``'s benchmark hooks in its own module (README, Layout).

Read from the source with ``ast`` (nothing is imported but the registry). An offence is a family
name in a decision or a choice: a string naming a family (``llava``, ``qwen``, a registered name,
model_type or size name) compared (``==``, ``in``, ``startswith``), passed to a call, held in a
constant (or a table keyed by it), used as a default or a subscript, or an ``isinstance`` check
against a family's class. Names in docstrings,
comments, help texts and messages are fine: they are examples, not branches.

    pytest tests/test_bench_family_names.py
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from visionzip_core.families import FAMILIES

REPO = Path(__file__).resolve().parents[1]
ROOMS = ("visionzip_core/bench", "visionzip_core/testing")
SCRIPTS = (
    "bench_loader.py",
    "bench_prefill.py",
    "bench_train.py",
    "bench_vision_tower.py",
    "count_syncs.py",
    "gpu_check.py",
    "next_from_stage1.py",
    "plan.py",
    "simulate_memory.py",
)
# Choices by name that stay, each with its reason (file, enclosing function).
ALLOWED = {
    # The demo model is a LLaVA-1.5 by definition (builtin:demo-llava: a CLIP tower trained to see
    # the demo's pictures).
    ("visionzip_core/testing/demo_tower.py", "build_demo_llava"),
    # The GPU-only 2-GPU ZeRO-3 matrix: per-family tiny folders, data and overrides, not yet asked
    # of the families (their data_defaults and a mixed-data hook would answer it).
    ("scripts/gpu_check.py", "_families"),
}

FAMILY_WORD = re.compile(r"llava|qwen", re.IGNORECASE)


def family_words() -> set[str]:
    """Registered family names, model_types and benchmark size names that carry a family's name."""
    words = set()
    for family in FAMILIES:
        words |= {family.name, *family.model_types}
        words |= {n for n in (family.bench_sizes or {}) if FAMILY_WORD.search(n)}
    return words


def _names_family(node: ast.AST, words: set[str], loose: bool) -> bool:
    if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
        return False
    return node.value in words or (loose and bool(FAMILY_WORD.search(node.value)))


def offences(source: str, where: str, words: set[str]) -> list[str]:
    """``where:line: what`` for each place the code picks or tests a family by its name."""
    found: list[tuple[int, int, str]] = []
    tree = ast.parse(source)
    parents: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node

    def function_of(node: ast.AST) -> str:
        while node in parents:
            node = parents[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return node.name
        return ""

    def hit(node: ast.AST, what: str) -> None:
        if (where, function_of(node)) not in ALLOWED:
            found.append((node.lineno, node.col_offset, f"{where}:{node.lineno}: {what}"))

    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for side in (node.left, *node.comparators):
                elements = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                if any(_names_family(e, words, loose=True) for e in elements):
                    hit(node, "a comparison with a family's name")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in ("startswith", "endswith"):
                if any(_names_family(a, words, loose=True) for a in node.args):
                    hit(node, f"{func.attr} of a family's name")
            elif (
                isinstance(func, ast.Name) and func.id in ("isinstance", "issubclass") and len(node.args) == 2
            ):
                classes = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
                if any(isinstance(c, ast.Name) and FAMILY_WORD.search(c.id) for c in classes):
                    hit(node, "an isinstance check against a family's class")
            values = [*node.args, *(k.value for k in node.keywords if k.arg not in ("help", "description"))]
            if any(_names_family(v, words, loose=False) for v in values):
                hit(node, "a family chosen by name in a call")
        elif isinstance(node, ast.Subscript) and _names_family(node.slice, words, loose=False):
            hit(node, "a family's entry looked up by name")
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            value = node.value
            held = value.elts if isinstance(value, (ast.Tuple, ast.List, ast.Set)) else [value]
            if isinstance(value, ast.Dict):
                held = [k for k in value.keys if k is not None]
            if any(_names_family(v, words, loose=False) for v in held):
                hit(node, "a family's name held in a constant")
        elif isinstance(node, ast.arguments):
            if any(_names_family(d, words, loose=False) for d in (*node.defaults, *node.kw_defaults) if d):
                hit(node.args[0] if node.args else node, "a family's name as a default")
    return [text for *_, text in sorted(found)]


def test_the_scan_finds_choices_by_name_and_ignores_examples():
    source = '''"""LLaVA-1.5 and qwen2.5-vl: the docstring may name them."""
import argparse


QWEN_FAMILY = "qwen2.5-vl"
SETTINGS = {"qwen2-vl": {"dominant": 1}, "llava-next": {"dominant": 2}}


def run(size, family: str = "llava-1.5"):
    """For llava-next: per crop."""  # a comment may: qwen
    p = argparse.ArgumentParser()
    p.add_argument("--budgets", help="576,128 (llava-next per crop)")
    if family.startswith("qwen"):
        pass
    if family == "llava-next" or family in ("x", "qwen2.5-vl"):
        pass
    if isinstance(size, QwenBenchSize):
        pass
    targets = family_for("llava").lora_targets
    return SETTINGS["qwen2-vl"], f"not a llava-next size: {size}"
'''
    words = {"llava-1.5", "llava-next", "qwen2.5-vl", "qwen2-vl", "llava", "llava_next"}
    found = [f.split(": ", 1)[1] for f in offences(source, "x.py", words)]
    assert found == [
        "a family's name held in a constant",
        "a family's name held in a constant",
        "a family's name as a default",
        "startswith of a family's name",
        "a comparison with a family's name",
        "a comparison with a family's name",
        "an isinstance check against a family's class",
        "a family chosen by name in a call",
        "a family's entry looked up by name",
    ], found


def test_benchmarks_and_test_tools_ask_the_family_instead_of_naming_it():
    words = family_words()
    paths = [p for room in ROOMS for p in sorted((REPO / room).rglob("*.py"))]
    paths += [REPO / "scripts" / name for name in SCRIPTS]
    found = []
    for path in paths:
        found += offences(path.read_text(), str(path.relative_to(REPO)), words)
    assert not found, "a family picked by name outside visionzip_core/families/:\n" + "\n".join(found)
