"""QLoRA: the LLM loaded in 4-bit by bitsandbytes, LoRA (or the projector) trained on top.

    pytest tests/test_qlora.py                  # config checks, seconds
    pytest -m slow tests/test_qlora.py          # two processes under ZeRO-2, ~1 minute on 2 cores

bitsandbytes is the optional ``[qlora]`` extra (``scripts/setup.sh`` installs it); the end-to-end
test is skipped where it is missing.
"""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import torch
from test_train_e2e import DEMO_VAL, REPO, _base, metrics, train

from visionzip_core.training.config_loading import load_config
from visionzip_core.training.schema import ConfigError


def _load(*overrides):
    return load_config(REPO / "configs/demo.yaml", list(overrides))


def test_quantization_is_refused_where_it_cannot_work(monkeypatch):
    with pytest.raises(ConfigError) as info:
        _load(
            "train.mode=finetune", "model.quantization=nf4", "deepspeed.config=configs/deepspeed/zero3.json"
        )
    text = str(info.value)
    assert "model.quantization: nf4 trains nothing of the quantized LLM; use train.mode=lora" in text
    assert (
        "model.quantization: nf4 weights cannot be partitioned by ZeRO-3; use deepspeed.config=configs/deepspeed/zero2.json"
        in text
    )

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a)
    )
    with pytest.raises(ConfigError, match=r"needs bitsandbytes: pip install 'visionzip-core\[qlora\]'"):
        _load("train.mode=lora", "model.quantization=fp4")
    with pytest.raises(ConfigError, match="model.quantization"):
        _load("train.mode=lora", "model.quantization=int4")


def test_the_unquantized_modules_are_everything_outside_the_language_model():
    from transformers.quantizers.quantizers_utils import should_convert_module

    from visionzip_core.families import FAMILIES

    for family in FAMILIES:
        skip = family.unquantized_modules()
        assert should_convert_module("model.language_model.layers.0.self_attn.q_proj", skip)
        for other in (
            "model.vision_tower.encoder.layers.0.self_attn.q_proj",
            "model.multi_modal_projector.linear_1",
            "model.visual.merger.mlp.0",
            "model.visual.blocks.0.attn.qkv",
            "lm_head",
        ):
            assert not should_convert_module(other, skip), other


@pytest.mark.slow
def test_qlora_demo_trains_under_zero2_and_its_export_evaluates(tiny_llava_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "run"
    args = _base(tiny_llava_dir, out) + [
        "train.mode=lora",
        "model.quantization=nf4",
        "train.per_device_batch_size=2",
        "train.max_steps=8",
        "train.save_steps=8",
        "export.merge_lora=true",
        "deepspeed.config=configs/deepspeed/zero2.json",
        # the merged export is loaded again and scored on 4 val samples after the run (in the
        # same process: no second interpreter start for scripts/evaluate.py)
        *DEMO_VAL,  # the demo's validation set, scored
        "eval.limit=4",
    ]
    proc = train(args, launcher="ranks2")
    assert "the LLM is loaded in 4-bit (NF4)" in proc.stdout and "zero=2 processes=2" in proc.stdout
    losses = [r["loss"] for r in metrics(out) if "loss" in r]
    assert len(losses) == 8 and sum(losses[-3:]) < sum(losses[:3])  # it learns

    final = out / "final"
    assert (final / "adapter/adapter_model.safetensors").is_file()
    config = json.loads((final / "config.json").read_text())
    assert "quantization_config" not in config  # merged in the base's dtype, loads without bitsandbytes
    from safetensors.torch import load_file

    merged, base = (
        load_file(str(final / "model.safetensors")),
        load_file(str(tiny_llava_dir / "model.safetensors")),
    )
    assert set(merged) == set(base) and all(merged[k].dtype == base[k].dtype for k in base)
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    q = q if q in base else next(k for k in base if "language_model" in k and "q_proj.weight" in k)
    assert not torch.equal(merged[q], base[q])  # the LoRA update is merged in
    tower = next(k for k in base if "vision_tower" in k and k.endswith("q_proj.weight"))
    assert torch.equal(merged[tower], base[tower])  # the tower was never quantized nor trained

    assert re.search(r"answers: \d\.\d{3} \(\d/4 first replies exact", proc.stdout), proc.stdout[-2000:]


def test_memory_simulation_counts_the_quantized_llm_linears(tiny_llava_dir):
    from transformers import LlavaForConditionalGeneration

    from visionzip_core.bench.memory_sim import QUANTIZED_BYTES_PER_PARAM, parameter_counts, zero_model_states

    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir)
    for name, p in model.named_parameters():
        p.requires_grad_("multi_modal_projector" in name)
    counts = parameter_counts(model)
    linears = sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith("model.language_model.")
    )
    assert counts.quantizable == linears > 0
    plain = zero_model_states(counts, 2, 1)
    nf4 = zero_model_states(counts, 2, 1, quantization="nf4")
    b = counts.bytes_per_param
    assert plain.params - nf4.params == pytest.approx(linears * (b - QUANTIZED_BYTES_PER_PARAM["nf4"]), abs=1)
    assert (nf4.grads, nf4.optimizer) == (plain.grads, plain.optimizer)  # only the frozen weights shrink
    with pytest.raises(ValueError, match="ZeRO-3"):
        zero_model_states(counts, 3, 8, quantization="nf4")
