"""Qwen2.5-VL through the real entry point (train/finetune.py): every training mode on messages data
with images of different sizes, a video, a multi-turn and a text-only sample; exact resume; export
-> load_visionzip_model -> generate; the config errors that stop a run before any weights load.

Run: ``PYTHONPATH=$PWD .venv/bin/python -m pytest -m slow tests/test_qwen_train.py`` (a few minutes, CPU).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from kill_resume import _weights, kill_after_checkpoint_2_and_resume
from PIL import Image
from test_train_e2e import REPO, _env, metrics, train

pytestmark = pytest.mark.slow

RATIOS = ["visionzip.dominant_ratio=0.25", "visionzip.contextual_ratio=0.25"]


@pytest.fixture(scope="module")
def qwen_dir(family_dirs):
    return family_dirs["qwen2.5-vl"]  # 2 vision blocks, seed 0 (conftest.py)


def _picture(path: Path, h: int, w: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def qwen_data(tmp_path_factory):
    return write_qwen_data(tmp_path_factory.mktemp("qwen-data"))


def write_qwen_data(out: Path) -> Path:
    """Images of different sizes, one 4-frame video, one multi-turn and one text-only sample."""
    images = out / "images"
    images.mkdir()
    sizes = [(97, 143), (300, 61), (112, 112), (60, 200)]
    for i, (h, w) in enumerate(sizes):
        _picture(images / f"im{i}.png", h, w, i)
    for k in range(4):
        _picture(images / f"fr{k}.png", 70, 100, 10 + k)

    def ask(part, question, answer):
        return [
            {"role": "user", "content": [part, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]

    rows = [
        {"id": "im0", "messages": ask({"type": "image"}, "What is it?", "A red cat."), "images": ["im0.png"]},
        {"id": "im1", "messages": ask({"type": "image", "image": "im1.png"}, "Colour?", "Blue.")},
        {
            "id": "video",
            "messages": ask(
                {"type": "video", "video": [f"fr{k}.png" for k in range(4)]}, "What moves?", "A dog."
            ),
        },
        {
            "id": "multi",
            "messages": ask({"type": "image", "image": "im2.png"}, "Shape?", "A square.")
            + ask({"type": "image", "image": "im3.png"}, "And this?", "A line."),
        },
        {"id": "text", "messages": ask({"type": "text", "text": "Say"}, " hi.", "Hi.")},
        {"id": "im0b", "messages": ask({"type": "image"}, "Again?", "A red cat."), "images": ["im0.png"]},
    ]
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def _qwen(model_dir: Path, out: Path, data: Path, mode: str, steps: int = 3) -> list[str]:
    return [
        f"model.name_or_path={model_dir}",
        f"train.output_dir={out}",
        f"train.mode={mode}",
        f"data.train=[{{path: {data}/train.jsonl, image_folder: {data}/images}}]",
        "data.val=[]",
        "data.template=chat_template",
        "data.image_placement=keep",
        "data.image_aspect_ratio=native",
        "data.model_max_length=512",
        *RATIOS,
        "train.per_device_batch_size=2",
        f"train.max_steps={steps}",
        "train.save_steps=2",
        "train.eval_steps=null",
        "train.logging_steps=1",
        "data.num_workers=0",
        "wandb.enabled=false",
    ]


@pytest.fixture(scope="module")
def finetuned(qwen_dir, qwen_data, tmp_path_factory) -> Path:
    """A finished 4-step finetune run (checkpoints at 2 and 4), read by the finetune, export and
    resume tests: one run instead of three."""
    out = tmp_path_factory.mktemp("qwen-finetune") / "run"
    train(_qwen(qwen_dir, out, qwen_data, "finetune", steps=4))
    return out


def _changed(base: dict, new: dict, match) -> tuple[list[str], list[str]]:
    """``(changed, same)`` names among ``match``-ing keys. The 4.x download names keys ``visual.*``
    and ``model.*``; an export names them as transformers 5 saves them, so compare by suffix."""

    def tail(k: str) -> str:
        for head in ("model.language_model.", "model.visual.", "model.", "visual.", "language_model."):
            if k.startswith(head):
                return k[len(head) :]
        return k

    old = {("visual" if "visual." in k else "llm") + ":" + tail(k): v for k, v in base.items()}
    changed, same = [], []
    for k, v in new.items():
        key = ("visual" if "visual." in k else "llm") + ":" + tail(k)
        if key in old and match(k):
            (same if torch.equal(old[key], v) else changed).append(k)
    return changed, same


def _generate(final: Path, image: Path) -> tuple[int, torch.Tensor]:
    from visionzip_core import load_visionzip_model, load_visionzip_processor

    model = load_visionzip_model(str(final)).eval()
    processor = load_visionzip_processor(str(final))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.open(image).convert("RGB")], return_tensors="pt")
    n_image = int((inputs["input_ids"] == model.config.image_token_id).sum())
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    return n_image, out


def test_projector_mode_trains_the_merger_only(qwen_dir, qwen_data, tmp_path):
    out = tmp_path / "run"
    proc = train(_qwen(qwen_dir, out, qwen_data, "projector"))
    assert "dropped 1 text-only sample\n" in proc.stdout + proc.stderr
    records = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["visual_tokens_per_image"] == "0.25 + 0.25 of each image's tokens"
    base, new = _weights(qwen_dir), _weights(out / "final")
    changed, same = _changed(base, new, lambda k: True)
    assert changed and all("visual.merger" in k for k in changed), changed[:5]
    assert any("visual.merger" in k for k in changed)


def test_finetune_mode_trains_llm_and_merger_not_the_tower(qwen_dir, finetuned):
    out = finetuned
    base, new = _weights(qwen_dir), _weights(out / "final")
    changed, same = _changed(base, new, lambda k: True)
    assert any("visual.merger" in k for k in changed)
    assert any("layers.0.mlp" in k and "visual" not in k for k in changed)
    assert not any("visual.blocks" in k or "patch_embed" in k for k in changed)


def test_finetune_mode_with_the_tower(qwen_dir, qwen_data, tmp_path):
    out = tmp_path / "run"
    train(
        _qwen(qwen_dir, out, qwen_data, "finetune") + ["train.tune_vision_tower=true", "optim.lr_vision=1e-3"]
    )
    base, new = _weights(qwen_dir), _weights(out / "final")
    changed, _ = _changed(base, new, lambda k: True)
    assert any("visual.blocks.0." in k for k in changed)


def test_lora_mode_wraps_the_llm_only_and_trains_the_merger(qwen_dir, qwen_data, tmp_path):
    out = tmp_path / "run"
    train(_qwen(qwen_dir, out, qwen_data, "lora") + ["export.merge_lora=true"])
    adapter = tmp_path / "run" / "final"
    base, new = _weights(qwen_dir), _weights(adapter)
    changed, _ = _changed(base, new, lambda k: True)
    assert any("visual.merger" in k for k in changed)
    assert any("language_model" in k and "self_attn" in k for k in changed) or any(
        k.startswith("model.layers") and "self_attn" in k for k in changed
    )
    assert not any("visual.blocks" in k for k in changed), [k for k in changed if "visual.blocks" in k][:3]


def test_resume_continues_to_the_same_weights(qwen_dir, qwen_data, finetuned, tmp_path):
    straight, split = finetuned, tmp_path / "split"
    # killed with checkpoint-2 complete, rerun to the end: it must say it resumed from checkpoint-2
    args = _qwen(qwen_dir, split, qwen_data, "finetune", steps=4)
    kill_after_checkpoint_2_and_resume(args, split, tmp_path / "hold")
    a, b = _weights(straight / "final"), _weights(split / "final")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_export_reloads_with_visionzip_and_generates(qwen_data, finetuned):
    out = finetuned
    config = json.loads((out / "final/config.json").read_text())
    assert config["visionzip"]["dominant_ratio"] == 0.25
    # 97 x 143 px -> 84 x 140 resized -> 3 x 5 = 15 merged tokens -> int(3.75) = 3 dominant + 3 contextual
    n_image, _ = _generate(out / "final", qwen_data / "images/im0.png")
    assert n_image == 6


@pytest.mark.parametrize(
    "extra, words",
    [
        (["train.mode=pretrain"], "train.mode: pretrain is not supported for qwen2.5-vl"),
        (["data.packing=true"], "data.packing: not supported for qwen2.5-vl (M-RoPE positions per sample)"),
        (["data.image_aspect_ratio=crop"], "data.image_aspect_ratio: crop does not apply to qwen2.5-vl"),
        (["data.template=vicuna_v1"], "data.template: vicuna_v1 does not apply to qwen2.5-vl"),
    ],
)
def test_config_errors_stop_before_weights_load(qwen_dir, qwen_data, tmp_path, extra, words):
    overrides = _qwen(qwen_dir, tmp_path / "run", qwen_data, "finetune") + extra
    if "train.mode=pretrain" in extra:
        overrides += [f"model.vision_tower={qwen_dir}", f"model.language_model={qwen_dir}"]
    proc = train(overrides, expect=2)
    assert words in proc.stderr and "Loading weights" not in proc.stdout + proc.stderr


def test_ratio_keys_on_a_llava_model_are_one_config_error(tiny_llava_dir, qwen_data, tmp_path):
    overrides = _qwen(tiny_llava_dir, tmp_path / "run", qwen_data, "finetune")
    overrides = [o for o in overrides if not o.startswith("data.image_aspect_ratio")]
    proc = train(overrides, expect=2)
    assert "visionzip.dominant_ratio: only for qwen2.5-vl" in proc.stderr


def test_a_config_that_leaves_the_data_format_out_gets_the_familys(qwen_dir, qwen_data, tmp_path):
    """chat_template, keep and native are the Qwen family's defaults; LLaVA's stay LLaVA's."""
    from visionzip_core.training.config_loading import load_config

    config = tmp_path / "qwen.yaml"
    config.write_text(
        f"model: {{name_or_path: {qwen_dir}}}\n"
        f"data: {{train: [{{path: {qwen_data}/train.jsonl, image_folder: {qwen_data}/images}}]}}\n"
        f"train: {{mode: projector, output_dir: {tmp_path / 'out'}}}\n"
        "visionzip: {dominant_ratio: 0.25, contextual_ratio: 0.25}\n"
    )
    data = load_config(str(config), check_files=True).data
    assert (data.template, data.image_placement, data.image_aspect_ratio) == (
        "chat_template",
        "keep",
        "native",
    )
    given = load_config(str(config), ["data.image_aspect_ratio=pad"], check_files=True).data
    assert given.image_aspect_ratio == "pad" and given.template == "chat_template"


@pytest.mark.parametrize("name", ["projector", "lora"])
def test_the_shipped_qwen_configs_run_as_written(qwen_dir, qwen_data, tmp_path, name):
    """configs/qwen2.5-vl-7b/*.yaml, only paths and sizes overridden: the ratios, template,
    placement and aspect ratio are the config's own. The projector config goes through the deepspeed
    launcher as its header says; the LoRA one as ``python`` (warm: the launcher was shown once)."""
    import sys

    import warm_python

    out = tmp_path / "run"
    launcher = (
        [
            str(Path(sys.executable).parent / "deepspeed"),
            "--master_port",  # not the default 29500: another run on the machine may hold it
            str(warm_python.free_port()),
        ]
        if name == "projector"
        else [sys.executable]
    )
    cmd = [
        *launcher,
        "train/finetune.py",
        "--config",
        f"configs/qwen2.5-vl-7b/{name}.yaml",
        f"model.name_or_path={qwen_dir}",
        f"data.train=[{{path: {qwen_data}/train.jsonl, image_folder: {qwen_data}/images, format: messages}}]",
        f"train.output_dir={out}",
        "train.per_device_batch_size=2",
        "train.grad_accum_steps=1",
        "train.max_steps=2",
        "train.save_steps=2",
        "data.num_workers=0",
        "data.model_max_length=512",
        "wandb.enabled=false",
    ]
    proc = warm_python.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    config = json.loads((out / "final/config.json").read_text())
    assert config["visionzip"]["dominant_ratio"] == 0.45 and config["visionzip"]["contextual_ratio"] == 0.05
    records = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["loss"]) for r in records)
