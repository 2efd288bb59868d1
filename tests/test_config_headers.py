"""Every command written at the top of a shipped config validates through the real config loader."""

import shlex
from pathlib import Path

import pytest

from visionzip_core.training.config_loading import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml"))


def header_commands(path: Path) -> list[list[str]]:
    """The ``train/finetune.py`` command lines in the leading comment block, continuations joined."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = "\n".join(lines).replace("\\\n", " ")
    return [shlex.split(line) for line in text.splitlines() if "train/finetune.py" in line]


def config_and_overrides(argv: list[str]) -> tuple[str, list[str]]:
    """``--config X`` and the ``key=value`` overrides of one launcher command."""
    rest = argv[argv.index("train/finetune.py") + 1 :]
    i = rest.index("--config")
    return rest[i + 1], rest[:i] + rest[i + 2 :]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_header_commands_validate(path):
    commands = header_commands(path)
    assert commands, f"{path} does not start with the command that runs it"
    for argv in commands:
        config, overrides = config_and_overrides(argv)
        assert (REPO / config).resolve() == path.resolve(), f"{path}: header runs {config}"
        load_config(REPO / config, overrides)  # raises ConfigError naming every bad key


def test_pretrain_header_names_both_towers():
    """The stage-1 example sets the two folders stage 1 reads (not name_or_path, which it rejects)."""
    [_, example] = header_commands(REPO / "configs/llava-1.5-7b/pretrain.yaml")
    _, overrides = config_and_overrides(example)
    keys = {o.split("=", 1)[0] for o in overrides}
    assert keys == {"model.vision_tower", "model.language_model"}
