"""scripts/check_data.py says what train/finetune.py would do with the same config and overrides.

    pytest -m slow tests/test_check_data.py     # both entry points on a copy of the demo data, ~1-2 min

Each test runs both real entry points on the same config and compares what they print.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import warm_python
from test_train_e2e import _env

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture
def demo_copy(tmp_path):
    """The demo training data with its own image folder (so images can be deleted)."""
    shutil.copytree(REPO / "data/demo/images", tmp_path / "images")
    shutil.copy(REPO / "data/demo/instruct_train.json", tmp_path / "train.json")
    return tmp_path


def _overrides(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "model.name_or_path=builtin:tiny-llava",  # the data checks need no trained tower; builds in seconds
        f"data.train=[{{path: {data / 'train.json'}, image_folder: {data / 'images'}}}]",
        "data.val=[]",
        f"data.cache_dir={data / 'cache'}",
        "data.num_workers=0",
        f"train.output_dir={out}",
        "train.max_steps=1",
        "train.eval_steps=null",
        "wandb.enabled=false",
        *extra,
    ]


def _run(script: str, overrides: list[str]) -> subprocess.CompletedProcess:
    return warm_python.run(
        [sys.executable, script, "--config", "configs/demo.yaml", *overrides],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _image_rows(data: Path, n: int) -> list[str]:
    rows = json.loads((data / "train.json").read_text())
    return [r["image"] for r in rows if "image" in r][:n]


def test_no_model_flag_and_the_configured_token_count(demo_copy, tmp_path):
    check = _run("scripts/check_data.py", _overrides(demo_copy, tmp_path / "out"))
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-2000:]
    assert "visual tokens per image: 16 " in check.stdout  # 12 + 4 from the YAML, not the stock 64
    assert "data.train: 330 samples per epoch" in check.stdout and "data OK for training" in check.stdout


def test_bad_image_under_error_stops_both_with_the_same_line(demo_copy, tmp_path):
    gone = _image_rows(demo_copy, 3)[1:3]
    for name in gone:
        (demo_copy / "images" / name).unlink()
    overrides = _overrides(demo_copy, tmp_path / "out")
    check = _run("scripts/check_data.py", overrides)
    train = _run("train/finetune.py", overrides)
    assert check.returncode == 1 and train.returncode == 2, check.stdout[-2000:] + train.stderr[-2000:]
    stop = re.search(r"^training would stop: (.*)$", check.stdout, re.M).group(1)
    error = re.search(r"^error: (.*)$", train.stderr, re.M).group(1)
    assert stop == error and gone[0] in error and "+1 more bad samples" in error
    for name in gone:  # every bad sample is listed
        assert f"image file not found: {demo_copy / 'images' / name}" in check.stdout
    assert "trainable=" not in train.stdout  # stopped before the model was built


def test_skipped_samples_give_the_same_epoch_to_both(demo_copy, tmp_path):
    for name in _image_rows(demo_copy, 5):
        (demo_copy / "images" / name).unlink()
    # 325 samples left: 5 steps of 65 per epoch; with all 330 it would be 6
    extra = ["data.on_bad_sample=skip", "data.max_skip_fraction=0.02", "train.per_device_batch_size=65"]
    overrides = _overrides(demo_copy, tmp_path / "out", *extra)
    check = _run("scripts/check_data.py", overrides)
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-2000:]
    assert '"skipped": 5' in check.stdout and "data.train: 325 samples per epoch" in check.stdout
    train = _run("train/finetune.py", overrides)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "visual tokens/image=16" in train.stdout and "(5/epoch)" in train.stdout
    # a stricter limit stops both
    strict = _overrides(demo_copy, tmp_path / "out2", *extra[:1], "data.max_skip_fraction=0.01")
    check, train = _run("scripts/check_data.py", strict), _run("train/finetune.py", strict)
    assert check.returncode == 1 and train.returncode == 2
    assert "5/330 samples are bad" in check.stdout and "5/330 samples are bad" in train.stderr


def test_check_data_reports_config_errors_like_the_trainer(demo_copy, tmp_path):
    overrides = _overrides(
        demo_copy, tmp_path / "out", "model.name_or_path=builtin:nope", "train.sav_steps=1"
    )
    check, train = _run("scripts/check_data.py", overrides), _run("train/finetune.py", overrides)
    assert check.returncode == 2 and train.returncode == 2
    for text in ("model.name_or_path: unknown model 'builtin:nope'", "train.sav_steps: unknown key"):
        assert text in check.stderr and text in train.stderr


def test_preflight_cache_is_not_trusted_after_an_image_is_deleted(demo_copy, tmp_path):
    overrides = _overrides(demo_copy, tmp_path / "out")
    first = _run("train/finetune.py", overrides)
    assert first.returncode == 0, first.stderr[-3000:]
    victim = _image_rows(demo_copy, 8)[7]
    (demo_copy / "images" / victim).unlink()
    again = _run("train/finetune.py", _overrides(demo_copy, tmp_path / "out2"))
    assert again.returncode == 2, again.stderr[-3000:]
    assert f"image file not found: {demo_copy / 'images' / victim}" in again.stderr
    assert "trainable=" not in again.stdout and not (tmp_path / "out2" / "final").exists()
