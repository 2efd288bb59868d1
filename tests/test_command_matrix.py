"""Every user-facing command on every model family, as a user runs them: a tiny model laid out
like its download goes through ``scripts/check_data.py``, a short ``train/finetune.py`` run (projector
mode, with ``eval.generate_accuracy``), then ``scripts/evaluate.py``, ``scripts/show_tokens.py`` and
``scripts/generate.py`` on the export.

    PYTHONPATH=$PWD .venv/bin/python -m pytest -m slow tests/test_command_matrix.py   # about 2 min, CPU

Each family's model is conftest.py's ``family_dirs``; it trains once per session (:func:`trained`); a
test of another command on the exports takes the ``trained`` fixture and reads ``trained[family].final``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_train_e2e import REPO, _cmd, _env

pytestmark = pytest.mark.slow

FAMILIES = ("llava-1.5", "llava-next", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3.5", "llava-onevision")
SIZES = [(97, 143), (300, 61), (112, 112), (60, 200), (150, 90)]


def _picture(path: Path, h: int, w: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def _llava_rows() -> tuple[list[dict], list[dict]]:
    """LLaVA-format: one sample per picture size, one text-only sample (train); two pictures (val)."""

    def row(i: int, question: str, answer: str) -> dict:
        turns = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]
        return {"id": f"im{i}", "image": f"im{i}.png", "conversations": turns}

    train_rows = [row(i, "What is it?", "A cat.") for i in range(len(SIZES))]
    train_rows.append(
        {
            "id": "text",
            "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}],
        }
    )
    return train_rows, [row(0, "What is it?", "A cat."), row(2, "Colour?", "Blue.")]


def _messages_rows() -> tuple[list[dict], list[dict]]:
    """Messages format: the same pictures, a 4-frame video and a text-only sample (train); a picture
    and the video (val), so scoring asks a video too."""

    def ask(part: dict, question: str, answer: str, sid: str) -> dict:
        content = [part, {"type": "text", "text": question}] if part else [{"type": "text", "text": question}]
        return {
            "id": sid,
            "messages": [
                {"role": "user", "content": content},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ],
        }

    video = {"type": "video", "video": [f"fr{k}.png" for k in range(4)]}
    train_rows = [
        ask({"type": "image", "image": f"im{i}.png"}, "What is it?", "A cat.", f"im{i}") for i in range(5)
    ]
    train_rows += [ask(video, "What moves?", "A dog.", "video"), ask(None, "Say hi.", "Hi.", "text")]
    val_rows = [
        ask({"type": "image", "image": "im0.png"}, "What is it?", "A cat.", "im0"),
        ask(video, "What moves?", "A dog.", "v"),
    ]
    return train_rows, val_rows


@pytest.fixture(scope="session")
def matrix_data(tmp_path_factory) -> Path:
    return write_matrix_data(tmp_path_factory.mktemp("matrix-data"))


def write_matrix_data(out: Path) -> Path:
    """``out`` with ``images/`` (pictures of several sizes and video frames),
    ``llava_{train,val}.json`` and ``messages_{train,val}.jsonl``."""
    (out / "images").mkdir()
    for i, (h, w) in enumerate(SIZES):
        _picture(out / "images" / f"im{i}.png", h, w, i)
    for k in range(4):
        _picture(out / "images" / f"fr{k}.png", 70, 100, 10 + k)
    train_rows, val_rows = _llava_rows()
    (out / "llava_train.json").write_text(json.dumps(train_rows))
    (out / "llava_val.json").write_text(json.dumps(val_rows))
    train_rows, val_rows = _messages_rows()
    (out / "messages_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    (out / "messages_val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val_rows))
    return out


def takes_video(name: str) -> bool:
    """Whether the family's matrix run trains and scores on the messages data, with its video."""
    return name.startswith("qwen") or name == "llava-onevision"


def family_overrides(name: str, model_dir: Path, data: Path, out: Path) -> list[str]:
    """A short projector-mode run of ``model_dir`` on the family's data format, scored at the end.
    Data keys the family has its own default for (template, aspect ratio) are left to the family."""
    fmt, ext = ("messages", "jsonl") if takes_video(name) else ("llava", "json")
    budget = (  # configs/demo.yaml is LLaVA's: a Qwen user sets the template as configs/qwen2.5-vl-7b do
        [
            "visionzip.dominant_ratio=0.25",
            "visionzip.contextual_ratio=0.25",
            "data.model_max_length=512",
            "data.template=chat_template",
        ]
        if name.startswith("qwen")
        else ["data.template=chat_template"]
        if name == "llava-onevision"
        else []
    )
    aspect = ["data.image_aspect_ratio=anyres"] if name in ("llava-next", "llava-onevision") else []
    return [
        f"model.name_or_path={model_dir}",
        f"train.output_dir={out}",
        "train.mode=projector",
        f"data.train=[{{path: {data}/{fmt}_train.{ext}, image_folder: {data}/images}}]",
        f"data.val=[{{path: {data}/{fmt}_val.{ext}, image_folder: {data}/images}}]",
        f"data.cache_dir={out.parent / (out.name + '-cache')}",
        *aspect,
        *budget,
        "train.per_device_batch_size=2",
        "train.max_steps=2",
        "train.save_steps=2",
        "train.eval_steps=null",
        "train.logging_steps=1",
        "data.num_workers=0",
        "wandb.enabled=false",
        "eval.generate_accuracy=true",
        "eval.max_new_tokens=2",
    ]


@dataclass(frozen=True)
class Trained:
    """One family's matrix run: its model folder, its overrides, the run folder, its export
    (``final``) and what ``scripts/check_data.py`` printed for the same config."""

    model: Path
    overrides: list[str]
    run: Path
    final: Path
    check_stdout: str
    train_stdout: str


def run_script(script: str, *args: str) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of ``scripts/<script>``'s ``main(argv)``, called in this
    process: the same code path as the command line, without a second interpreter start."""
    spec = importlib.util.spec_from_file_location(f"matrix_{script}", REPO / "scripts" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = module.main(list(args))
    return code, out.getvalue(), err.getvalue()


FAILING_SCORE = "llava-1.5 failing score"  # a run whose requested scoring fails (exit 4)


@pytest.fixture(scope="session")
def runs(family_dirs, matrix_data, tmp_path_factory) -> dict[str, tuple[Path, list[str], int, str, str, str]]:
    """Per family: ``check_data.py`` on the config, then the training run through the real entry
    point; and one LLaVA-1.5 run whose scoring fails. ``(run folder, overrides, exit code, stdout,
    stderr, check_data's stdout)`` by name. The runs go side by side: most of a tiny run is the
    interpreter's start."""
    root = tmp_path_factory.mktemp("matrix-runs")
    overrides, checks = {}, {}
    for name in FAMILIES:
        overrides[name] = family_overrides(name, family_dirs[name], matrix_data, root / name)
        code, stdout, stderr = run_script("check_data", "--config", "configs/demo.yaml", *overrides[name])
        assert code == 0, f"{name}: check_data\n{stdout[-2000:]}{stderr[-3000:]}"
        checks[name] = stdout
    failing = family_overrides("llava-1.5", family_dirs["llava-1.5"], matrix_data, root / "failing-score")
    overrides[FAILING_SCORE] = failing + [
        "train.max_steps=1",
        "train.save_steps=1",
        "debug.fail_scoring=true",
    ]
    started = {}
    for k, name in enumerate(
        overrides
    ):  # output to files: a full pipe would stall a run while another is read
        logs = [open(root / f"{k}.{kind}", "w") for kind in ("out", "err")]  # noqa: SIM115
        started[name] = (
            k,
            subprocess.Popen(
                _cmd("python", overrides[name]), cwd=REPO, env=_env(), stdout=logs[0], stderr=logs[1]
            ),
        )
    out = {}
    for name, (k, proc) in started.items():
        proc.wait(timeout=600)
        stdout, stderr = ((root / f"{k}.{kind}").read_text() for kind in ("out", "err"))
        run = Path(next(o for o in overrides[name] if o.startswith("train.output_dir=")).partition("=")[2])
        out[name] = (run, overrides[name], proc.returncode, stdout, stderr, checks.get(name, ""))
    return out


@pytest.fixture(scope="session")
def trained(family_dirs, runs) -> dict[str, Trained]:
    """Each family's finished matrix run: the exports are the inputs of every other command's test."""
    out = {}
    for name in FAMILIES:
        run, overrides, code, stdout, stderr, check = runs[name]
        assert code == 0, f"{name}: exit {code}\n{stderr[-3000:]}"
        out[name] = Trained(family_dirs[name], overrides, run, run / "final", check, stdout)
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_check_data_counts_the_epoch_training_runs(trained, name):
    """check_data.py passes on each family's config and counts the samples training takes (the
    text-only sample is left out by both in projector mode)."""
    t = trained[name]
    record = json.loads((t.run / "checkpoint-2" / "run_settings.json").read_text())
    samples = record["derived"]["data.train_samples"]
    assert samples == (6 if takes_video(name) else 5)  # every image (and video) sample, no text-only
    assert f"data.train: {samples} samples per epoch" in t.check_stdout, t.check_stdout
    assert "1 text-only left out in projector mode" in t.check_stdout


@pytest.mark.parametrize("name", FAMILIES)
def test_training_scores_its_export(trained, name):
    """``eval.generate_accuracy`` asks the export as its family is trained and scores every val
    sample it takes (the video too, for a family that takes video); the run exits 0 (``train`` checks it)."""
    t = trained[name]
    assert (t.final / "config.json").is_file()
    scored = re.search(r"answers: \d\.\d{3} \((\d+)/(\d+) first replies exact", t.train_stdout)
    assert scored, t.train_stdout[-2000:]
    assert int(scored.group(2)) == 2


@pytest.mark.parametrize("name", FAMILIES)
def test_evaluate_scores_the_export(trained, matrix_data, tmp_path, name):
    t = trained[name]
    fmt = "messages_val.jsonl" if takes_video(name) else "llava_val.json"
    out = tmp_path / "eval.json"
    code, _, stderr = run_script(
        "evaluate",
        "--model", str(t.final),
        "--data", str(matrix_data / fmt),
        "--image-folder", str(matrix_data / "images"),
        "--out", str(out),
        "--budgets", "recorded,stock",
        "--max-new-tokens", "2",
    )  # fmt: skip
    assert code == 0, stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["samples"] for r in rows] == [2, 2]  # the video sample is asked too
    assert rows[0]["tokens"] != rows[1]["tokens"]  # the recorded split is fewer tokens than stock


@pytest.mark.parametrize("name", FAMILIES)
def test_show_tokens_and_generate_run_on_the_export(trained, matrix_data, tmp_path, name):
    """The export keeps its recorded split: both scripts take it without budget flags, draw the
    picture and answer, in the family's own aspect ratio and prompt."""
    t = trained[name]
    image = str(matrix_data / "images" / "im0.png")
    out = tmp_path / "tokens.png"
    code, stdout, stderr = run_script(
        "show_tokens", "--model", str(t.final), "--image", image, "--out", str(out)
    )
    assert code == 0, stderr[-3000:]
    with Image.open(out) as png:
        assert png.format == "PNG"
    recorded = json.loads((t.final / "config.json").read_text())["visionzip"]
    kept = (
        f"ratios {recorded['dominant_ratio']:g} + {recorded['contextual_ratio']:g}"
        if recorded.get("dominant_ratio") is not None
        else f"{recorded['dominant']} dominant + {recorded['contextual']} contextual"
        if name == "llava-onevision"  # no CLS: the count line of a CLS-free tower
        else f"{recorded['dominant']} dominant ("
    )
    assert kept in stdout, stdout  # the drawn budget is the recorded one
    code, stdout, stderr = run_script(
        "generate",
        "--model",
        str(t.final),
        "--image",
        image,
        "--prompt",
        "What is it?",
        "--max-new-tokens",
        "2",
    )
    assert code == 0, stderr[-3000:]
    assert stdout.strip(), "no reply printed"


def test_a_failed_requested_score_exits_4_and_keeps_the_run(runs):
    """A scoring failure after a good run is its own exit code (CI notices), and the checkpoint and
    the export stay."""
    out, _, code, stdout, stderr, _ = runs[FAILING_SCORE]
    assert code == 4, stderr[-3000:]
    assert "answers: not scored: RuntimeError: debug.fail_scoring" in stdout
    assert f"error: eval.generate_accuracy: could not score {out / 'final'}" in stderr
    assert (out / "final" / "model.safetensors").is_file() and (out / "checkpoint-1").is_dir()
