"""Model building for training: what each mode trains actually receives gradients.

pytest tests/test_train_modeling.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from visionzip_core.training.modeling import build_model, build_processor
from visionzip_core.training.settings import load_config

REPO = Path(__file__).resolve().parents[1]


def _one_step_grads(settings):
    processor, _ = build_processor(settings)
    model = build_model(settings, torch.float32, processor).model.train()
    images = [Image.new("RGB", (120, 90), c) for c in ((200, 20, 20), (20, 20, 200))]
    prompts = ["USER: <image>\nWhat colour? ASSISTANT: red", "USER: <image>\nWhat colour? ASSISTANT: blue"]
    batch = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    return model


@pytest.mark.parametrize("visionzip_enabled", [True, False])
def test_finetune_with_vision_tower_every_trainable_parameter_gets_a_gradient(
    tiny_llava_dir, visionzip_enabled
):
    settings = load_config(
        REPO / "configs/demo.yaml",
        [
            f"model.name_or_path={tiny_llava_dir}",
            "train.tune_vision_tower=true",
            f"visionzip.enabled={str(visionzip_enabled).lower()}",
        ],
    )
    model = _one_step_grads(settings)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # Layers after the feature layer (-2 of 3: layer 2) and post_layernorm feed nothing the LLM sees.
    assert any("vision_tower.encoder.layers.0." in n for n in trainable)
    assert not any("encoder.layers.2." in n or "post_layernorm" in n for n in trainable)
    missing = [n for n, p in trainable.items() if p.grad is None]
    assert not missing, missing[:5]


def test_projector_mode_trains_the_projector_only(tiny_llava_dir):
    settings = load_config(
        REPO / "configs/demo.yaml", [f"model.name_or_path={tiny_llava_dir}", "train.mode=projector"]
    )
    model = _one_step_grads(settings)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("multi_modal_projector" in n for n in trainable)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
