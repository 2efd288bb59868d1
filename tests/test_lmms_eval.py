"""``lmms-eval --model visionzip``: the real lmms-eval CLI, offline, on a two-document local task.

The task is in lmms-eval's own format (a YAML task, its ``utils.py``, and a ``datasets`` folder saved
with ``save_to_disk`` holding the images), once as ``generate_until`` and once as
``multiple_choice`` (answered by ``loglikelihood``). The replies and log-likelihoods lmms-eval
writes, batched, must equal those of the same tiny model asked one document at a time through the
project's own evaluation path (the family's prompt), at the same budget; the log-likelihoods must
differ from the stock model's, so the budget was applied. Needs the ``[eval]`` extra
(``bash scripts/setup.sh --eval``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from visionzip_core import remove_visionzip, visionzip, visionzip_processor
from visionzip_core.evaluation import EvalSample, eval_inputs
from visionzip_core.families import family_for

DOCS = [
    {"question_id": "q0", "question": "Is there a red square?", "answer": "yes", "color": (200, 30, 30)},
    {"question_id": "q1", "question": "Is the picture green?", "answer": "no", "color": (20, 40, 210)},
]
CHOICES = ["yes", "no"]
BUDGET = (6, 2)

TASK_UTILS = """
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def doc_to_choice(doc):
    return ["yes", "no"]
"""

GEN_TASK = """
task: vz_tiny_gen
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 5
  temperature: 0
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""

MC_TASK = """
task: vz_tiny_mc
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_choice: !function utils.doc_to_choice
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""


def _images():
    from PIL import Image

    return [Image.new("RGB", (96 + 16 * k, 112), doc["color"]) for k, doc in enumerate(DOCS)]


def _write_task(root: Path) -> Path:
    """The task folder (two YAML tasks + utils.py) over a saved ``datasets`` folder; returns it."""
    import datasets

    features = datasets.Features(
        {
            "question_id": datasets.Value("string"),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "image": datasets.Image(),
        }
    )
    rows = {k: [d[k] for d in DOCS] for k in ("question_id", "question", "answer")}
    data = datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows | {"image": _images()}, features)})
    data.save_to_disk(str(root / "data"))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(TASK_UTILS)
    (tasks / "vz_tiny_gen.yaml").write_text(GEN_TASK.format(data=root / "data"))
    (tasks / "vz_tiny_mc.yaml").write_text(MC_TASK.format(data=root / "data"))
    return tasks


def _lmms_eval() -> str:
    """The ``lmms-eval`` console script of this interpreter's environment."""
    script = Path(sys.executable).parent / "lmms-eval"
    if not script.is_file():
        pytest.fail("lmms-eval is not installed in this environment: bash scripts/setup.sh --eval")
    return str(script)


def _reference(model_dir: Path, folder: Path) -> dict:
    """Per budget (``BUDGET``, then stock), one document at a time: the greedy replies (5 new tokens)
    and each choice's summed log-probability, prompted the family's way
    (:func:`visionzip_core.evaluation.eval_inputs`), unbatched and unpadded."""
    from PIL import Image

    family = family_for(json.loads((model_dir / "config.json").read_text())["model_type"])
    model = family.load(str(model_dir), dtype=torch.float32).eval()
    paths = []
    for k, image in enumerate(_images()):
        paths.append(folder / f"ref-{k}.png")
        image.save(paths[-1])
    found = {}
    for budget in (BUDGET, None):
        processor = family.load_processor(str(model_dir))
        if budget is None:
            remove_visionzip(model)
        else:
            visionzip(model, dominant=budget[0], contextual=budget[1])
            visionzip_processor(processor, model.config)
        tok = processor.tokenizer
        replies, lls = [], []
        for doc, path in zip(DOCS, paths):
            sample = EvalSample(doc["question_id"], doc["question"], doc["answer"], (path,))
            inputs, _ = eval_inputs(family, processor, sample, None, "cpu", torch.float32)
            with torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
            replies.append(tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
            prompt = family.prompt(processor, doc["question"], 1)
            for choice in CHOICES:
                cont = " " + choice  # lmms-eval's target delimiter
                n = len(tok(prompt + cont).input_ids) - len(tok(prompt).input_ids)
                full = processor(
                    text=[prompt + cont], images=[Image.open(path).convert("RGB")], return_tensors="pt"
                )
                with torch.inference_mode():
                    logits = model(**full).logits[0]
                logprobs = torch.log_softmax(logits[-n - 1 : -1].float(), dim=-1)
                lls.append(float(logprobs.gather(-1, full["input_ids"][0, -n:, None]).sum()))
        found[budget] = (replies, lls)
    return found


@pytest.mark.slow
def test_lmms_eval_cli_runs_visionzip_on_a_local_task(tiny_llava_dir, tmp_path):
    tasks = _write_task(tmp_path)
    out = tmp_path / "out"
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        _lmms_eval(),
        "--model", "visionzip",
        "--model_args", f"pretrained={tiny_llava_dir},dominant={BUDGET[0]},contextual={BUDGET[1]}",
        "--tasks", "vz_tiny_gen,vz_tiny_mc",
        "--include_path", str(tasks),
        "--batch_size", "4",  # all four choices in one padded batch
        "--device", "cpu",
        "--output_path", str(out),
        "--log_samples",
    ]  # fmt: skip
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"VisionZip dominant {BUDGET[0]} + contextual {BUDGET[1]}" in run.stderr
    assert f"visual tokens per image: {sum(BUDGET)} of 64" in run.stderr

    (results_file,) = out.rglob("*_results.json")
    results = json.loads(results_file.read_text())
    assert results["config"]["model"] == "visionzip"
    assert 0.0 <= results["results"]["vz_tiny_gen"]["exact_match,none"] <= 1.0
    assert 0.0 <= results["results"]["vz_tiny_mc"]["acc,none"] <= 1.0

    samples = {}
    for task in ("vz_tiny_gen", "vz_tiny_mc"):
        (path,) = out.rglob(f"*_samples_{task}.jsonl")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        samples[task] = sorted(rows, key=lambda r: r["doc_id"])
    assert [r["doc_id"] for r in samples["vz_tiny_gen"]] == [0, 1]

    reference = _reference(tiny_llava_dir, tmp_path)
    replies, lls = reference[BUDGET]
    # The samples file keeps each reply as text and each choice's result as [log-likelihood, greedy].
    assert [r["filtered_resps"] for r in samples["vz_tiny_gen"]] == replies
    got_lls = [float(ll) for r in samples["vz_tiny_mc"] for ll, _ in r["filtered_resps"]]
    assert got_lls == pytest.approx(lls, abs=1e-3)
    assert got_lls != pytest.approx(reference[None][1], abs=1e-3)  # the budget changed what the LLM saw


def test_budget_from_model_args():
    """A key given replaces the export's recorded split, else the family's budget applies; ratios are
    refused for a count-only family and mixed with stock=True, in one line naming the keys."""
    from visionzip_core.config import VisionZipConfig
    from visionzip_core.lmms_eval_model import budget_settings

    llava, qwen = family_for("llava"), family_for("qwen2_5_vl")
    default = budget_settings(llava, None)
    assert (default.dominant, default.contextual) == (54, 10)
    recorded = VisionZipConfig(dominant=12, contextual=4)
    assert budget_settings(llava, recorded).model_dump() == recorded.model_dump()
    assert (
        budget_settings(llava, recorded, dominant=6).dominant,
        budget_settings(llava, recorded).contextual,
    ) == (6, 4)
    assert budget_settings(llava, recorded, stock=True) is None
    assert budget_settings(qwen, None, dominant_ratio=0.2, contextual_ratio=0.05).uses_ratios
    with pytest.raises(
        ValueError, match=r"dominant_ratio/contextual_ratio: only for .*llava-1.5 takes dominant="
    ):
        budget_settings(llava, None, dominant_ratio=0.5, contextual_ratio=0.1)
    with pytest.raises(ValueError, match=r"stock=True runs without VisionZip; drop dominant"):
        budget_settings(llava, None, stock=True, dominant=54)
    with pytest.raises(ValueError, match=r"^--model_args: ") as err:
        budget_settings(llava, None, dominant=-1)
    assert "\n" not in str(err.value)


def test_unknown_hub_model_offline_is_one_line(tmp_path, monkeypatch):
    from visionzip_core.lmms_eval_model import model_folder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(
        ValueError, match=r"pretrained: no-such-org/no-such-model is neither a folder nor"
    ) as err:
        model_folder("no-such-org/no-such-model")
    assert "\n" not in str(err.value)
    assert model_folder(str(tmp_path)) == str(tmp_path)  # a folder is taken as it is


@pytest.mark.slow
def test_registry_finds_visionzip_after_the_model_module_is_imported():
    """Importing the model module first (as a script using lmms-eval's Python API would) must not
    leave ``visionzip`` out of lmms-eval's registry, which loads entry points on its first import."""
    code = (
        "import visionzip_core.lmms_eval_model as m\n"
        "from lmms_eval.models import get_model\n"
        "assert get_model('visionzip') is m.VisionZipLMM\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
