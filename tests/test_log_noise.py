"""The log is quiet by default: library warnings a user cannot act on are filtered where they come
from (and only those), ``data.num_workers`` is capped at the CPUs with one line saying so, and the
trainer's own lines read right (sizes say which side is which, counts agree with their nouns).

    pytest tests/test_log_noise.py -m "not slow"   # seconds
    pytest tests/test_log_noise.py                 # + one short training run, piped
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import warm_python
from PIL import Image

from visionzip_core.data import DataSettings, build_dataset
from visionzip_core.families.llava import clip_image_processor
from visionzip_core.testing.tokenizers import build_tiny_tokenizer
from visionzip_core.training.dataloaders import available_cpus, build_val_loader, workers_note

REPO = Path(__file__).resolve().parents[1]


def test_num_workers_is_capped_at_the_cpus_with_one_line():
    cpus = available_cpus()
    settings = DataSettings(train=[{"path": "x.json"}], num_workers=cpus + 3)
    loader = build_val_loader(list(range(4)), settings, 2, rank=0, world=1, pad_token_id=0)
    assert loader.num_workers == cpus  # torch warns ("suggested max number of worker") above it
    note = workers_note(cpus + 3)
    assert (
        note
        == f"data.num_workers: {cpus + 3} capped at {cpus}, the {cpus} CPU{'s' if cpus != 1 else ''} available"
    )
    assert workers_note(cpus) is None and workers_note(0) is None


def test_one_dropped_text_only_sample_is_singular(tmp_path, caplog):
    (tmp_path / "a.png").parent.mkdir(exist_ok=True)
    Image.new("RGB", (40, 30), "red").save(tmp_path / "a.png")
    turn = [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]
    rows = [
        {
            "id": "img",
            "image": "a.png",
            "conversations": [{"from": "human", "value": "<image>\nWhat?"}, turn[1]],
        },
        {"id": "text", "conversations": turn},
    ]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    settings = DataSettings(
        train=[{"path": str(tmp_path / "train.json"), "image_folder": str(tmp_path)}],
        cache_dir=str(tmp_path / "c"),
    )
    with caplog.at_level(logging.WARNING):
        build_dataset(
            settings, "train", build_tiny_tokenizer(), clip_image_processor(112), 6, images_only=True
        )
    assert "data.train: dropped 1 text-only sample" in caplog.text
    assert "1 text-only samples" not in caplog.text


def test_report_puts_a_space_after_every_label(capsys):
    from visionzip_core.training import recipe

    run = SimpleNamespace(
        history={"loss": [2.0, 1.0]},
        state=SimpleNamespace(step=2, total_steps=2),
        metrics=SimpleNamespace(path="/run/metrics.jsonl"),
        tracker=None,
    )
    paths = {"model": Path("/run/final"), "projector": Path("/run/final/projector.safetensors")}
    recipe.report(run, paths, 1.0)
    out = capsys.readouterr().out + capsys.readouterr().err
    assert "projector: /run/final/projector.safetensors" in out, out
    assert "model:   " in out  # the short labels stay aligned with metrics:


@pytest.mark.slow  # a subprocess with a gloo process group
def test_the_zero_collective_deprecation_is_filtered_and_nothing_else():
    """torch's FutureWarning for all_gather_into_tensor (DeepSpeed's ZeRO calls it every step, once
    per rank in the log) is gone after the trainer's filter; another FutureWarning still shows."""
    code = """
import os, warnings
import torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
dist.init_process_group("gloo", rank=0, world_size=1)
from visionzip_core.training.library_warnings import ignore_zero_collective_deprecation
def gather(filtered):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        if filtered:
            ignore_zero_collective_deprecation()
        dist.all_gather_into_tensor(torch.zeros(2), torch.ones(2))
        warnings.warn("another", FutureWarning)
    return sorted(str(w.message)[:60] for w in seen)
print(gather(False))
print(gather(True))
dist.destroy_process_group()
"""
    env = {**os.environ, "PORT": str(warm_python.free_port()), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    before, after = proc.stdout.splitlines()[-2:]
    assert "all_gather_into_tensor" in before, "the warning this filter is for is no longer raised"
    assert "all_gather_into_tensor" not in after and "another" in after, after


def test_peft_wrapping_has_no_gradient_checkpointing_future_warning(tiny_llava_dir, recwarn):
    import warnings

    from visionzip_core.families import family_for
    from visionzip_core.training.modeling import wrap_lora
    from visionzip_core.training.schema import LoraSettings

    warnings.simplefilter("always")
    model = family_for("llava").load(str(tiny_llava_dir))
    model.gradient_checkpointing_enable()
    wrap_lora(model, SimpleNamespace(lora_or_default=LoraSettings(r=2, alpha=4)))
    messages = [str(w.message) for w in recwarn.list]
    assert not [m for m in messages if "is_gradient_checkpointing" in m], messages


@pytest.mark.slow
def test_a_short_piped_run_is_free_of_library_noise(tiny_llava_dir, tmp_path):
    """lora mode (peft wraps the model), gradient checkpointing and more workers than CPUs, output
    piped as under CI: one line about the workers, no progress bars, no warnings a user can't act on."""
    overrides = [
        f"model.name_or_path={tiny_llava_dir}",
        f"train.output_dir={tmp_path / 'run'}",
        "train.mode=lora",
        "lora.r=2",
        "lora.alpha=4",
        "train.per_device_batch_size=4",
        "train.max_steps=1",
        "train.eval_steps=null",
        "train.gradient_checkpointing=true",
        f"data.num_workers={available_cpus() + 2}",
        "data.val=[]",
        "wandb.enabled=false",
        "export.enabled=false",
        "eval.generate_accuracy=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled"}
    env.pop("RANK", None)
    proc = subprocess.run(
        [sys.executable, "train/finetune.py", "--config", "configs/demo.yaml", *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert log.count("data.num_workers: ") == 1 and "capped at" in log, log
    for noise in (
        "suggested max number of worker",
        "is_gradient_checkpointing",
        "Loading weights",
        "FutureWarning",
    ):
        assert noise not in log, f"{noise!r} in the log:\n{log[-3000:]}"


def test_building_a_builtin_model_into_a_piped_log_draws_no_progress_bar(tmp_path):
    """The first run builds ``builtin:*`` into the cache; its "Writing model shards" bar is one
    carriage-return line of noise in a log file."""
    code = "from visionzip_core.model_names import resolve_model_path; print(resolve_model_path('builtin:tiny-llm'))"
    env = {**os.environ, "VISIONZIP_CACHE": str(tmp_path), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "builtin" / "tiny-llm" / "config.json").is_file()
    assert "Writing model shards" not in proc.stdout + proc.stderr, proc.stderr[-2000:]
