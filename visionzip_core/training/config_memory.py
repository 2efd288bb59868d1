"""Simulated per-GPU peak memory of a shipped training config, at its own settings, with long samples.

Each config of ``configs/<model>/`` is read as the trainer reads it (mode, per-device batch,
gradient checkpointing, ZeRO stage, VisionZip split, ``model_max_length``) and one training step of
the 7B model it names runs on the meta device (:mod:`visionzip_core.bench.memory_sim`), with every sample
of the micro-batch as long as ``data.model_max_length`` allows: the step that decides whether a
run survives its longest batch. Precision is bf16 (what ``precision: auto`` picks on such GPUs),
with gradients accumulated in fp32 as the trainer's DeepSpeed config asks. With ``data.batch_tokens`` the micro-batch holds as many such
samples as the budget allows.

Qwen2.5-VL keeps a fraction of each image's own merged tokens (``dominant_ratio`` +
``contextual_ratio``), so its count depends on the image: the simulation feeds the benchmarks'
448 x 448 image (the family's ``bench_image``, 256 merged tokens) and runs the
planner's Qwen path (ratio budget keyed by percent, the tower's working set, the merger and the LLM).

    python scripts/simulate_memory.py --configs configs/llava-1.5-7b configs/llava-next-7b configs/qwen2.5-vl-7b
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from visionzip_core.bench import memory_sim as sim
from visionzip_core.bench.budgets import budgets_for, stock_budget
from visionzip_core.bench.planner import known_models, ratio_budget
from visionzip_core.bench.sizes import sizes_for
from visionzip_core.training.config_loading import load_config
from visionzip_core.training.deepspeed_config import zero_stage
from visionzip_core.training.repo_paths import resolve_repo_path
from visionzip_core.training.schema import Settings

GPU_GIB = 80  # an A100/H100 80 GB


def simulated_folders() -> dict[str, str]:
    """Folders of shipped configs -> the simulation's family: the planner's size names
    (``configs/llava-1.5-7b`` holds the configs of the ``llava-1.5-7b`` size)."""
    root = resolve_repo_path("configs")
    return {name: family for name, family in known_models().items() if (root / name).is_dir()}


SIMULATED_FOLDERS = simulated_folders()
MEMORY_MODE = {"projector": "projector", "pretrain": "projector", "lora": "lora", "finetune": "finetune"}


def config_workload(settings: Settings, folder: str) -> dict:
    """What one step of this config holds per GPU: family, mode, micro-batch, checkpointing, ZeRO
    stage, visual-token budget (``tokens``, a key of ``budgets``: tokens per image, per crop for
    LLaVA-NeXT, percent of each image's merged tokens for a ratio split), and the sample length."""
    t, d, vz = settings.train, settings.data, settings.visionzip
    family = SIMULATED_FOLDERS[folder]
    mode = MEMORY_MODE[t.mode]
    if mode == "finetune" and t.tune_vision_tower:
        mode = "finetune_vision"
    budgets = dict(budgets_for(family))
    if not vz.enabled:
        tokens, split = stock_budget(budgets), None
    elif vz.uses_ratios:  # the planner's ratio form, keyed by the percent kept
        tokens, split = ratio_budget(f"{vz.dominant_ratio}+{vz.contextual_ratio}")
    else:
        split = (vz.dominant, vz.contextual)
        tokens = sum(split)
    budgets[tokens] = split
    micro = t.per_device_batch_size
    if d.batch_tokens is not None:
        micro = max(1, d.batch_tokens // d.model_max_length)
    stage = zero_stage(json.loads(resolve_repo_path(settings.deepspeed.config).read_text()))
    return {
        "family": family,
        "size": folder,
        "mode": mode,
        "micro_batch": micro,
        "grad_ckpt": t.gradient_checkpointing,
        "zero_stage": stage,
        "split": split,
        "tokens": tokens,
        "budgets": budgets,
        "max_length": d.model_max_length,
    }


def simulate_config(path: str | Path, gpus: int = 8, overrides=(), log=print) -> dict:
    """One row: the config's workload (with ``overrides``, ``section.key=value``) and its simulated
    per-GPU peak (``total_gib``)."""
    path = Path(path)
    settings = load_config(path, list(overrides))
    work = config_workload(settings, path.parent.name)
    size = sizes_for(work["family"])[work["size"]]
    budgets = work["budgets"]
    model = sim.build_training_model(
        replace(size, batch_size=work["micro_batch"]), work["family"], work["mode"], work["grad_ckpt"], "meta"
    )
    counts = sim.parameter_counts(model)
    handles = sim.release_grads_on_accumulate(model)
    plan = sim.image_plan(model.config, work["family"], work["tokens"], budgets)
    # Text fills the sample up to model_max_length (the image tokens come on top of the text range).
    text = max(1, work["max_length"] - plan.llm - 2)
    sized = replace(size, batch_size=work["micro_batch"], text_tokens=(text, text))
    sim.set_simulated_budget(model, work["family"], work["tokens"], budgets)
    batch, info = sim.simulation_batch(model, sized, work["family"], work["tokens"], budgets, "meta")
    step = sim.measure_step(model, batch, sim.MetaTensorMemory)
    for h in handles:
        h.remove()
    # bf16 under ZeRO accumulates gradients in fp32 (deepspeed_config.fill_deepspeed_config).
    states = sim.zero_model_states(counts, work["zero_stage"], gpus, grad_bytes=4)
    partition = counts.largest_group // gpus
    transient = sim.optimizer_step_transient(
        partition if work["zero_stage"] == 2 else min(partition, sim.ZERO3_SUB_GROUP)
    )
    total = (states.total + max(step.activations, transient)) / sim.GIB
    row = {
        "config": str(path.relative_to(resolve_repo_path("."))) if path.is_absolute() else str(path),
        **{k: v for k, v in work.items() if k not in ("split", "budgets")},
        "split": list(work["split"]) if work["split"] else None,
        "seq_len": info["seq_len"],
        "image_tokens": info["image_tokens"],
        "gpus": gpus,
        "states_gib": states.total / sim.GIB,
        "activations_gib": step.activations / sim.GIB,
        "total_gib": total,
        "fits_80gb": total <= GPU_GIB,
    }
    log(
        f"  {row['config']}: {work['mode']} batch {work['micro_batch']} x {info['seq_len']} tokens, "
        f"ckpt {'on' if work['grad_ckpt'] else 'off'}, ZeRO-{work['zero_stage']}: {total:.1f} GiB"
    )
    return row


def shipped_configs(folders=tuple(SIMULATED_FOLDERS)) -> list[Path]:
    root = resolve_repo_path("configs")
    return sorted(p for f in folders for p in (root / f).glob("*.yaml"))


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| config | mode | micro-batch x tokens | grad ckpt | ZeRO | visual tokens/image | model states GiB | activations GiB | peak GiB/GPU | fits 80 GB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['mode']} | {r['micro_batch']} x {r['seq_len']} | "
            f"{'on' if r['grad_ckpt'] else 'off'} | {r['zero_stage']} | {r['image_tokens']} | "
            f"{r['states_gib']:.1f} | {r['activations_gib']:.1f} | {r['total_gib']:.1f} | "
            f"{'yes' if r['fits_80gb'] else 'NO'} |"
        )
    return "\n".join(lines)
