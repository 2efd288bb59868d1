"""The commands in ``visionzip_core/cli/``: each console script's target imports and answers
``--help``, ``scripts/<name>.py`` runs the same ``main``, and the three commands that open a model
(generate, evaluate, show_tokens) refuse a bad folder or image with the same one line, because they
share ``cli/open_model.py``. No weights load here: seconds.

    pytest tests/test_cli.py
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "data/demo/images/val_0000.png"

# Console script -> (target, the script in scripts/, a flag its usage names).
COMMANDS = {
    "visionzip-generate": ("visionzip_core.cli.generate:main", "generate", "--prompt"),
    "visionzip-evaluate": ("visionzip_core.cli.evaluate:main", "evaluate", "--budgets"),
    "visionzip-show-tokens": ("visionzip_core.cli.show_tokens:main", "show_tokens", "--aspect-ratio"),
    "visionzip-plan": ("visionzip_core.cli.plan:main", "plan", "--gpu-memory-gib"),
    "visionzip-check-data": ("visionzip_core.cli.check_data:main", "check_data", "--config"),
}


def _target(spec: str):
    module, function = spec.split(":")
    return getattr(importlib.import_module(module), function)


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"cli_script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("command", list(COMMANDS))
def test_console_script_is_declared_imports_and_answers_help(command, capsys):
    target, script, flag = COMMANDS[command]
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(rf'^{command} = "{re.escape(target)}"$', pyproject, re.M), f"{command} not in pyproject"
    main = _target(target)
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ") and flag in out, out[:500]
    # The checkout's entry point is the same command, not a copy.
    assert _script(script).main is main


def _three_commands(model: str, tmp_path: Path, image: str = str(IMAGE)) -> dict[str, list[str]]:
    return {
        "generate": ["--model", model, "--image", image, "--max-new-tokens", "1"],
        "show_tokens": ["--model", model, "--image", image, "--out", str(tmp_path / "t.png")],
        "evaluate": [
            "--model",
            model,
            "--data",
            str(REPO / "data/demo/instruct_val.json"),
            "--image-folder",
            str(REPO / "data/demo/images"),
            "--out",
            str(tmp_path / "e.json"),
        ],  # fmt: skip
    }


def _errors(argvs: dict[str, list[str]], capsys) -> dict[str, str]:
    errors = {}
    for name, argv in argvs.items():
        assert _target(COMMANDS[f"visionzip-{name.replace('_', '-')}"][0])(argv) == 2, name
        errors[name] = capsys.readouterr().err.strip()
    return errors


@pytest.mark.parametrize("case", ["unreadable config.json", "no weights", "not a model folder"])
def test_the_three_model_commands_refuse_a_bad_folder_with_one_same_line(case, tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    if case == "unreadable config.json":
        (folder / "config.json").write_text("{ not json")
    elif case == "no weights":
        (folder / "config.json").write_text('{"model_type": "llava"}')
    errors = _errors(_three_commands(str(folder), tmp_path), capsys)
    [line] = set(errors.values())  # one message, word for word, from all three
    assert line.startswith("error: --model") and str(folder) in line and "\n" not in line, errors
    assert not (tmp_path / "t.png").exists() and not (tmp_path / "e.json").exists()


def test_an_unreadable_image_is_refused_before_the_model_opens(tmp_path, capsys):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    argvs = _three_commands(str(tmp_path / "nowhere"), tmp_path, image=str(not_an_image))
    del argvs["evaluate"]  # it reads its images from --data
    errors = _errors(argvs, capsys)
    assert set(errors.values()) == {
        f"error: --image {not_an_image}: cannot read it as an image (UnidentifiedImageError)"
    }
