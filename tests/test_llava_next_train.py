"""LLaVA-NeXT through the real entry points: data of many image sizes, every training mode, ZeRO-3
with two processes, exact resume, export -> load -> generate, the 4.x download layout, and stage 2
started from a stage-1 (LLaVA-1.5) export."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import warm_python
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from test_train_e2e import REPO, _cmd, _env, final_weights, metrics, train

D, K = 12, 4  # configs/demo.yaml's visionzip settings
SIZES = [(100, 300), (300, 90), (112, 112), (240, 230), (60, 500), (180, 120), (333, 111), (20, 20)]


@pytest.fixture(scope="module")
def next_data(tmp_path_factory):
    """A conversation file over pictures of many sizes and aspect ratios (every tiling), one
    multi-turn sample in five, one text-only sample."""
    out = tmp_path_factory.mktemp("next-data")
    (out / "images").mkdir()
    rng = random.Random(0)
    colours = ["red", "green", "blue", "yellow"]
    rows = []
    for i in range(24):
        h, w = SIZES[i % len(SIZES)]
        colour = colours[rng.randrange(4)]
        img = Image.new("RGB", (w, h), "white")
        ImageDraw.Draw(img).ellipse([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=colour)
        img.save(out / "images" / f"{i}.png")
        conv = [
            {"from": "human", "value": "What colour is the shape?\n<image>"},
            {"from": "gpt", "value": f"{colour} circle"},
        ]
        if i % 5 == 4:
            conv += [{"from": "human", "value": "Is it big?"}, {"from": "gpt", "value": "yes"}]
        rows.append({"id": f"s{i}", "image": f"{i}.png", "conversations": conv})
    rows.append(
        {
            "id": "text",
            "conversations": [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "yes"}],
        }
    )
    (out / "train.json").write_text(json.dumps(rows))
    return out


def _next(model_dir, out: Path, data: Path) -> list[str]:
    return [
        f"model.name_or_path={model_dir}",
        f"train.output_dir={out}",
        f"data.train=[{{path: {data}/train.json, image_folder: {data}/images}}]",
        "data.val=[]",
        "data.image_aspect_ratio=anyres",
        "train.per_device_batch_size=4",
        "train.max_steps=4",
        "train.save_steps=2",
        "train.eval_steps=null",
        "train.logging_steps=1",
        "data.num_workers=0",
        "wandb.enabled=false",
    ]


def _generate(final: Path, image: Path) -> str:
    proc = warm_python.run(
        [
            sys.executable,
            "scripts/generate.py",
            "--model",
            str(final),
            "--image",
            str(image),
            "--prompt",
            "What colour?",
        ],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_dataset_counts_each_image_from_its_own_size(tiny_llava_next_dir, next_data):
    """lengths[i] (grouping, truncation, model_max_length) == the ids of the item == the features."""
    from transformers import LlavaNextForConditionalGeneration

    from visionzip_core import visionzip
    from visionzip_core.data import build_dataset
    from visionzip_core.data.collate import DataCollator
    from visionzip_core.families import family_for
    from visionzip_core.training.config_loading import load_config
    from visionzip_core.training.model_spec import resolve_model_spec
    from visionzip_core.training.modeling import build_processor

    settings = load_config("configs/demo.yaml", _next(tiny_llava_next_dir, next_data / "unused", next_data))
    processor, count = build_processor(settings, resolve_model_spec(settings))
    assert count.per_size and count((112, 112)) == 3 * (D + K) and count((240, 230)) == 5 * (D + K)
    layout = family_for("llava-next").image_layout(processor.image_processor)
    ds = build_dataset(
        settings.data, "train", processor.tokenizer, processor.image_processor, count, image_layout=layout
    )
    model = visionzip(
        LlavaNextForConditionalGeneration.from_pretrained(tiny_llava_next_dir), dominant=D, contextual=K
    )
    image_id = model.config.image_token_id
    seen = set()
    for i in range(len(ds)):
        item = ds[i]
        assert abs(ds.lengths[i]) == len(item["input_ids"])
        if "pixel_values" not in item:
            continue
        size = tuple(item["image_sizes"][0].tolist())
        seen.add(size)
        assert int((item["input_ids"] == image_id).sum()) == count(size)
    assert len(seen) == len(SIZES)
    batch = DataCollator(processor.tokenizer.pad_token_id)([ds[i] for i in range(6)])
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"})  # counts == features, or it raises
    assert out.logits.shape[:2] == batch["input_ids"].shape


RESUME = ["train.max_steps=6", "train.save_steps=3", "debug.log_samples=true"]


@pytest.fixture(scope="module")
def next_run(tiny_llava_next_dir, next_data, tmp_path_factory):
    """``(out, proc)``: 6 finetune steps (one process), checkpoints at 3 and 6, samples logged; the
    export test reads it and the resume test compares against it. (The deepspeed launcher itself is
    test_train_e2e.py's; this run forks from the warm interpreter.)"""
    out = tmp_path_factory.mktemp("next-run") / "run"
    return out, train(_next(tiny_llava_next_dir, out, next_data) + RESUME)


def test_finetune_exports_a_next_model_that_loads_and_generates(tiny_llava_next_dir, next_data, next_run):
    out, proc = next_run
    records = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert records[0]["visual_tokens_per_image"] == f"{D + K} per crop"
    assert "visual tokens/image=16 per crop" in proc.stdout
    base, new = load_file(str(tiny_llava_next_dir / "model.safetensors")), final_weights(out)
    assert set(new) == set(base)
    assert all(torch.equal(base[k], new[k]) for k in base if "vision_tower" in k)
    assert torch.equal(base["image_newline"], new["image_newline"])  # unused by VisionZip: frozen
    llm = [k for k in base if "language_model" in k and "layers.0.mlp" in k]
    assert llm and not all(torch.equal(base[k], new[k]) for k in llm)
    config = json.loads((out / "final/config.json").read_text())
    assert (
        config["architectures"] == ["LlavaNextForConditionalGeneration"]
        and config["visionzip"]["dominant"] == D
    )
    said = _generate(out / "final", next_data / "images/0.png")  # 100 x 300: 1 x 3 tiles -> 4 crops
    assert f"visual tokens per image: {4 * (D + K)} of " in said and "generated:" in said


def test_projector_mode(tiny_llava_next_dir, next_data, tmp_path):
    out = tmp_path / "run"
    train(_next(tiny_llava_next_dir, out, next_data) + ["train.mode=projector"])
    base, new = load_file(str(tiny_llava_next_dir / "model.safetensors")), final_weights(out)
    projector = load_file(str(out / "final/projector.safetensors"))
    assert {k for k in projector if "multi_modal_projector" in k} and all(
        torch.equal(new[k], v) for k, v in projector.items()
    )
    changed = {k for k in base if not torch.equal(base[k], new[k])}
    assert changed and all("multi_modal_projector" in k for k in changed)


def test_lora_mode(tiny_llava_next_dir, next_data, tmp_path):
    out = tmp_path / "run"
    train(_next(tiny_llava_next_dir, out, next_data) + ["train.mode=lora", "lora.r=4", "optim.lr_llm=1e-2"])
    lora = load_file(str(out / "final/adapter/adapter_model.safetensors"))
    assert any("lora_A" in k for k in lora) and not any("vision_tower" in k and "lora" in k for k in lora)
    base, merged = load_file(str(tiny_llava_next_dir / "model.safetensors")), final_weights(out)
    assert set(merged) == set(base)
    q = next(k for k in base if "language_model" in k and "q_proj.weight" in k)
    assert not torch.equal(base[q], merged[q])
    assert all(torch.equal(base[k], merged[k]) for k in base if "vision_tower" in k)


def test_zero3_two_processes(tiny_llava_next_dir, next_data, tmp_path):
    """Ranks draw different crop counts (and the text-only sample) in the same step, in training
    and in validation (image and text-only samples split over the ranks)."""
    out = tmp_path / "run"
    rows = json.loads((next_data / "train.json").read_text())
    val = tmp_path / "val.json"
    val.write_text(json.dumps(rows[:3] + rows[-1:]))
    train(
        _next(tiny_llava_next_dir, out, next_data)
        + [
            "deepspeed.config=configs/deepspeed/zero3.json",
            "train.per_device_batch_size=2",
            f"data.val=[{{path: {val}, image_folder: {next_data}/images}}]",
            "train.eval_steps=4",
        ],
        launcher="ranks2",
    )
    assert any("val_loss" in r for r in metrics(out))
    base, new = load_file(str(tiny_llava_next_dir / "model.safetensors")), final_weights(out)
    assert set(new) == set(base) and all(new[k].shape == base[k].shape for k in base)


def test_resume_after_sigkill_matches_an_unbroken_run(tiny_llava_next_dir, next_data, next_run, tmp_path):
    """Killed and resumed; the unbroken run is the shared one (``next_run``)."""
    common = RESUME
    (unbroken, _), killed = next_run, tmp_path / "killed"
    cmd = _cmd(
        "python",
        _next(tiny_llava_next_dir, killed, next_data)
        + common
        + [f"debug.hold_until={tmp_path / 'never'}", "debug.hold_from_step=4"],
    )
    proc = warm_python.popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (killed / "checkpoint-3" / "COMPLETE").is_file():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists()
    resumed = train(_next(tiny_llava_next_dir, killed, next_data) + common)
    assert f"resumed from {killed}/checkpoint-3" in resumed.stdout
    a, b = final_weights(unbroken), final_weights(killed)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert (unbroken / "debug/samples-rank0.jsonl").read_text() == (
        killed / "debug/samples-rank0.jsonl"
    ).read_text()


def test_the_4x_next_folder_loads_to_its_own_weights_and_trains(llava_next_hf_4x_dir, next_data, tmp_path):
    from real_layouts import to_4x_key
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    saved = load_file(str(llava_next_hf_4x_dir / "model.safetensors"))
    assert "image_newline" in saved and any(k.startswith("language_model.model.") for k in saved)
    model, info = LlavaNextForConditionalGeneration.from_pretrained(
        llava_next_hf_4x_dir, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert all(torch.equal(saved[to_4x_key(k)], v) for k, v in model.state_dict().items())
    assert type(LlavaNextProcessor.from_pretrained(llava_next_hf_4x_dir).image_processor).__name__.startswith(
        "LlavaNext"
    )
    out = tmp_path / "run"
    train(_next(llava_next_hf_4x_dir, out, next_data) + ["data.template=vicuna_v1"])
    assert _generate(out / "final", next_data / "images/3.png").count("generated:") == 1


def test_stage2_starts_from_a_stage1_export(pretrain_run, next_data, tmp_path):
    """Stage 1 is LLaVA-1.5's (conftest.py's ``pretrain_run``); its export becomes a LLaVA-NeXT
    folder that stage 2 trains."""
    stage1 = pretrain_run
    init = tmp_path / "next-init"
    convert = [
        sys.executable,
        "scripts/next_from_stage1.py",
        "--stage1",
        str(stage1 / "final"),
        "--out",
        str(init),
    ]
    proc = warm_python.run(convert, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    src, dst = load_file(str(stage1 / "final/model.safetensors")), load_file(str(init / "model.safetensors"))
    assert set(dst) == set(src) | {"image_newline"} and all(torch.equal(src[k], dst[k]) for k in src)
    again = warm_python.run(convert, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "exists" in again.stderr
    out = tmp_path / "stage2"
    train(_next(init, out, next_data))
    assert json.loads((out / "final/config.json").read_text())["model_type"] == "llava_next"
