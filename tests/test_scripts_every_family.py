"""scripts/show_tokens.py and scripts/generate.py on every family, through their real entry points.

Each family's tiny model sits in a folder laid out like its download (visionzip_core/testing/tiny.py);
each script runs as a subprocess with a compression budget in the family's form (counts for
LLaVA, ratios for Qwen) and must write its output: the PNG, the generated text. The piped output
must be free of the per-tensor "Loading weights" progress bars.

    pytest tests/test_scripts_every_family.py -m "not slow"   # one-line refusals, seconds
    pytest tests/test_scripts_every_family.py                 # + the matrix, about a minute
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "data/demo/images/val_0000.png"

# Family -> (fixture, budget flags in the family's form).
FAMILIES = {
    "llava-1.5": ("tiny_llava_dir", ["--dominant", "12", "--contextual", "4"]),
    "llava-next": ("tiny_llava_next_dir", ["--dominant", "12", "--contextual", "4"]),
    "qwen2-vl": ("tiny_qwen2_vl_dir", ["--dominant-ratio", "0.3", "--contextual-ratio", "0.1"]),
    "qwen2.5-vl": ("tiny_qwen2_5_vl_dir", ["--dominant-ratio", "0.3", "--contextual-ratio", "0.1"]),
    "llava-onevision": ("tiny_llava_onevision_dir", ["--dominant", "12", "--contextual", "4"]),
}


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _start(script: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out, err


@pytest.fixture(scope="session")
def video_frames(tmp_path_factory) -> list[str]:
    """Four 84x112 (height x width) frames: two frame groups of a Qwen video."""
    folder = tmp_path_factory.mktemp("frames")
    paths = []
    for i in range(4):
        img = Image.new("RGB", (112, 84), "white")
        img.paste((200, 40 * i, 30), (10 * i, 10, 10 * i + 40, 60))
        paths.append(str(folder / f"f{i}.png"))
        img.save(paths[-1])
    return paths


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_show_tokens_and_generate_run_on_every_family(family, request, tmp_path, video_frames):
    fixture, budget = FAMILIES[family]
    model = str(request.getfixturevalue(fixture))
    out = tmp_path / "tokens.png"
    takes_video = family.startswith("qwen") or family == "llava-onevision"
    videos = ["--video", ",".join(video_frames)] if takes_video else []
    # The two scripts are independent: run side by side to keep the matrix short.
    procs = [
        _start("show_tokens.py", "--model", model, "--image", str(IMAGE), "--out", str(out), *budget),
        _start(
            "generate.py", "--model", model, "--image", str(IMAGE), *videos, *budget, "--max-new-tokens", "3"
        ),
    ]
    (shown_rc, shown, shown_err), (gen_rc, generated, gen_err) = [_finish(p) for p in procs]

    assert shown_rc == 0, shown_err
    with Image.open(out) as png:
        assert png.format == "PNG" and png.width >= 360
    assert str(out) in shown and "dominant" in shown
    assert gen_rc == 0, gen_err
    assert "visual tokens per image:" in generated and "generated: '" in generated
    if videos:
        assert "video tokens:" in generated
    for text in (shown, shown_err, generated, gen_err):
        assert "Loading weights" not in text, "progress bars in piped output"


def test_show_tokens_draws_one_qwen_video_frame_group(tiny_qwen2_5_vl_dir, tmp_path, video_frames, capsys):
    show = _script("show_tokens")
    out = tmp_path / "video.png"
    argv = ["--model", str(tiny_qwen2_5_vl_dir), "--video", ",".join(video_frames), "--out", str(out)]
    assert show.main([*argv, "--frame-group", "1", "--dominant", "5", "--contextual", "2"]) == 0
    assert "5 dominant + 2 contextual = 7 of 12 merged tokens (3 x 4, rows x cols)" in capsys.readouterr().out
    with Image.open(out) as png:
        assert png.format == "PNG"
    assert show.main([*argv, "--frame-group", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --video") and "frame group 2" in err and "\n" not in err, err


def test_show_tokens_draws_one_onevision_video_frame(
    tiny_llava_onevision_dir, tmp_path, video_frames, capsys
):
    """A LLaVA-OneVision frame group is one frame: its 4 x 4 pooled tokens (8 x 8 patches pooled 2x2)."""
    show = _script("show_tokens")
    out = tmp_path / "video.png"
    argv = [
        "--model",
        str(tiny_llava_onevision_dir),
        "--video",
        ",".join(video_frames[:3]),
        "--out",
        str(out),
    ]
    argv += ["--dominant", "5", "--contextual", "2"]
    assert show.main([*argv, "--frame-group", "2"]) == 0
    assert "5 dominant + 2 contextual = 7 of 16 pooled tokens (4 x 4, rows x cols)" in capsys.readouterr().out
    with Image.open(out) as png:
        assert png.format == "PNG"
    assert show.main([*argv, "--frame-group", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --video") and "frame group 3" in err and "\n" not in err, err


@pytest.mark.parametrize("script", ["generate", "show_tokens"])
def test_ratio_flags_on_a_counts_family_are_one_line_before_loading(
    script, tiny_llava_next_dir, tmp_path, capsys
):
    """A LLaVA family takes counts: the ratio flags are refused in one line, as training refuses
    ``visionzip.dominant_ratio``, instead of a traceback from the processor after loading."""
    argv = ["--model", str(tiny_llava_next_dir), "--image", str(IMAGE)]
    argv += ["--dominant-ratio", "0.5", "--contextual-ratio", "0.1"]
    if script == "show_tokens":
        argv += ["--out", str(tmp_path / "x.png")]
    assert _script(script).main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --dominant-ratio") and "llava-next takes --dominant and --contextual" in err
    assert "\n" not in err, err


def test_generate_video_frames_of_different_sizes_name_the_video_and_frame(
    tiny_qwen2_5_vl_dir, tmp_path, capsys
):
    frames = []
    for i, size in enumerate([(112, 84), (112, 84), (140, 84)]):
        frames.append(str(tmp_path / f"frame{i}.png"))
        Image.new("RGB", size, "white").save(frames[-1])
    argv = ["--model", str(tiny_qwen2_5_vl_dir), "--video", ",".join(frames[:2])]
    assert _script("generate").main([*argv, "--video", ",".join(frames), "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --video 2 (") and "\n" not in err, err
    assert f"frame 3 ({frames[2]}) is 84x140" in err and "(height x width)" in err, err
