"""scripts/evaluate.py: the scoring rule with its cases written out, sample reading, and a run of
the real command on the tiny model at several budgets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import warm_python

from visionzip_core import VisionZipConfig
from visionzip_core.evaluation import exact_match, load_eval_samples, normalize_answer, parse_budgets
from visionzip_core.families import family_for

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "reply, reference, same",
    [
        ("blue.", "blue.", True),
        ("Blue", "blue.", True),  # case and one trailing period do not count
        ("  blue.\n", "blue", True),
        ("blue triangle", "blue", False),
        ("blue..", "blue", False),  # only one period is dropped
        ("bottom right.", "blue.", False),
        ("light  blue", "light blue", True),  # runs of spaces are one space
        ("", "blue", False),
    ],
)
def test_exact_match_ignores_case_and_a_trailing_period_only(reply, reference, same):
    assert exact_match(reply, reference) is same


def test_normalize_answer():
    assert normalize_answer(" Top Left. ") == "top left"


def test_budgets_parse_and_name_the_bad_one():
    llava = family_for("llava-1.5")
    recorded = VisionZipConfig(dominant=12, contextual=4)
    assert parse_budgets("recorded,stock,6+2,default", llava, recorded) == [
        ("12+4", recorded),
        ("stock", None),
        ("6+2", VisionZipConfig(dominant=6, contextual=2)),
        ("54+10", VisionZipConfig(dominant=54, contextual=10)),  # the family's default budget
    ]
    with pytest.raises(ValueError, match="'recorded' but the model records no VisionZip"):
        parse_budgets("recorded", llava, None)
    with pytest.raises(ValueError, match="'64' is not stock, recorded, default, DOMINANT"):
        parse_budgets("stock,64", llava, None)
    with pytest.raises(ValueError, match="'0.3\\+0.1' is a ratio split; llava-1.5 takes DOMINANT"):
        parse_budgets("0.3+0.1", llava, None)
    with pytest.raises(
        ValueError, match=r"--budgets 0\.9\+0\.2: visionzip.dominant_ratio \+ contextual_ratio"
    ):
        parse_budgets("0.9+0.2", family_for("qwen2.5-vl"), None)


def test_budgets_follow_the_family_and_the_recorded_form():
    """A Qwen model's default budget is its own (ratios, its feature layer), not LLaVA's 54+10; a
    count budget on an export that records ratios runs at those counts (it used to keep the ratios
    under a count label), and the recorded ratios are labelled as ratios."""
    qwen = family_for("qwen2.5-vl")
    [(label, vz)] = parse_budgets("default", qwen, None)
    assert (label, vz.dominant_ratio, vz.contextual_ratio, vz.feature_layer) == ("0.45+0.05", 0.45, 0.05, -1)
    recorded = VisionZipConfig(dominant_ratio=0.3, contextual_ratio=0.1, feature_layer=-1, merge="mean")
    (rec_label, rec), (count_label, counts), (ratio_label, ratios) = parse_budgets(
        "recorded,6+2,0.2+0.05", qwen, recorded
    )
    assert (rec_label, rec) == ("0.3+0.1", recorded)
    assert count_label == "6+2" and not counts.uses_ratios and (counts.dominant, counts.contextual) == (6, 2)
    assert (counts.feature_layer, counts.merge) == (-1, "mean")  # the rest of the recorded settings
    assert ratio_label == "0.2+0.05" and (ratios.dominant_ratio, ratios.contextual_ratio) == (0.2, 0.05)


def test_samples_without_an_image_are_left_out_and_problems_name_the_sample(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    rows = [
        {
            "id": "x",
            "image": "a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour?"},
                {"from": "gpt", "value": "red."},
            ],
        },
        {"id": "t", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    [s] = load_eval_samples(tmp_path / "d.json", tmp_path)
    assert (s.sample_id, s.question, s.reference, s.images) == (
        "x",
        "What colour?",
        "red.",
        (tmp_path / "a.png",),
    )
    rows[0]["image"] = "missing.png"
    (tmp_path / "d.json").write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=r"d.json: sample 0 \(id x\): image not found: .*missing.png"):
        load_eval_samples(tmp_path / "d.json", tmp_path)


def _evaluate(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "scripts/evaluate.py"), *args]
    return warm_python.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_evaluate_scores_every_budget_side_by_side(tiny_llava_dir, tmp_path):
    out = tmp_path / "eval.json"
    proc = _evaluate(
        "--model",
        str(tiny_llava_dir),
        "--data",
        "data/demo/instruct_val.json",
        "--image-folder",
        "data/demo/images",
        "--out",
        str(out),
        "--budgets",
        "stock,12+4,6+2",
        "--limit",
        "3",
        "--max-new-tokens",
        "4",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["budget"] for r in rows] == ["stock", "12+4", "6+2"]
    assert [r["tokens"] for r in rows] == [64, 16, 8]  # the tiny tower: 64 patches at 112 px
    for r in rows:
        assert r["samples"] == 3 and 0 <= r["accuracy"] <= 1 and r["correct"] == round(r["accuracy"] * 3)
        assert r["ttft_s"] > 0 and r["peak_mem_mb"] > 0
        assert len(r["mistakes"]) == 3 - r["correct"]
    # Fewer visual tokens, less live memory while generating.
    assert rows[2]["peak_mem_mb"] < rows[0]["peak_mem_mb"]


def test_bad_input_is_one_line_naming_it(tiny_llava_dir, tmp_path):
    proc = _evaluate(
        "--model",
        str(tiny_llava_dir),
        "--data",
        str(tmp_path / "none.json"),
        "--image-folder",
        "data/demo/images",
        "--out",
        str(tmp_path / "o.json"),
    )
    assert (
        proc.returncode == 2
        and proc.stderr.strip() == f"error: --data: no such file {tmp_path / 'none.json'}"
    )
    proc = _evaluate(
        "--model",
        str(tmp_path),
        "--data",
        "data/demo/instruct_val.json",
        "--image-folder",
        "data/demo/images",
        "--out",
        str(tmp_path / "o.json"),
    )
    assert (
        proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and str(tmp_path) in proc.stderr
    )


def test_a_failed_score_after_training_is_one_line_not_a_lost_run(tmp_path, monkeypatch):
    """``eval.generate_accuracy`` runs after the export: a model that cannot be scored is reported."""
    import torch

    from visionzip_core.training.config_loading import load_config
    from visionzip_core.training.export_scoring import ScoringFailed, score_export

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    settings = load_config(repo / "configs/demo.yaml")
    (tmp_path / "final").mkdir()
    with pytest.raises(ScoringFailed) as failed:  # main() exits EXIT_NOT_SCORED on it
        score_export(settings, {"model": tmp_path / "final"}, torch.device("cpu"))
    assert str(failed.value) and "\n" not in str(failed.value)
    assert score_export(settings, {}, torch.device("cpu")) == "not scored: no full model was exported"
