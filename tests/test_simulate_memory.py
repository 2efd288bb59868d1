"""The meta-device memory simulation (``visionzip_core.bench.memory_sim``, ``scripts/simulate_memory.py``).

The simulation is only worth its numbers if a step on meta tensors tracks exactly the storages a
real step allocates; these tests run both on a tiny model and compare, then check the ZeRO
arithmetic and the command line. Fast tier: about 15 s in all on 2 CPU cores.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from visionzip_core.bench.memory_sim import (
    TINY_BUDGETS,
    TINY_SIZE,
    Workload,
    build_training_model,
    calibrate,
    optimizer_step_transient,
    parameter_counts,
    simulate,
    simulation_batch,
    workload,
    zero_model_states,
)
from visionzip_core.bench.sizes import sizes_for
from visionzip_core.families import FAMILIES
from visionzip_core.families.clip_llama import SIZES

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("family", "tokens", "grad_ckpt", "mode"),
    [
        ("llava-1.5", 64, True, "finetune"),  # stock, checkpointing
        ("llava-1.5", 16, False, "lora"),  # VisionZip 12 + 4, peft
        ("llava-next", 16, True, "finetune"),  # 5 crops per image, VisionZip per crop
    ],
)
def test_meta_step_tracks_the_same_bytes_as_the_real_step(family, tokens, grad_ckpt, mode):
    """Real CPU step under ``LiveTensorMemory`` == meta step under ``MetaTensorMemory``.

    Tolerance 0.01%: both runs execute the same aten ops whose outputs have the same sizes, so the
    only storages one side can see and the other not are CPU-side bookkeeping tensors the meta
    tracker skips (LLaVA-NeXT's per-image feature lengths: 32 bytes against tens of megabytes).
    What this catches is larger: attention falling back to the math path on meta stores
    ``(B, heads, S, S)`` per layer; running the tower before the token embedding (unlike the
    model's own forward) reorders backward and moves the checkpointed backward peak by 0.04-0.2%
    at these shapes; a missed phase or an untracked view loses whole tensors.
    """
    result = calibrate(TINY_SIZE, family, tokens, TINY_BUDGETS, mode=mode, grad_ckpt=grad_ckpt)
    for kind in ("zero", "full"):
        real, meta = result[kind]["real"], result[kind]["meta"]
        assert real["activations"] > 5 * 2**20  # the step did allocate (logits alone are MBs)
        for key in ("resident", "forward", "backward", "optimizer"):
            assert meta[key] == pytest.approx(real[key], rel=1e-4), (kind, key)


def test_fused_attention_matches_sdpa_on_right_padded_batches():
    """The simulation's attention (no mask, causal) gives the stock SDPA's loss: right padding
    never reaches a real token under causal attention, and padded positions carry no label."""
    from visionzip_core.bench.memory_sim import SIM_ATTENTION

    size = replace(TINY_SIZE, batch_size=3)
    model = build_training_model(size, "llava-1.5", "finetune", False, "cpu")
    batch, _ = simulation_batch(model, size, "llava-1.5", 64, TINY_BUDGETS, "cpu")
    assert (batch["attention_mask"] == 0).any()  # the batch is padded
    with torch.no_grad():
        fused = model(**batch).loss
        model.set_attn_implementation("sdpa")
        stock = model(**batch).loss
        model.set_attn_implementation(SIM_ATTENTION)
    torch.testing.assert_close(fused, stock, rtol=1e-5, atol=1e-5)


def test_compression_lowers_activations_and_zero3_shards_below_zero2():
    """Quick 7B shapes (widths of LLaVA-1.5-7B, 2 LLM layers) on meta: fewer visual tokens, less
    activation memory; checkpointing, less; ZeRO-3's per-GPU states below ZeRO-2's."""
    work = workload(SIZES["llava-1.5-7b"].quick(), "llava-1.5", 2, "test")
    budgets = {576: None, 64: (54, 10)}
    work = type(work)(work.size, work.family, budgets, work.batch_note)
    rows = simulate(work, ["finetune"], grad_ckpt=(True, False), log=lambda *a: None)
    assert len(rows) == 2 * 2 * 2  # checkpointing x budgets x stages
    by = {(r["grad_ckpt"], r["tokens"], r["zero_stage"]): r for r in rows}
    for ckpt in (True, False):
        for stage in (2, 3):
            stock, small = by[(ckpt, 576, stage)], by[(ckpt, 64, stage)]
            assert small["seq_len"] == stock["seq_len"] - 512
            assert small["activations_gib"] < 0.8 * stock["activations_gib"]
            # The total can stay flat: the optimizer step's fp32 temporaries may exceed both.
            assert small["total_gib"] <= stock["total_gib"]
        z2, z3 = by[(ckpt, 576, 2)], by[(ckpt, 576, 3)]
        states = ("params_gib", "grads_gib", "optimizer_gib")
        assert sum(z3[k] for k in states) < sum(z2[k] for k in states)
        assert z3["params_gib"] < z2["params_gib"] / 2
    assert by[(True, 576, 3)]["activations_gib"] < by[(False, 576, 3)]["activations_gib"]


def test_zero_states_follow_the_parameter_counts():
    """Per-GPU states from counts taken here: bf16 parameters (whole under ZeRO-2, 1/8 plus the
    gathered working set under ZeRO-3), bf16 gradients and 12 B/parameter of Adam, both over 8."""
    model = build_training_model(SIZES["llava-1.5-7b"].quick(), "llava-1.5", "lora", False, "meta")
    params = list(model.parameters())
    total, trainable = sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
    assert 0 < trainable < total / 5
    counts = parameter_counts(model)
    z2, z3 = zero_model_states(counts, 2, 8), zero_model_states(counts, 3, 8)
    assert z2.params == 2 * total and z2.grads == 2 * trainable // 8
    assert z2.optimizer == z3.optimizer == 12 * trainable // 8
    assert z3.params == 2 * total // 8 + z3.gathered
    decoder_layer = sum(p.numel() for p in model.get_base_model().model.language_model.layers[0].parameters())
    assert z3.gathered >= 2 * decoder_layer


def test_optimizer_step_transient_is_the_fp32_gradient_and_one_temporary():
    """DeepSpeed's fp32 copy of the bf16 gradient partition (4 B) + foreach AdamW's sqrt(v) (4 B)."""
    assert optimizer_step_transient(10_000) == 8 * 10_000


@pytest.fixture(scope="module")
def script():
    """``scripts/simulate_memory.py`` as a module: its ``main(argv)`` is the command line, run in
    this process (the interpreter and torch are already up; a subprocess would add ~5 s)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("simulate_memory", ROOT / "scripts" / "simulate_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_quick_writes_json_and_markdown(script, tmp_path):
    out = tmp_path / "sim.json"
    script.main(["--quick", "--families", "llava-1.5", "--modes", "finetune", "--out", str(out)])
    rows = json.loads(out.read_text())
    assert len(rows) == 4 * 2 * 2  # budgets x checkpointing x ZeRO stages
    for r in rows:
        parts = r["params_gib"] + r["grads_gib"] + r["optimizer_gib"]
        transient = max(r["activations_gib"], r["optimizer_step_transient_gib"])
        assert r["total_gib"] == pytest.approx(parts + transient)
    md = out.with_suffix(".md").read_text()
    assert md.count("| finetune |") == 2 * 2 + len(rows)  # summary lines + detail lines


def test_cli_calibrate_on_the_tiny_model(script, tmp_path):
    out = tmp_path / "cal.json"
    script.main(["--calibrate", "--tiny", "--families", "llava-1.5", "--out", str(out)])
    rows = json.loads(out.read_text())
    assert len(rows) == 2 * 2  # budgets x checkpointing
    assert all(abs(r["zero"]["diff_pct"]["activations"]) < 0.01 for r in rows)


def test_cli_families_are_the_registry_s(script):
    """``--families`` lists every registered family with a simulated workload (Qwen2.5-VL's tower
    stood in), defaults to all of them, leaves out of ``--calibrate`` those it cannot calibrate, and
    refuses a family the simulation does not run in one line."""
    simulated = [f.name for f in FAMILIES if f.simulation is not None]
    assert "qwen2.5-vl" in simulated and "llava-next" in simulated
    assert script.parse_args([]).families == simulated
    assert "qwen2.5-vl" not in script.parse_args(["--calibrate"]).families
    without = [f.name for f in FAMILIES if f.simulation is None]
    with pytest.raises(SystemExit):
        script.parse_args(["--families", ",".join(without) or "no-such-family"])
    with pytest.raises(SystemExit):
        script.parse_args(["--calibrate", "--families", "qwen2.5-vl"])


SIMULATED = [f for f in FAMILIES if f.simulation is not None]


def test_every_benchmarked_family_is_simulated():
    """Each family with benchmark sizes has a simulated workload at one of its real sizes."""
    benchmarked = [f for f in FAMILIES if f.bench_sizes is not None]
    assert [f.name for f in SIMULATED] == [f.name for f in benchmarked]
    for fam in SIMULATED:
        assert fam.simulation["size"] in fam.bench_sizes and not fam.simulation["size"].startswith("cpu")


@pytest.mark.parametrize("fam", SIMULATED, ids=lambda f: f.name)
def test_simulation_runs_for_each_family_at_a_small_size(fam):
    """One meta step per budget (stock and the smallest) in the family's first mode, checkpointing
    on, at its CPU size's smoke variant: fewer visual tokens, shorter rows and fewer activations."""
    budgets = fam.bench_budgets
    smallest = list(budgets)[-1]
    stock = next(k for k, split in budgets.items() if split is None)
    size = sizes_for(fam.name)["cpu"].quick()
    work = Workload(size, fam.name, {stock: None, smallest: budgets[smallest]}, "test")
    mode = fam.simulation["modes"][0]
    rows = simulate(work, [mode], grad_ckpt=(True,), stages=(2,), log=lambda *a: None)
    by = {r["tokens"]: r for r in rows}
    assert set(by) == {stock, smallest}
    assert by[smallest]["seq_len"] < by[stock]["seq_len"]
    assert 0 < by[smallest]["activations_gib"] < by[stock]["activations_gib"]
    assert by[smallest]["stock_over_this"] > 1


def test_onevision_meta_step_tracks_the_real_step():
    """LLaVA-OneVision's SigLIP tower, unpadding and newlines run on meta (sizes from the CPU
    ``image_sizes``): its meta step allocates what the real CPU step does (as the LLaVA rows above)."""
    size = sizes_for("llava-onevision")["cpu"].quick()
    result = calibrate(size, "llava-onevision", 32, mode="finetune", grad_ckpt=True)
    for kind in ("zero", "full"):
        real, meta = result[kind]["real"], result[kind]["meta"]
        assert real["activations"] > 5 * 2**20
        for key in ("resident", "forward", "backward", "optimizer"):
            assert meta[key] == pytest.approx(real[key], rel=1e-4), (kind, key)


def test_qwen3_vl_simulation_step_adds_deepstack_as_the_stock_forward():
    """Qwen3-VL's simulation step (its tower stood in) on real CPU tensors gives the stock forward's
    language-model output and loss when the stock forward is handed the same tower outputs
    (``mm_encoder_outputs``): the main features and each DeepStack level through their mergers,
    gathered at the kept rows, the levels added by the stock boolean-mask code after the first
    layers. Without the levels the output differs by far more than the tolerance."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    from visionzip_core.bench.memory_sim import training_loss

    quick = sizes_for("qwen3-vl")["cpu"].quick()
    # Two samples (padded rows: flat indices) and two LLM layers: a level added after the last layer
    # would reach only the image positions' own logits, which carry no label.
    size = replace(quick, batch_size=2, text={**quick.text, "num_hidden_layers": 2})
    model = build_training_model(size, "qwen3-vl", "projector", False, "cpu")
    batch, _ = simulation_batch(model, size, "qwen3-vl", 50, None, "cpu")
    assert (batch["attention_mask"] == 0).any()
    gen = torch.Generator().manual_seed(0)
    batch["vision_output"] = torch.randn(batch["vision_output"].shape, generator=gen)
    batch["deepstack_input"] = torch.randn(batch["deepstack_input"].shape, generator=gen)
    visual = model.model.visual
    assert len(visual.deepstack_merger_list) == batch["deepstack_input"].shape[0] > 0
    hidden = []
    model.model.language_model.register_forward_hook(lambda m, a, out: hidden.append(out.last_hidden_state))
    loss = training_loss(model, batch)

    def stock(levels: bool) -> torch.Tensor:
        kept = batch["kept_index"]
        with torch.no_grad():
            main = visual.merger(batch["vision_output"])[kept]
            deep = [
                m(x)[kept] * levels for m, x in zip(visual.deepstack_merger_list, batch["deepstack_input"])
            ]
            encoded = BaseModelOutputWithDeepstackFeatures(
                pooler_output=[main], deepstack_features=[[d] for d in deep]
            )
            return model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"],
                mm_encoder_outputs={"image": encoded},
                labels=batch["labels"],
            ).loss

    torch.testing.assert_close(loss.detach(), stock(True))
    simulated, with_levels = hidden[0].detach(), hidden[1]
    torch.testing.assert_close(simulated, with_levels)
    stock(False)
    assert (hidden[2] - with_levels).abs().max() > 100 * 1e-5
    loss.backward()
    for merger in visual.deepstack_merger_list:  # the levels train with the projector
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in merger.parameters())
