"""Model building for training: what each mode trains actually receives gradients.

pytest tests/test_train_modeling.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from visionzip_core.training.config_loading import load_config
from visionzip_core.training.model_spec import resolve_model_spec
from visionzip_core.training.modeling import build_model, build_processor

REPO = Path(__file__).resolve().parents[1]


def _one_step_grads(settings):
    spec = resolve_model_spec(settings)
    processor, _ = build_processor(settings, spec)
    model = build_model(settings, spec, torch.float32, processor).train()
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


ZERO3_LOAD = """
import json
import sys
from visionzip_core.training import distributed as dist
dist.set_env_defaults()
dist.init()
import torch
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from visionzip_core.training.deepspeed_config import fill_deepspeed_config, partitioned_loading
from visionzip_core.training.model_spec import resolve_model_spec
from visionzip_core.training.modeling import build_model, build_processor
from visionzip_core.training.config_loading import load_config

settings = load_config(sys.argv[1], sys.argv[2:])
spec = resolve_model_spec(settings)
cfg = fill_deepspeed_config(settings, 1, "fp32", spec.llm_hidden_size)
processor, _ = build_processor(settings, spec)
with partitioned_loading(cfg):
    assert is_deepspeed_zero3_enabled()
    model = build_model(settings, spec, torch.float32, processor)
assert not is_deepspeed_zero3_enabled(), "the global switch leaked out of model building"
params = list(model.parameters())
id_to_name = {id(p): n for n, p in model.named_parameters()}
assert all(hasattr(p, "ds_id") for p in params), "weights were not loaded into ZeRO-3 partitions"
assert sum(p.numel() for p in params) == 0 and sum(p.ds_numel for p in params) > 0
print("partitioned", sum(p.ds_numel for p in params))
# Weight decay is decided from each parameter's real shape, not from its 1-D shard.
from visionzip_core.training.modeling import param_groups
groups, names = param_groups(model, settings)
print("groups", json.dumps({n: sorted(id_to_name[id(p)] for p in g["params"]) for n, g in zip(names, groups)}))
dist.shutdown()
"""


@pytest.mark.parametrize("mode", ["finetune", "projector"])
def test_zero3_loads_weights_into_partitions_and_scopes_the_switch(tiny_llava_dir, mode):
    """Also: the optimizer groups (decay / no decay) of the partitioned model are those of the whole
    model; with the shards' 1-D shapes every weight fell into no-decay and ZeRO-3 trained without it."""
    import json
    import os
    import subprocess
    import sys

    from visionzip_core.training.modeling import param_groups

    overrides = [
        f"model.name_or_path={tiny_llava_dir}",
        "deepspeed.config=configs/deepspeed/zero3.json",
        f"train.mode={mode}",
        "optim.weight_decay=0.1",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run(
        [sys.executable, "-c", ZERO3_LOAD, str(REPO / "configs/demo.yaml"), *overrides],
        cwd=REPO,
        env=env | {"OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and "partitioned" in done.stdout, done.stderr[-3000:]
    partitioned = json.loads(done.stdout.split("groups ", 1)[1].splitlines()[0])
    settings = load_config(REPO / "configs/demo.yaml", overrides)
    spec = resolve_model_spec(settings)
    processor, _ = build_processor(settings, spec)
    whole = build_model(settings, spec, torch.float32, processor)
    groups, names = param_groups(whole, settings)
    id_to_name = {id(p): n for n, p in whole.named_parameters()}
    expected = {n: sorted(id_to_name[id(p)] for p in g["params"]) for n, g in zip(names, groups)}
    assert any(not n.endswith("/no_decay") for n in expected), expected.keys()
    assert partitioned == expected


def test_a_split_larger_than_the_tower_is_a_config_error_before_weights_load(tiny_llava_dir):
    from visionzip_core.training.schema import ConfigError

    settings = load_config(
        REPO / "configs/demo.yaml",
        [f"model.name_or_path={tiny_llava_dir}", "visionzip.dominant=60", "visionzip.contextual=10"],
    )
    with pytest.raises(ConfigError, match=r"visionzip: dominant \+ contextual = 70 exceeds the 65 tokens"):
        build_processor(settings, resolve_model_spec(settings))


@pytest.mark.parametrize("mode", ["projector", "lora"])
def test_checkpointing_runs_no_backward_through_the_frozen_tower(tiny_llava_dir, mode):
    """transformers and peft hook every input embedding (the tower's patch embedding too) to
    require grad; with a frozen tower that would run its whole backward for nothing."""
    settings = load_config(
        REPO / "configs/demo.yaml",
        [f"model.name_or_path={tiny_llava_dir}", f"train.mode={mode}", "train.gradient_checkpointing=true"],
    )
    spec = resolve_model_spec(settings)
    processor, _ = build_processor(settings, spec)
    model = build_model(settings, spec, torch.float32, processor).train()
    projector = next(m for n, m in model.named_modules() if n.endswith("multi_modal_projector"))
    seen = []
    projector.register_forward_hook(lambda mod, args, out: seen.append(args[0].requires_grad) or None)
    image = Image.new("RGB", (120, 90), (200, 20, 20))
    batch = processor(
        images=[image], text=["USER: <image>\nWhat colour? ASSISTANT: red"], return_tensors="pt"
    )
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert seen == [False]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)


@pytest.mark.parametrize("merge", [True, False])
def test_zero3_lora_export_writes_the_gathered_weights_without_rebuilding_the_model(
    tiny_llava_dir, tmp_path, merge
):
    """Under ZeRO-3 rank 0 holds only the gathered state dict; the export wraps a meta-device model in
    the trained adapter's config and takes those tensors. It must write what saving the trained
    (whole) model itself writes: the same adapter files and, merged, the same weights."""
    from copy import deepcopy

    from safetensors.torch import load_file

    from visionzip_core.training.export import check_gathered, shell_with, write_model

    settings = load_config(
        REPO / "configs/demo.yaml",
        [f"model.name_or_path={tiny_llava_dir}", "train.mode=lora", "lora.r=4", "lora.alpha=8"],
    )
    spec = resolve_model_spec(settings)
    processor, _ = build_processor(settings, spec)
    model = build_model(settings, spec, torch.float32, processor)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # as after training: B != 0 and a changed projector
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    check_gathered(model, state)
    shell = shell_with(model, state)
    assert all(p.device.type == "cpu" for p in shell.parameters())
    ours, reference = tmp_path / "shell", tmp_path / "reference"
    write_model(shell, "lora", merge, ours)
    write_model(deepcopy(model), "lora", merge, reference)
    for rel in ["adapter/adapter_model.safetensors"] + (["model.safetensors"] if merge else []):
        a, b = load_file(str(ours / rel)), load_file(str(reference / rel))
        assert set(a) == set(b), rel
        assert all(torch.equal(a[k], b[k]) for k in a), rel
    if merge:
        assert json_of(ours / "config.json") == json_of(reference / "config.json")


def json_of(path):
    import json

    return json.loads(path.read_text())
