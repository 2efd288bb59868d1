"""Family knowledge lives in ``visionzip_core/families/``: the trainer, the training library and the
data pipeline name no model family and no model class in code (comments and docstrings may).

    pytest tests/test_family_names.py
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOMS = ("train", "visionzip_core/training", "visionzip_core/data")

# A family's name, model_type or module (llava, llava_next, qwen2_5_vl, "LLaVA-NeXT", ...) anywhere in
# a name or a string, and model classes of the towers and LLMs families are built of.
FAMILY = re.compile(r"llava|qwen", re.IGNORECASE)
MODEL_CLASS = re.compile(r"\b(?:CLIP|Llama|Siglip|Mistral|Vicuna)[A-Z]\w*")
# The one allowed word: "llava" as a sample-file format (``data.train[i].format``: ``{conversations:
# [{from, value}]}``, the layout the LLaVA project published), which every family reads. Only the
# bare string, and only in the data pipeline that parses it.
SAMPLE_FORMAT = ("visionzip_core/data/", '"llava"')


def _documentation(tree: ast.AST) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """``(start, end)`` positions of module, class and function docstrings, and of ``description=``
    texts (the documentation of a config key, shown by ``--help``)."""
    spans = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                if isinstance(body[0].value.value, str):
                    spans.append(body[0].value)
        elif isinstance(node, ast.keyword) and node.arg == "description":
            spans.append(node.value)
    return [((n.lineno, n.col_offset), (n.end_lineno, n.end_col_offset)) for n in spans]


def offences(source: str, where: str) -> list[str]:
    """``where:line: name in token`` for each name or string in code that names a family or a model class."""
    documentation = _documentation(ast.parse(source))
    found = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in (tokenize.NAME, tokenize.STRING):
            continue
        if any(start <= tok.start < end for start, end in documentation):
            continue
        if where.startswith(SAMPLE_FORMAT[0]) and tok.string == SAMPLE_FORMAT[1]:
            continue
        hit = FAMILY.search(tok.string) or MODEL_CLASS.search(tok.string)
        if hit:
            found.append(f"{where}:{tok.start[0]}: {hit.group(0)} in {tok.string[:80]}")
    return found


def test_the_scan_finds_names_in_code_and_ignores_comments_and_docstrings():
    source = '''"""LLaVA-1.5 and Qwen2.5-VL: the docstring may name them."""
from visionzip_core.families.llava import vision_tower_config  # a comment may: LlavaNext
STAGE1 = "llava"


def load(path):
    """Loads a LlavaForConditionalGeneration."""
    if is_qwen(path):
        return Qwen2_5_VLForConditionalGeneration.from_pretrained(path)
    return CLIPVisionModel, f"not a llava-next folder: {path}", Field(description="LLaVA-NeXT tiles")
'''
    found = offences(source, "x.py")
    in_data = offences(source, "visionzip_core/data/x.py")
    assert [f.split(":", 1)[1] for f in in_data] == [f.split(":", 1)[1] for f in found if '"llava"' not in f]
    assert [f.split(": ")[1].split(" in ")[0] for f in found] == [
        "llava",  # the import's module
        "llava",  # a string
        "qwen",  # a function name
        "Qwen",  # a class
        "CLIPVisionModel",
        "llava",  # an f-string message
    ], found


def test_no_family_or_model_class_names_in_the_trainer_training_and_data_code():
    found = []
    for room in ROOMS:
        for path in sorted((REPO / room).rglob("*.py")):
            found += offences(path.read_text(), str(path.relative_to(REPO)))
    assert not found, "family knowledge outside visionzip_core/families/:\n" + "\n".join(found)
