"""LLaVA-OneVision through the real entry point: finetune (vision tower included) under 2-process
ZeRO-3 and LoRA under 2-process ZeRO-2, on data mixing text-only, image and video samples, on the tiny
folder laid out as the download, exported, reloaded with ``load_visionzip_model`` and asked; each
mode (projector, finetune with the tower, lora) resumed after kill -9 to an unbroken run's weights
(tests/kill_resume.py). Scoring (a video too) and the other commands
run in tests/test_command_matrix.py."""

from __future__ import annotations

import json
import re

import pytest
import torch
from kill_resume import SAVE_STEPS, STEPS, assert_same_run, unbroken_and_resumed
from safetensors.torch import load_file
from test_command_matrix import family_overrides, write_matrix_data
from test_train_e2e import final_weights, train

from visionzip_core import load_visionzip_model, load_visionzip_processor
from visionzip_core.families import family_for

pytestmark = pytest.mark.slow

MODES = {
    "finetune": [
        "train.mode=finetune",
        "train.tune_vision_tower=true",
        "optim.lr_vision=1e-3",
        "deepspeed.config=configs/deepspeed/zero3.json",
    ],
    "lora": [
        "train.mode=lora",
        "lora.r=4",
        "optim.lr_llm=1e-2",
        "deepspeed.config=configs/deepspeed/zero2.json",
    ],
}
MIXED_KEYS = ("train.per_device_batch_size=", "train.max_steps=", "train.save_steps=")
# One sample per rank and step, in file order: the two ranks draw different kinds (image, video, text).
MIXED = [
    "train.per_device_batch_size=1",
    "train.max_steps=3",
    "train.save_steps=3",
    "data.group_by_length=false",
]


@pytest.fixture(scope="module")
def runs(tiny_llava_onevision_dir, tmp_path_factory):
    """Both modes, two processes each (``ranks2``: torchrun's workers, forked warm): ``{mode: run folder}``."""
    root = tmp_path_factory.mktemp("onevision-train")
    (root / "data").mkdir()
    data = write_matrix_data(root / "data")
    out = {}
    for mode, extra in MODES.items():
        overrides = family_overrides("llava-onevision", tiny_llava_onevision_dir, data, root / mode)
        overrides = [
            o for o in overrides if not o.startswith(("train.mode=", "eval.", "data.val=", *MIXED_KEYS))
        ]
        overrides += ["data.val=[]", *MIXED, "debug.log_samples=true", *extra]
        train(overrides, launcher="ranks2")
        out[mode] = root / mode
    return out


def _base(folder) -> dict[str, torch.Tensor]:
    """The download's weights under their 4.x names."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    weights = {}
    for shard in sorted(set(index.values())):
        weights.update(load_file(str(folder / shard)))
    return weights


def _asks(final) -> None:
    model = load_visionzip_model(final).eval()
    processor = load_visionzip_processor(final)
    family = family_for(model)
    from PIL import Image

    image = Image.new("RGB", (100, 60), "red")
    batch = processor(images=[image], text=[family.prompt(processor, "What is it?", 1)], return_tensors="pt")
    crops = family.token_plan(model.config, None, (60, 100))[0]
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == crops * (12 + 4)
    video = processor(
        videos=[[image, image]], text=[family.prompt(processor, "What moves?", 0, 1)], return_tensors="pt"
    )
    assert int((video["input_ids"] == model.config.video_token_id).sum()) == 2 * (12 + 4) + 1
    with torch.no_grad():
        for inputs in (batch, video):
            out = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
            assert out.shape[1] == inputs["input_ids"].shape[1] + 2


@pytest.mark.parametrize("mode", list(MODES))
def test_the_two_ranks_drew_different_kinds_in_one_step(runs, mode):
    """The case the mixed data is there for: in some step one rank held a video and the other an
    image or text (the trainer's forward keeps both ranks' module calls in step)."""
    rows = [
        json.loads(line)
        for line in (runs[mode].parent / "data/messages_train.jsonl").read_text().splitlines()
    ]

    def kind(sample: int) -> str:
        parts = [
            p["type"]
            for m in rows[sample]["messages"]
            if isinstance(m["content"], list)
            for p in m["content"]
        ]
        return "video" if "video" in parts else "image" if "image" in parts else "text"

    ranks = [
        [
            json.loads(line)["samples"]
            for line in (runs[mode] / f"debug/samples-rank{r}.jsonl").read_text().splitlines()
        ]
        for r in (0, 1)
    ]
    steps = [({kind(s) for s in a}, {kind(s) for s in b}) for a, b in zip(*ranks)]
    assert len(steps) == 3 and any("video" in a ^ b for a, b in steps), steps


def test_finetune_trains_llm_projector_and_tower_and_the_export_reloads(runs, tiny_llava_onevision_dir):
    # The export keeps the 4.x names of the folder it started from, but for the SigLIP tower: ZeRO-3's
    # gathered weights are saved from a fresh model, which writes the tower under transformers 5's names
    # (``vision_tower.encoder...``, without ``vision_model.``); both load.
    base, new = _base(tiny_llava_onevision_dir), final_weights(runs["finetune"])
    new = {
        re.sub(r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model.", k): v
        for k, v in new.items()
    }
    assert set(new) == set(base)
    changed = {k for k in base if not torch.equal(base[k], new[k])}
    assert any("language_model" in k for k in changed) and any("multi_modal_projector" in k for k in changed)
    assert any("vision_tower" in k and "layers.0." in k for k in changed)
    assert "image_newline" not in changed  # unused by the compressed tiled layout: frozen
    assert not any("post_layernorm" in k for k in changed)  # after the feature layer: frozen
    config = json.loads((runs["finetune"] / "final/config.json").read_text())
    assert config["visionzip"]["dominant"] == 12 and config["visionzip"]["feature_layer"] == -1
    _asks(runs["finetune"] / "final")


def test_lora_trains_the_llm_only_and_the_merged_export_reloads(runs, tiny_llava_onevision_dir):
    lora = load_file(str(runs["lora"] / "final/adapter/adapter_model.safetensors"))
    assert any("lora_A" in k for k in lora) and not any("vision_tower" in k and "lora" in k for k in lora)
    base, merged = _base(tiny_llava_onevision_dir), final_weights(runs["lora"])
    q = next(k for k in base if "language_model" in k and "q_proj.weight" in k)
    assert not torch.equal(base[q], merged[q])
    assert all(torch.equal(base[k], merged[k]) for k in base if "vision_tower" in k)
    _asks(runs["lora"] / "final")


@pytest.mark.parametrize("mode", ["projector", *MODES])
def test_resume_after_kill_9_continues_to_the_unbroken_runs_weights(tiny_llava_onevision_dir, tmp_path, mode):
    """Each mode in one process (finetune with the tower, as ``MODES`` has it; the ZeRO stage left to
    the config's default): 4 steps on the 7 mixed samples (the text-only one left out: 3 steps an
    epoch), checkpoints at 2 and 4; the unbroken run, then the one killed after step 3."""
    data = write_matrix_data(tmp_path)
    extra = [o for o in MODES.get(mode, ["train.mode=projector"]) if not o.startswith("deepspeed.")]

    def overrides(out):
        keep = ("train.mode=", "eval.", "data.val=", "train.max_steps=", "train.save_steps=")
        given = family_overrides("llava-onevision", tiny_llava_onevision_dir, data, out)
        return [o for o in given if not o.startswith(keep)] + [
            *extra,
            "data.val=[]",
            "eval.generate_accuracy=false",
            f"train.max_steps={STEPS}",
            f"train.save_steps={SAVE_STEPS}",
            "debug.log_samples=true",
        ]

    unbroken, out = unbroken_and_resumed(overrides, tmp_path)
    assert_same_run(unbroken, out, ("final", "final/adapter") if mode == "lora" else ("final",))
    base, new = _base(tiny_llava_onevision_dir), final_weights(out)
    assert set(new) == set(base)
    changed = {k for k in base if not torch.equal(base[k], new[k])}
    # what the mode trains, so each case resumes what it claims to (lora: the projector in full too)
    assert any("multi_modal_projector" in k for k in changed)
    assert any("language_model" in k for k in changed) == (mode != "projector")
    assert any("vision_tower" in k for k in changed) == (mode == "finetune")
