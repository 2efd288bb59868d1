"""Built-in model names resolve to folders built once; the inference CLI runs end to end."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import warm_python

from visionzip_core.model_names import resolve_model_path

REPO = Path(__file__).resolve().parents[1]


def test_builtin_is_built_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VISIONZIP_CACHE", str(tmp_path))
    path = Path(resolve_model_path("builtin:tiny-clip"))
    assert path == tmp_path / "builtin" / "tiny-clip"
    assert (path / "config.json").is_file() and (path / "preprocessor_config.json").is_file()
    stamp = (path / "config.json").stat().st_mtime_ns
    assert resolve_model_path("builtin:tiny-clip") == str(path)
    assert (path / "config.json").stat().st_mtime_ns == stamp  # not rebuilt
    # No temporary folders are left beside the result.
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny-clip"]


def test_plain_names_pass_through_and_unknown_builtins_fail():
    assert resolve_model_path("some/folder") == "some/folder"
    with pytest.raises(ValueError, match="builtin:tiny-llava, builtin:tiny-clip, builtin:tiny-llm"):
        resolve_model_path("builtin:huge-llava")


@pytest.mark.slow
def test_generate_cli_reports_kept_tokens(tiny_llava_dir):
    cmd = [sys.executable, str(REPO / "scripts" / "generate.py"), "--model", str(tiny_llava_dir)]
    out = warm_python.run(
        cmd + ["--dominant", "9", "--contextual", "3", "--max-new-tokens", "3"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "visual tokens per image: 12 of 64 (VisionZip dominant 9 + contextual 3)" in out
    assert "generated:" in out
    stock = warm_python.run(
        cmd + ["--no-visionzip", "--max-new-tokens", "2"], capture_output=True, text=True
    ).stdout
    assert "visual tokens per image: 64 of 64 (stock)" in stock
    bad = warm_python.run(cmd + ["--dominant", "60", "--contextual", "10"], capture_output=True, text=True)
    assert bad.returncode != 0 and "dominant + contextual = 70" in bad.stderr


@pytest.mark.slow
def test_generate_cli_keeps_the_split_a_checkpoint_records(tiny_llava_dir, tmp_path):
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    from visionzip_core import visionzip

    saved = tmp_path / "trained"
    visionzip(
        LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir), dominant=6, contextual=2
    ).save_pretrained(saved)
    LlavaProcessor.from_pretrained(tiny_llava_dir).save_pretrained(saved)
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "generate.py"),
        "--model",
        str(saved),
        "--max-new-tokens",
        "2",
    ]
    same = warm_python.run(cmd, capture_output=True, text=True, check=True)
    assert "visual tokens per image: 8 of 64 (VisionZip dominant 6 + contextual 2)" in same.stdout
    assert "note:" not in same.stderr
    override = warm_python.run(cmd + ["--contextual", "4"], capture_output=True, text=True, check=True)
    assert "visual tokens per image: 10 of 64 (VisionZip dominant 6 + contextual 4)" in override.stdout
    # Another split than the one trained is said, not done silently.
    assert (
        "note: this export was trained at dominant 6 + contextual 2; generating at dominant 6 + contextual 4 instead"
        in override.stderr
    )
