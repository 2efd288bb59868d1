"""``pip install .`` (not editable) gives a working ``visionzip-train``, run from outside the repository.

The wheel is built from a copy of the package files (no build/ or egg-info left in the checkout)
and installed into a fresh venv. That venv sees the test interpreter's site-packages through a
plain ``.pth`` path line, so torch and the rest are reused, but the path line does not run that
site-packages' own ``.pth`` files: an editable install of this project there stays inactive, and
the code that runs is the wheel's (checked).
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from safetensors.torch import load_file

from visionzip_core.testing import demo_data
from visionzip_core.training.repo_paths import SHIPPED_CONFIGS, find_config

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "VISIONZIP_CACHE")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    return env


def _run(cmd: list, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, (
        f"{cmd}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The bin/ folder of a venv holding the wheel built from this checkout."""
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "configs", "visionzip_core"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, src / name, **({"symlinks": True} if copy is shutil.copytree else {}))
    for cache in src.rglob("__pycache__"):
        shutil.rmtree(cache)
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", root / "dist", src], root)
    (wheel,) = (root / "dist").glob("visionzip_core-*.whl")
    shipped = zipfile.ZipFile(wheel).namelist()
    for name in ("configs/demo.yaml", "configs/deepspeed/zero2.json", "testing/demo_data.py"):
        assert f"visionzip_core/{name}" in shipped, name
    assert "visionzip-train = visionzip_core.training.recipe:main" in "".join(
        zipfile.ZipFile(wheel).read(n).decode() for n in shipped if n.endswith("entry_points.txt")
    )
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], root)
    purelib = Path(
        sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}, scheme="venv")
    )
    (purelib / "shared.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    python = venv / "bin" / "python"
    _run([*pip, "--python", python, "install", "--no-deps", "--no-index", "-q", wheel], root)
    where = _run([python, "-c", "import visionzip_core; print(visionzip_core.__file__)"], root).stdout
    assert Path(where.strip()).is_relative_to(venv), f"the wheel is shadowed: {where}"
    return venv / "bin"


def test_config_paths_fall_back_to_the_shipped_configs_and_name_a_missing_file_as_given(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    shipped = Path(find_config("configs/demo.yaml"))
    assert shipped.is_relative_to(SHIPPED_CONFIGS)
    assert shipped.read_bytes() == (REPO / "configs/demo.yaml").read_bytes()
    assert find_config("configs/nothing.yaml") == "configs/nothing.yaml"  # the error names it as typed
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs/demo.yaml").write_text("model: {}\n")
    assert find_config("configs/demo.yaml") == "configs/demo.yaml"  # the cwd's own file wins


@pytest.mark.slow
def test_visionzip_train_from_a_wheel_trains_and_exports_outside_the_repository(
    installed, tiny_llava_dir, tmp_path
):
    """``--help``, then a 2-step run of the shipped demo config (``configs/demo.yaml`` and its
    ``configs/deepspeed/zero2.json`` found inside the package) on demo data, in a folder with no checkout:
    exit 0 and a trained ``final/``."""
    assert not (tmp_path / "configs").exists() and not REPO.is_relative_to(tmp_path)
    train = installed / "visionzip-train"
    assert "section.key=value" in _run([train, "--help"], tmp_path).stdout
    demo_data.main(["--out", str(tmp_path / "data" / "demo"), "--train", "4", "--val", "2"])
    proc = _run(
        [
            train,
            "--config",
            "configs/demo.yaml",
            f"model.name_or_path={tiny_llava_dir}",
            "train.output_dir=run",
            "train.max_steps=2",
            "train.per_device_batch_size=2",
            "train.eval_steps=null",
            "wandb.enabled=false",
            "eval.generate_accuracy=false",
        ],
        tmp_path,
    )
    assert "done: step 2/2" in proc.stdout, proc.stdout
    trained = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    base = load_file(str(tiny_llava_dir / "model.safetensors"))
    projector = [k for k in trained if "multi_modal_projector" in k and k in base]
    assert projector and any(not trained[k].equal(base[k]) for k in projector)  # it trained
    assert not (REPO / "run").exists()
