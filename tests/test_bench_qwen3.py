"""Qwen3-VL's and Qwen3.5's benchmark hooks: the FLOP model against torch's own count of a real step
on the quick sizes (DeepStack mergers; the hybrid LLM's gated attention and Gated DeltaNet scan),
the real sizes' shapes on meta and their one-line refusal on a CPU, and the scripts end to end."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import warm_python
from torch.utils.flop_counter import FlopCounterMode

from visionzip_core.bench.budgets import ImagePlan, image_plan
from visionzip_core.bench.random_models import build_random_model
from visionzip_core.bench.sizes import size_error
from visionzip_core.families import family_for
from visionzip_core.families.flops import LORA_TARGETS, TrainableParts
from visionzip_core.families.qwen3_bench import DELTA_CHUNK, delta_rule_flops

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("qwen3-vl", "qwen3.5")


def _counted_step(family, text: int, parts: TrainableParts):
    """A stock forward + backward of the family's quick size (224 px image, ``text`` tokens, eager
    attention), counted by ``FlopCounterMode``, and the FLOP model of the same step."""
    fam = family_for(family)
    size = replace(fam.bench_sizes["cpu"].quick(), text_tokens=(text, text), image=(224, 224))
    model = build_random_model(size, "cpu", family=family)
    model.set_attn_implementation("eager")
    for name, p in model.named_parameters():
        group = fam.module_group(name)
        p.requires_grad_(group == "projector" or (group == "llm" and parts.llm == "full"))
    if parts.llm == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=parts.lora_rank,
            lora_alpha=2 * parts.lora_rank,
            lora_dropout=0.0,
            target_modules=fam.lora_target_regex(parts.lora_targets),
            modules_to_save=fam.projector_modules(),
        )
        model = get_peft_model(model, lora)
    stock = fam.stock_tokens_per_image(model.config, size.image)
    plan = ImagePlan(*fam.token_plan(model.config, None, size.image))  # stock, at this image size
    batch = fam.bench_batch(size, model.config, plan)
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == stock == 49
    with FlopCounterMode(display=False) as forward:
        loss = model(**batch).loss
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    ours = fam.step_flops(
        size, model.config, parts, plan, None, samples=1, seq_len=batch["input_ids"].shape[1]
    )
    return model, (forward.get_total_flops(), backward.get_total_flops()), ours


@pytest.mark.parametrize("family", FAMILIES)
def test_step_flops_equal_a_counted_real_step(family):
    """Projector training (the mergers train, the tower is frozen, the LLM passes gradients): the
    analytic count equals torch's, forward and backward, to the FLOP. Qwen3-VL's count includes its
    DeepStack merger; Qwen3.5's a Gated DeltaNet layer over 2 chunks (91 tokens), whose triangular
    solves torch does not count and the model reports apart."""
    model, counted, ours = _counted_step(family, 40, TrainableParts())
    assert (ours["total"].forward, ours["total"].backward) == counted
    if family == "qwen3-vl":
        assert len(model.model.visual.deepstack_merger_list) == 1
        assert ours["solve"] == 0
    else:
        kinds = model.config.text_config.layer_types
        assert kinds == ["linear_attention", "full_attention"]
        assert ours["solve"] > 0


def test_qwen3_5_step_flops_with_lora_on_every_layer_kind():
    """LoRA on the family's targets (full attention's q/k/v/o, the Gated DeltaNet projections and the
    MLP), the mergers trained: the analytic count equals torch's to the FLOP, forward and backward
    (the frozen conv1d computes no weight gradient, so the quirk below does not arise)."""
    fam = family_for("qwen3.5")
    assert set(fam.lora_targets) - set(LORA_TARGETS)  # the DeltaNet projections are targets too
    parts = TrainableParts(llm="lora", lora_rank=4, lora_targets=fam.lora_targets)
    model, counted, ours = _counted_step("qwen3.5", 40, parts)
    names = [name.split(".") for name, _ in model.named_parameters() if ".lora_A." in name]
    wrapped = {parts_[parts_.index("lora_A") - 1] for parts_ in names}
    assert wrapped == set(fam.lora_targets)  # every target is a layer of the model, and only those
    assert (ours["total"].forward, ours["total"].backward) == counted
    frozen = fam.step_flops(
        replace(fam.bench_sizes["cpu"].quick(), image=(224, 224)),
        model.config,
        TrainableParts(),
        ImagePlan(*fam.token_plan(model.config, None, (224, 224))),
        None,
        samples=1,
        seq_len=91,
    )
    assert ours["total"].total > frozen["total"].total  # the adapters are counted


def test_qwen3_5_step_flops_with_the_llm_trained():
    """Full LLM training adds the weight gradients of every projection and of the DeltaNet's
    depthwise conv1d: equal to torch's count (151 tokens: 3 chunks of the scan) but for one known
    quirk of ``FlopCounterMode``: it counts a grouped convolution's weight gradient as if the
    convolution were dense, ``conv_dim`` (here 1024) times its real cost."""
    model, counted, ours = _counted_step("qwen3.5", 100, TrainableParts(llm="full"))
    t = model.config.text_config
    conv_dim = (
        2 * t.linear_num_key_heads * t.linear_key_head_dim
        + t.linear_num_value_heads * t.linear_value_head_dim
    )
    kernel, seq_len = t.linear_conv_kernel_dim, 151
    weight_grad = 2 * conv_dim * kernel * (seq_len + kernel - 1)  # one DeltaNet layer's real cost
    assert ours["total"].forward == counted[0]
    assert ours["total"].backward == counted[1] - (conv_dim - 1) * weight_grad


def test_delta_rule_cost_is_linear_in_length():
    """The Gated DeltaNet scan costs the same per chunk whatever the length (full attention's
    ``Q K^T`` grows with the square): 8 chunks cost 8 times one, forward."""
    one = delta_rule_flops(1, DELTA_CHUNK, 32, 128, 128, grad=False)["scan"].forward
    eight = delta_rule_flops(1, 8 * DELTA_CHUNK, 32, 128, 128, grad=False)["scan"].forward
    assert eight == 8 * one
    assert delta_rule_flops(1, DELTA_CHUNK + 1, 32, 128, 128, grad=False)["scan"].forward == 2 * one


def test_real_sizes_build_on_meta_and_are_refused_on_cpu():
    """Qwen3-VL-8B-Instruct and Qwen3.5-9B have the released configs' shapes (built on meta: 8.77B
    parameters, the count the Qwen3-VL-8B-Instruct download holds; 9.41B for Qwen3.5-9B without its
    multi-token-prediction head); the scripts refuse them on a CPU in one line."""
    vl = build_random_model(family_for("qwen3-vl").bench_sizes["qwen3-vl-8b"], "meta", family="qwen3-vl")
    v = vl.config.vision_config
    assert (v.depth, v.hidden_size, v.intermediate_size, v.num_heads, v.patch_size) == (
        27,
        1152,
        4304,
        16,
        16,
    )
    assert v.deepstack_visual_indexes == [8, 16, 24] and len(vl.model.visual.deepstack_merger_list) == 3
    t = vl.config.text_config
    assert (t.num_hidden_layers, t.hidden_size, t.num_attention_heads, t.num_key_value_heads) == (
        36,
        4096,
        32,
        8,
    )
    assert 8.76e9 < sum(p.numel() for p in vl.parameters()) < 8.78e9
    q35 = build_random_model(family_for("qwen3.5").bench_sizes["qwen3.5-9b"], "meta", family="qwen3.5")
    t = q35.config.text_config
    kinds = [
        type(layer.linear_attn if hasattr(layer, "linear_attn") else layer.self_attn).__name__
        for layer in q35.model.language_model.layers
    ]
    assert (
        kinds
        == ["Qwen3_5GatedDeltaNet"] * 3
        + ["Qwen3_5Attention"]
        + (["Qwen3_5GatedDeltaNet"] * 3 + ["Qwen3_5Attention"]) * 7
    )
    assert (t.linear_num_key_heads, t.linear_num_value_heads, t.head_dim, t.vocab_size) == (
        16,
        32,
        256,
        248320,
    )
    assert q35.model.language_model.layers[3].self_attn.q_proj.out_features == 2 * 16 * 256  # query + gate
    assert 9.40e9 < sum(p.numel() for p in q35.parameters()) < 9.42e9
    for family, model in (("qwen3-vl", vl), ("qwen3.5", q35)):
        assert [image_plan(model.config, family, k).llm for k in (100, 70, 50, 25)] == [196, 136, 97, 48]
    assert "GPU size" in size_error("qwen3-vl", "qwen3-vl-8b", "cpu")
    assert size_error("qwen3.5", "qwen3.5-9b", "cuda") is None
    assert "not a qwen3.5 size" in size_error("qwen3.5", "qwen3-vl-8b", "cpu")
    for family, size, script in (
        ("qwen3-vl", "qwen3-vl-8b", "bench_train.py"),
        ("qwen3.5", "qwen3.5-9b", "bench_prefill.py"),
    ):
        cmd = [
            sys.executable,
            str(ROOT / "scripts" / script),
            "--family",
            family,
            "--size",
            size,
            "--device",
            "cpu",
        ]
        done = warm_python.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and "is a GPU size" in done.stderr
        errors = [line for line in done.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and errors[0] == done.stderr.strip().splitlines()[-1]  # after the usage


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_bench_train_and_prefill_quick(family, tmp_path):
    """``--family qwen3-vl`` / ``qwen3.5`` through the real scripts: 448 px images (14 x 14 = 196
    merged tokens), 25 % = 0.20 + 0.05 = 39 + 9 = 48 tokens; the FLOP-ideal figure comes from the
    family's model (``flop_model``), not from a count on the step."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--quick", "--threads", "1", "--family", family, "--budgets", "100,25"]
    for script, extra in (("bench_train.py", ["--steps", "1"]), ("bench_prefill.py", ["--new-tokens", "2"])):
        out = tmp_path / script.replace(".py", ".json")
        cmd = [sys.executable, str(ROOT / "scripts" / script), *common, *extra, "--out", str(out)]
        warm_python.run(cmd, check=True, env=env, cwd=ROOT, timeout=600)
        stock, small = json.loads(out.read_text())
        assert (stock["image_tokens"], small["image_tokens"]) == (196, 48)
        length = "seq_len" if script == "bench_train.py" else "prompt_len"
        assert stock[length] - small[length] == 196 - 48
        assert (small.get("ideal_speedup") or small["ideal_prefill_speedup"]) > 1.2
    train = json.loads((tmp_path / "bench_train.json").read_text())
    assert train[1]["peak_above_resident_mb"] < train[0]["peak_above_resident_mb"]
