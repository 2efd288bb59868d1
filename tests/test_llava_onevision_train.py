"""LLaVA-OneVision through the real entry point: finetune (vision tower included) and LoRA on the tiny
folder laid out as the download, exported, reloaded with ``load_visionzip_model`` and asked. Projector
mode, scoring and the other commands run in tests/test_command_matrix.py."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file
from test_command_matrix import family_overrides, write_matrix_data
from test_train_e2e import REPO, _cmd, _env, final_weights

from visionzip_core import load_visionzip_model, load_visionzip_processor
from visionzip_core.families import family_for

pytestmark = pytest.mark.slow

MODES = {
    "finetune": ["train.mode=finetune", "train.tune_vision_tower=true", "optim.lr_vision=1e-3"],
    "lora": ["train.mode=lora", "lora.r=4", "optim.lr_llm=1e-2"],
}


@pytest.fixture(scope="module")
def runs(tiny_llava_onevision_dir, tmp_path_factory):
    """Both modes side by side (most of a tiny run is the interpreter's start): ``{mode: run folder}``."""
    root = tmp_path_factory.mktemp("onevision-train")
    (root / "data").mkdir()
    data = write_matrix_data(root / "data")
    started = {}
    for mode, extra in MODES.items():
        overrides = family_overrides("llava-onevision", tiny_llava_onevision_dir, data, root / mode)
        overrides = [o for o in overrides if not o.startswith(("train.mode=", "eval.", "data.val="))]
        overrides += ["data.val=[]", *extra]
        started[mode] = subprocess.Popen(
            _cmd("python", overrides),
            cwd=REPO,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    out = {}
    for mode, proc in started.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{mode}: exit {proc.returncode}\n{stdout[-2000:]}\n{stderr[-4000:]}"
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
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 2


def test_finetune_trains_llm_projector_and_tower_and_the_export_reloads(runs, tiny_llava_onevision_dir):
    # The export keeps the names of the folder it started from (transformers saves the 4.x layout back).
    base, new = _base(tiny_llava_onevision_dir), final_weights(runs["finetune"])
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
