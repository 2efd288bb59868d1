"""Every key (and every named value) a shipped config uses is documented: in ``train/finetune.py
--help`` and in configs/demo.yaml, the file the other configs point to as "every key is documented";
and the help says which defaults follow the model's family."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").rglob("*.yaml"))
DEMO = REPO / "configs/demo.yaml"


def used_keys(node: dict, prefix: str = ""):
    """``(dotted key, value)`` of every leaf a config sets; a list of mappings (``data.train``)
    gives ``data.train[].path`` etc. for the keys of its items."""
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from used_keys(value, name + ".")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            yield name, None
            for item in value:
                for sub, sub_value in item.items():
                    yield f"{name}[].{sub}", sub_value
        else:
            yield name, value


def shipped_keys() -> dict[str, set]:
    """Each key any shipped config sets -> the string values it is set to."""
    keys: dict[str, set] = {}
    for path in SHIPPED:
        for key, value in used_keys(yaml.safe_load(path.read_text())):
            keys.setdefault(key, set())
            if isinstance(value, str) and re.fullmatch(r"[a-z_0-9]+", value):  # a named choice
                keys[key].add(value)
    return keys


def demo_sections() -> dict[str, str]:
    """configs/demo.yaml's text per top-level section, comments (and commented-out keys) included;
    a commented-out section (``# lora:``) counts as that section."""
    sections, current = {}, None
    for line in DEMO.read_text().splitlines():
        top = re.match(r"^#?\s?([a-z_]+):", line)
        if top and not line.startswith(("  ", "#  ", "#   ")):
            current = top.group(1)
        if current:
            sections[current] = sections.get(current, "") + line + "\n"
    return sections


@pytest.fixture(scope="module")
def help_text() -> str:
    out = subprocess.run(
        [sys.executable, "train/finetune.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_every_shipped_key_is_in_the_help(help_text):
    missing = []
    for key in shipped_keys():
        if "[]." in key:  # a list item's key: listed in its list's type, {path, image_folder, ...}
            outer, sub = key.split("[].")
            line = next((x for x in help_text.splitlines() if x.strip().startswith(f"{outer} (")), "")
            if not re.search(rf"list of \{{[^}}]*\b{sub}\b", line):
                missing.append(key)
        elif f"  {key} (" not in help_text:
            missing.append(key)
    assert not missing, f"keys used by shipped configs but not in train/finetune.py --help: {missing}"


def test_every_shipped_key_and_value_is_documented_in_demo_yaml():
    sections = demo_sections()
    missing = []
    for key, values in shipped_keys().items():
        section, rest = key.split(".", 1)
        text = sections.get(section, "")
        name = rest.split("[].")[-1].split(".")[-1]
        lines = [x for x in text.splitlines() if re.search(rf"(^|[\s{{,#]){re.escape(name)}:", x)]
        if not lines:
            missing.append(key)
            continue
        # A named value (native, chat_template, messages, ...) is explained where the key is.
        block = "\n".join(text.splitlines())
        for value in values:
            if not re.search(rf"\b{re.escape(value)}\b", block):
                missing.append(f"{key}: {value}")
    assert not missing, f"used by shipped configs but not documented in configs/demo.yaml: {sorted(missing)}"


def test_help_says_which_defaults_follow_the_family(help_text):
    lines = help_text.splitlines()
    for key, qwen in [
        ("template", "chat_template"),
        ("image_placement", "keep"),
        ("image_aspect_ratio", "native"),
    ]:
        at = next(i for i, x in enumerate(lines) if x.strip().startswith(f"data.{key} ("))
        note = next((x for x in lines[at + 1 : at + 4] if "Family default" in x), "")
        assert "llava-1.5" in note and re.search(rf"qwen2\.5-vl[^;]*: '{qwen}'", note), (key, note)


def test_help_and_docs_name_models_neutrally(help_text):
    assert "Train LLaVA" not in help_text and "llava-hf folder to start from" not in help_text
    for script in ("generate.py", "show_tokens.py"):
        out = subprocess.run(
            [sys.executable, f"scripts/{script}", "--help"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        assert "llava-hf folder" not in out and "vicuna_v1 template)" not in out, script
        assert "qwen2-vl" in out and "--dominant-ratio" in out, script
    readme = (REPO / "README.md").read_text()
    assert "Train and run LLaVA-style" not in readme
    assert ".jsonl" in readme and "format:" in readme
