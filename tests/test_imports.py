"""The house's floors: who may import whom, read from the source with ``ast`` (nothing is imported).

A module may import modules on its own floor or below, never above, and no import may close a
circle. Inside ``visionzip_core/`` every project import is at module level, where a reader sees
what a module stands on; a function-local import is kept only for optional or heavy third-party
packages (bitsandbytes, flash-attn, wandb, deepspeed, matplotlib, ...).

Floors, from the ground up (a package covers its submodules):

1. core: the VisionZip settings, the token-selection algorithm, tower capture, weight and tokenizer
   file checks.
2. data: the data pipeline, from sample files to batches. Like the core it knows no model family:
   what it needs of one (placeholders, token counts) is handed to it.
3. families: one module per model family behind ``ModelFamily``, their registry and token counts.
4. model: applying VisionZip to a model instance, checking a model folder, scoring generations and
   drawing kept tokens; the package's face (``visionzip_core/__init__.py``) re-exports from here.
5. testing: tiny models laid out like the real downloads, and the ``builtin:`` names that build them.
6. bench: FLOP model, memory simulation, the planner, synthetic batches.
7. training: the training config (schema, loading, rules), model building, the recipe.
8. cli: the commands.
9. entry points: ``scripts/`` and ``train/``.

A new module must be placed on a floor here before the test passes.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("visionzip_core", "scripts", "train")

FLOORS: list[tuple[str, tuple[str, ...]]] = [
    (
        "core",
        (
            "visionzip_core.config",
            "visionzip_core.algorithm",
            "visionzip_core.capture",
            "visionzip_core.weight_checks",
            "visionzip_core.tokenizer_files",
        ),
    ),
    ("data", ("visionzip_core.data",)),
    ("families", ("visionzip_core.families",)),
    (
        "model",
        (
            "visionzip_core.adapt",
            "visionzip_core.model_folders",
            "visionzip_core.evaluation",
            "visionzip_core.token_overlay",
            "visionzip_core",
        ),
    ),
    ("testing", ("visionzip_core.testing", "visionzip_core.model_names")),
    ("bench", ("visionzip_core.bench",)),
    ("training", ("visionzip_core.training",)),
    ("cli", ("visionzip_core.cli", "visionzip_core.lmms_eval_model", "visionzip_core.lmms_eval_entry")),
    ("entry points", ("scripts", "train")),
]


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every project module (a package by its ``__init__.py``)."""
    out = {}
    for top in SOURCES:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def floor_of(module: str) -> int | None:
    """Index in :data:`FLOORS` of the longest entry that is ``module`` or a package above it. The
    bare ``visionzip_core`` entry stands for the package's ``__init__.py`` alone."""
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(FLOORS):
        for prefix in prefixes:
            covers = module == prefix or (prefix != "visionzip_core" and module.startswith(prefix + "."))
            if covers and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, files) -> list[str]:
    """The project modules an import statement loads (``from pkg import name`` is ``pkg.name`` when
    that is a module, else ``pkg``)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".") if is_package else module.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join([*package, base] if base else package)
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
    out = []
    for name in names:
        while name and name not in files:  # "import a.b.c" of a name inside a module: its module
            name = name.rpartition(".")[0]
        if name and name != module and name not in out:
            out.append(name)
    return out


def imports() -> list[tuple[str, str, int, bool]]:
    """``(importer, imported, line, at module level)`` for every project-to-project import."""
    files = module_files()
    found = []

    def visit(node: ast.AST, module: str, is_package: bool, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in _targets(child, module, is_package, files):
                    found.append((module, target, child.lineno, not in_function))
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, module, is_package, inside)

    for module, path in files.items():
        visit(ast.parse(path.read_text(), filename=str(path)), module, path.name == "__init__.py", False)
    return found


def where(module: str, line: int) -> str:
    return f"{module_files()[module].relative_to(ROOT)}:{line}"


def circles(edges: list[tuple[str, str, int, bool]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    graph = defaultdict(set)
    for a, b, _, _ in edges:
        graph[a].add(b)
    index, low, on_stack, stack, groups = {}, {}, set(), [], []
    counter = [0]

    def connect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return groups


def test_every_module_stands_on_a_floor():
    unplaced = sorted(m for m in module_files() if floor_of(m) is None)
    assert not unplaced, "modules on no floor (add them to FLOORS in tests/test_imports.py):\n" + "\n".join(
        unplaced
    )


def test_no_import_runs_up_a_floor():
    offences = []
    for a, b, line, _ in imports():
        fa, fb = floor_of(a), floor_of(b)
        if fa is not None and fb is not None and fb > fa:
            offences.append(f"{where(a, line)}: {a} ({FLOORS[fa][0]}) imports {b} ({FLOORS[fb][0]})")
    assert not offences, f"{len(offences)} import(s) run up a floor:\n" + "\n".join(offences)


def test_no_import_circle():
    edges = imports()
    offences = []
    for group in circles(edges):
        members = set(group)
        ties = [
            f"    {where(a, line)}: imports {b}" for a, b, line, _ in edges if a in members and b in members
        ]
        offences.append(f"circle of {len(group)}: {', '.join(group)}\n" + "\n".join(ties))
    assert not offences, f"{len(offences)} import circle(s):\n" + "\n".join(offences)


def test_library_imports_the_project_at_module_level():
    offences = [
        f"{where(a, line)}: {a} imports {b} inside a function"
        for a, b, line, top in imports()
        if not top and a.split(".")[0] == "visionzip_core"
    ]
    assert not offences, f"{len(offences)} function-local project import(s):\n" + "\n".join(offences)


def test_the_walk_sees_each_kind_of_offence(tmp_path, monkeypatch):
    """The checks above find a circle, an upward import and a local import in a small tree of
    their own, so that a passing run means the house has none, not that the walk saw nothing."""
    pkg = tmp_path / "visionzip_core"
    (pkg / "families").mkdir(parents=True)
    (pkg / "training").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "config.py").write_text("from visionzip_core.families import family_for\n")
    (pkg / "families" / "__init__.py").write_text("from visionzip_core.config import VisionZipConfig\n")
    (pkg / "training" / "__init__.py").write_text("")
    (pkg / "training" / "rules.py").write_text("def f():\n    from visionzip_core.config import X\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    edges = imports()
    assert circles(edges) == [["visionzip_core.config", "visionzip_core.families"]]
    up = [(a, b) for a, b, _, _ in edges if floor_of(b) > floor_of(a)]
    assert up == [("visionzip_core.config", "visionzip_core.families")]
    local = [(a, b, line) for a, b, line, top in edges if not top]
    assert local == [("visionzip_core.training.rules", "visionzip_core.config", 2)]
