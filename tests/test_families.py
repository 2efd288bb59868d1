"""The model-family seam: lookup, the one-line error for unsupported models, and the boundary
(nothing outside ``visionzip_core/families/`` names a model class or a token-count formula)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, LlamaForCausalLM, LlavaForConditionalGeneration, LlavaProcessor

from visionzip_core.bench.budgets import stock_budget
from visionzip_core.bench.sizes import sizes_for
from visionzip_core.families import FAMILIES, UnsupportedModel, family_for, supported
from visionzip_core.testing.tokenizers import TINY_TOKENIZERS, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]


def test_lookup_by_model_wrapper_config_processor_and_name(tiny_llava_dir):
    from peft import LoraConfig, get_peft_model

    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir)
    family = family_for(model)
    assert family.name == "llava-1.5"
    assert family_for(model.model) is family  # the inner LlavaModel
    assert family_for(AutoConfig.from_pretrained(tiny_llava_dir)) is family
    assert family_for(LlavaProcessor.from_pretrained(tiny_llava_dir)) is family
    assert family_for("llava") is family and family_for("LlavaForConditionalGeneration") is family
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=family.lora_target_regex(("q_proj",))))
    assert family_for(wrapped) is family


def test_an_unsupported_model_is_one_line_listing_the_supported_families(tiny_pretrain_dirs):
    _, llm_dir = tiny_pretrain_dirs
    for thing, named in (
        (LlamaForCausalLM.from_pretrained(llm_dir), "LlamaForCausalLM"),
        (AutoConfig.from_pretrained(llm_dir), "model_type 'llama'"),
        (torch.nn.Linear(2, 2), "Linear"),
        ("idefics3", "idefics3"),
    ):
        with pytest.raises(UnsupportedModel) as err:
            family_for(thing)
        message = str(err.value)
        assert message == f"unsupported model {named}; supported families: {supported()}"
        assert "\n" not in message and "llava-1.5 (LlavaForConditionalGeneration, LlavaModel)" in message


def test_module_groups_and_lora_targets_of_llava(tiny_llava_dir):
    import re

    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir)
    family = family_for(model)
    groups = {family.module_group(n) for n, _ in model.named_parameters()}
    assert groups == {"projector", "vision", "llm"}
    pattern = re.compile(family.lora_target_regex(family.lora_targets))
    names = [n for n, _ in model.named_modules() if pattern.fullmatch(n)]
    assert names and all(family.module_group(n + ".weight") == "llm" for n in names)
    assert not any("vision_tower" in n for n in names)  # CLIP has q_proj/v_proj too


# Names only a family module may use: model/processor/config classes of the families' towers and
# LLMs, and the patch-count formula ``(image_size // patch_size) ** 2``.
FAMILY_NAMES = {
    name for family in FAMILIES for name in (*family.model_classes, *family.processor_classes)
} | {"LlavaConfig", "LlavaMultiModalProjector"}
# CLIP's own classes are not in the list: the CLIP-tower capture (capture.py, shared by CLIP-based
# families), the tiny stage-1 input builders and the bare-tower benchmark name the tower, not a family.
OUTSIDE = ["visionzip_core", "train", "scripts"]


def _python_files():
    for top in OUTSIDE:
        for path in sorted((REPO / top).rglob("*.py")):
            if "families" not in path.relative_to(REPO).parts:
                yield path


def _is_patch_formula(node: ast.AST) -> bool:
    """``(x // y.patch_size) ** 2``."""
    return (
        isinstance(node, ast.BinOp)
        and isinstance(node.op, ast.Pow)
        and isinstance(node.left, ast.BinOp)
        and isinstance(node.left.op, ast.FloorDiv)
        and "patch_size" in ast.unparse(node.left.right)
    )


def test_nothing_outside_the_families_names_a_model_class_or_the_token_formula():
    found = []
    for path in _python_files():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.ImportFrom):
                found += [f"{where} imports {a.name}" for a in node.names if a.name in FAMILY_NAMES]
            elif isinstance(node, ast.Name) and node.id in FAMILY_NAMES:
                found.append(f"{where} uses {node.id}")
            elif isinstance(node, ast.Attribute) and node.attr in FAMILY_NAMES:
                found.append(f"{where} uses .{node.attr}")
            elif _is_patch_formula(node):
                found.append(f"{where} computes {ast.unparse(node)}")
    assert not found, "\n".join(found)


def test_the_boundary_check_sees_what_it_looks_for(tmp_path):
    """The walk above must be able to fail: the same checks on a snippet that breaks each rule."""
    snippet = (
        "from transformers import LlavaForConditionalGeneration\n"
        "n = (cfg.image_size // cfg.patch_size) ** 2\n"
        "m = transformers.LlavaProcessor\n"
    )
    tree = ast.parse(snippet)
    hits = [
        node
        for node in ast.walk(tree)
        if (isinstance(node, ast.ImportFrom) and any(a.name in FAMILY_NAMES for a in node.names))
        or (isinstance(node, ast.Attribute) and node.attr in FAMILY_NAMES)
        or _is_patch_formula(node)
    ]
    assert len(hits) == 3


def test_every_family_names_its_tiny_tokenizer_and_its_benchmark_tables():
    """The hooks that replace family branches in testing/ and bench/ point at something real: a
    tokenizer factory, a size table with the family's stock budget, the size its simulation runs."""
    for family in FAMILIES:
        assert family.tiny_tokenizer in TINY_TOKENIZERS, family.name
        if family.bench_sizes is None:
            with pytest.raises(ValueError, match="no benchmark sizes"):
                sizes_for(family.name)
            continue
        assert stock_budget(family.bench_budgets) in family.bench_budgets
        if family.simulation is not None:
            assert family.simulation["size"] in sizes_for(family.name)
    with pytest.raises(ValueError, match="no tiny tokenizer 'sentencepiece'"):
        tiny_tokenizer("sentencepiece")
