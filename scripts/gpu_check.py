"""What only a CUDA machine can show, in one command and one table (under 10 minutes on one H100).

    python scripts/gpu_check.py                 # every check; prints one table
    python scripts/gpu_check.py --only packing  # packing | syncs | zero3 | step | settings

Checks (README, "GPU notes", says why each needs a GPU):
  packing  packed == unpacked (summed loss and gradients) under flash_attention_2 (bf16, the
           one-row layout the collator emits for it) and SDPA (fp32), on a tiny LLaVA-1.5.
  syncs    host syncs of one forward, stock against VisionZip, per family and at batch 2 and 8,
           counted by torch.cuda.set_sync_debug_mode("warn").
  zero3    a 2-GPU ZeRO-3 run of the real entry point per family on data mixing text-only and
           image samples (Qwen2.5-VL: and a video); one line "skip" with fewer than 2 GPUs.
  step     a bf16 training step (forward, backward, AdamW) at 576 and 64 visual tokens on a
           LLaVA-1.5-shaped model of about 470M parameters (CLIP-L/336 + an 8-layer Llama), its
           measured time and peak memory next to the memory simulation's peak and the FLOP model's.
  settings the GPU defaults take effect: expandable segments, TF32, fused AdamW, pinned copies
           cast on the device (frame timing kept in fp64), and the entry point's per-rank
           peak-memory metrics per logging window.

On a machine without CUDA it prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from visionzip_core.bench import memory_sim as sim  # noqa: E402
from visionzip_core.bench.budgets import budgets_for, image_plan, set_budget, stock_budget  # noqa: E402
from visionzip_core.bench.sizes import benchmarked_families, sizes_for  # noqa: E402
from visionzip_core.data import DataCollator, build_dataset  # noqa: E402
from visionzip_core.families import family_for  # noqa: E402
from visionzip_core.families.flops import TrainableParts  # noqa: E402
from visionzip_core.testing.sync_counts import FAMILIES, forward_sync_counts  # noqa: E402
from visionzip_core.testing.tiny import write_tiny  # noqa: E402
from visionzip_core.training import distributed as dist  # noqa: E402
from visionzip_core.training.config_loading import load_config  # noqa: E402
from visionzip_core.training.config_rules import PACKED_LAYOUT  # noqa: E402
from visionzip_core.training.dataloaders import batch_to_device, make_collator  # noqa: E402
from visionzip_core.training.model_spec import resolve_model_spec  # noqa: E402
from visionzip_core.training.modeling import build_model, build_processor  # noqa: E402
from visionzip_core.training.optimization import build_optimizer  # noqa: E402

CHECKS = ("packing", "syncs", "zero3", "step", "settings")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=CHECKS, action="append", help="run only these checks (repeatable)")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    return p.parse_args(argv)


# --- helpers -----------------------------------------------------------------------------------


def _demo_settings(model_dir: Path, extra=()):
    return load_config(REPO / "configs/demo.yaml", [f"model.name_or_path={model_dir}", *extra])


def _items(settings, processor, image_tokens, n: int) -> list[dict]:
    dataset = build_dataset(
        settings.data.resolve_paths(REPO),
        "train",
        tokenizer=processor.tokenizer,
        image_processor=processor.image_processor,
        image_tokens_per_image=image_tokens,
    )
    return [dataset[i] for i in range(n)]


def _summed(model, batch: dict, dtype) -> tuple[float, dict]:
    batch = batch_to_device(
        {k: v for k, v in batch.items() if k != "num_tokens"}, torch.device("cuda"), dtype
    )
    model.zero_grad(set_to_none=True)
    n = (batch["labels"][:, 1:] != -100).sum()
    loss = model(**batch).loss.float() * n
    loss.backward()
    grads = {k: p.grad.float().clone() for k, p in model.named_parameters() if p.grad is not None}
    return float(loss), grads


def _max_rel(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)) for k in b)


# --- checks ------------------------------------------------------------------------------------


def check_packing(work: Path) -> list[tuple[str, str, str]]:
    """packed == unpacked under SDPA (fp32, rows) and flash_attention_2 (bf16, one row)."""
    rows = []
    for attn, dtype, tol in (("sdpa", torch.float32, 1e-4), ("flash_attention_2", torch.bfloat16, 3e-2)):
        name = f"packed == unpacked, {attn} ({'fp32' if dtype == torch.float32 else 'bf16'})"
        try:
            settings = _demo_settings(
                "builtin:tiny-llava", ["data.packing=true", f"model.attn_implementation={attn}"]
            )
            spec = resolve_model_spec(settings)
            processor, tokens = build_processor(settings, spec)
            items = _items(settings, processor, tokens, 7)
            torch.manual_seed(0)
            model = build_model(settings, spec, dtype, processor).cuda().train()
            pad = processor.tokenizer.pad_token_id
            lengths = [len(i["input_ids"]) for i in items]
            data = settings.data.model_copy(update={"max_tokens_per_row": sum(sorted(lengths)[-3:])})
            packed = make_collator(data, pad, attn)(items)
            loss_u, grads_u = _summed(model, DataCollator(pad_token_id=pad)(items), dtype)
            loss_p, grads_p = _summed(model, packed, dtype)
            rel_loss = abs(loss_p - loss_u) / abs(loss_u)
            rel_grad = _max_rel(grads_p, grads_u)
            ok = rel_loss < tol and rel_grad < 10 * tol
            layout = f"{PACKED_LAYOUT[attn]} {tuple(packed['input_ids'].shape)}"
            rows.append(
                (
                    name,
                    "PASS" if ok else "FAIL",
                    f"{layout}; loss rel {rel_loss:.1e}, grad rel {rel_grad:.1e}",
                )
            )
        except Exception as err:  # noqa: BLE001 - one row per check, the table always prints
            rows.append((name, "ERROR", _one_line(err)))
    return rows


def check_syncs(work: Path) -> list[tuple[str, str, str]]:
    """Host syncs per forward, VisionZip over stock, per family at batch 2 and 8 (target: <= 4 more,
    the same at both batch sizes), counted by torch's sync debug mode on the tiny models
    (:func:`visionzip_core.testing.sync_counts.forward_sync_counts`, as ``scripts/count_syncs.py --device cuda``)."""
    rows = []
    for family in FAMILIES:
        name = f"host syncs per forward, {family}"
        try:
            counts = forward_sync_counts(family, (2, 8), device="cuda")
            added = [c.added for c in counts]
            ok = max(added) <= 4 and added[0] == added[1]
            detail = ", ".join(f"batch {c.batch}: stock {c.stock}, VisionZip {c.visionzip}" for c in counts)
            rows.append((name, "PASS" if ok else "FAIL", detail))
        except Exception as err:  # noqa: BLE001 - one row per check, the table always prints
            rows.append((name, "ERROR", _one_line(err)))
    return rows


def _families(work: Path) -> list[tuple[str, str, list[str]]]:
    """(family, model folder, demo-config overrides) for each family, tiny random weights."""
    qwen = work / "tiny-qwen2.5-vl"
    if not (qwen / "config.json").is_file():
        write_tiny("qwen2.5-vl", qwen, seed=0, vision_depth=2)
    data = _qwen_mixed_data(work / "qwen-data")
    return [
        ("llava-1.5", "builtin:tiny-llava", []),
        (
            "llava-next",
            "builtin:tiny-llava-next",
            ["data.image_aspect_ratio=anyres", "data.model_max_length=1024"],
        ),
        (
            "qwen2.5-vl",
            str(qwen),
            [
                f"data.train=[{{path: {data}/train.jsonl, image_folder: {data}/images}}]",
                f"data.val=[{{path: {data}/train.jsonl, image_folder: {data}/images}}]",
                "data.template=chat_template",
                "data.image_placement=keep",
                "data.image_aspect_ratio=native",
                "data.model_max_length=512",
                "visionzip.dominant_ratio=0.25",
                "visionzip.contextual_ratio=0.25",
            ],
        ),
    ]


def _qwen_mixed_data(out: Path) -> Path:
    """Messages data mixing images of several sizes, a 4-frame video and text-only samples."""
    import numpy as np
    from PIL import Image

    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(97, 143), (300, 61), (112, 112), (60, 200)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / f"im{i}.png")
    for k in range(4):
        Image.fromarray(rng.integers(0, 255, (70, 100, 3), dtype=np.uint8)).save(images / f"fr{k}.png")

    def ask(part, question, answer):
        return [
            {"role": "user", "content": [part, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]

    rows = [
        {"id": f"im{i}", "messages": ask({"type": "image", "image": f"im{i}.png"}, "What is it?", "A shape.")}
        for i in range(4)
    ]
    rows += [
        {
            "id": "video",
            "messages": ask(
                {"type": "video", "video": [f"fr{k}.png" for k in range(4)]}, "What moves?", "A dog."
            ),
        },
        {"id": "text0", "messages": ask({"type": "text", "text": "Say"}, " hi.", "Hi.")},
        {"id": "text1", "messages": ask({"type": "text", "text": "Count"}, " to two.", "One, two.")},
        {"id": "text2", "messages": ask({"type": "text", "text": "Name"}, " a colour.", "Red.")},
    ]
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def check_zero3(work: Path) -> list[tuple[str, str, str]]:
    """The real entry point, 2 GPUs, ZeRO-3, per family, on mixed data with a mixed validation set."""
    if torch.cuda.device_count() < 2:
        return [
            (
                "2-GPU ZeRO-3 step on mixed data, per family",
                "SKIP",
                f"{torch.cuda.device_count()} GPU(s); needs 2",
            )
        ]
    rows = []
    torchrun = str(Path(sys.executable).parent / "torchrun")
    for family, model_dir, extra in _families(work):
        name = f"2-GPU ZeRO-3 steps on mixed data, {family}"
        out = work / f"zero3-{family}"
        cmd = [
            torchrun,
            "--nproc_per_node",
            "2",
            "train/finetune.py",
            "--config",
            "configs/demo.yaml",
            f"model.name_or_path={model_dir}",
            f"train.output_dir={out}",
            "train.resume=never",
            "deepspeed.config=configs/deepspeed/zero3.json",
            "train.per_device_batch_size=2",
            "train.max_steps=3",
            "train.eval_steps=2",
            "train.logging_steps=1",
            "train.precision=bf16",
            "wandb.enabled=false",
            "export.enabled=false",
            *extra,
        ]
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        seconds = time.perf_counter() - started
        if proc.returncode == 0:
            rows.append((name, "PASS", f"3 steps + validation in {seconds:.0f} s"))
        else:
            rows.append(
                (
                    name,
                    "FAIL",
                    _one_line(
                        proc.stderr.strip().splitlines()[-1]
                        if proc.stderr.strip()
                        else f"exit {proc.returncode}"
                    ),
                )
            )
    return rows


def check_step(work: Path) -> list[tuple[str, str, str]]:
    """bf16 step at 576 and 64 tokens: measured time/memory against the simulation and FLOP model."""
    from dataclasses import replace

    family = benchmarked_families()[0]  # the registry's first (LLaVA-1.5: ~470M at the cpu size)
    size = replace(sizes_for(family)["cpu"], dtype="bfloat16", batch_size=8)
    table = budgets_for(family)
    stock, smallest = stock_budget(table), min(table)
    budgets = {stock: table[stock], smallest: table[smallest]}
    rows = []
    peak_tflops = float(os.environ.get("GPU_PEAK_TFLOPS", "989"))  # H100 SXM dense bf16
    for tokens in budgets:
        name = f"bf16 step, {family}-shaped cpu size, {tokens} tokens/image, batch {size.batch_size}"
        try:
            meta = sim.build_training_model(size, family, "finetune", False, "meta")
            set_budget(meta, tokens, budgets)
            batch, info = sim.simulation_batch(meta, size, family, tokens, budgets, "meta")
            meta_opt = torch.optim.AdamW([p for p in meta.parameters() if p.requires_grad], lr=1e-5)
            simulated = sim.measure_step(meta, batch, sim.MetaTensorMemory, meta_opt).peak
            del meta, meta_opt

            model = sim.build_training_model(size, family, "finetune", False, "cuda")
            model.set_attn_implementation("sdpa")  # the simulation's CPU kernel stands for flash-attention
            set_budget(model, tokens, budgets)
            batch, _ = sim.simulation_batch(model, size, family, tokens, budgets, "cuda")
            optimizer = torch.optim.AdamW(
                [p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True
            )
            for _ in range(2):  # warm-up: kernels chosen, optimizer state created
                sim.training_loss(model, batch, "stock").backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            steps, started = 5, time.perf_counter()
            for _ in range(steps):
                sim.training_loss(model, batch, "stock").backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            seconds = (time.perf_counter() - started) / steps
            measured = torch.cuda.max_memory_allocated()
            flops = (
                family_for(family)
                .step_flops(
                    size,
                    model.config,
                    TrainableParts(llm="full"),
                    image_plan(model.config, family, tokens, budgets),
                    budgets[tokens],
                    samples=size.batch_size,
                    seq_len=info["seq_len"],
                )["total"]
                .total
            )
            achieved = flops / seconds / 1e12
            rows.append(
                (
                    name,
                    "INFO",
                    f"{seconds * 1000:.0f} ms/step; peak {measured / 2**30:.2f} GiB measured vs {simulated / 2**30:.2f} "
                    f"simulated ({100 * (simulated - measured) / measured:+.0f}%); FLOP model {flops / 1e12:.2f} TFLOP "
                    f"-> {achieved:.0f} TFLOP/s ({100 * achieved / peak_tflops:.0f}% of {peak_tflops:.0f})",
                )
            )
            del model, optimizer, batch
            torch.cuda.empty_cache()
        except Exception as err:  # noqa: BLE001
            rows.append((name, "ERROR", _one_line(err)))
    return rows


def check_settings(work: Path) -> list[tuple[str, str, str]]:
    """The GPU defaults take effect: expandable segments, TF32, fused AdamW, pinned non-blocking
    copies cast on the device, and the entry point's per-rank memory metrics."""
    rows = []
    name = "GPU defaults: allocator, TF32, fused AdamW, device copies"
    try:
        x = torch.empty(2**20, device="cuda")  # the allocator reads its settings on first use
        segments = torch.cuda.memory._snapshot()["segments"]
        expandable = any(seg.get("is_expandable", False) for seg in segments)
        del x
        dist.apply_backend_settings(tf32=True)
        tf32 = torch.backends.cuda.matmul.fp32_precision == "tf32"
        dist.apply_backend_settings(tf32=False)
        p = torch.nn.Parameter(torch.randn(8, 8, device="cuda"))
        p.grad = torch.randn_like(p)
        optim = load_config(REPO / "configs/demo.yaml", []).optim
        optimizer = build_optimizer([{"params": [p], "lr": 1e-3, "weight_decay": 0.0}], optim, fused=True)
        optimizer.step()
        fused = optimizer.defaults["fused"] is True
        batch = {
            "pixel_values": torch.rand(4, 3, 8, 8).pin_memory(),
            "second_per_grid_ts": torch.tensor([1 / 3], dtype=torch.float64).pin_memory(),
        }
        moved = batch_to_device(batch, torch.device("cuda"), torch.bfloat16)
        copies = (
            moved["pixel_values"].dtype == torch.bfloat16
            and moved["second_per_grid_ts"].dtype == torch.float64
        )
        ok = expandable and tf32 and fused and copies
        rows.append(
            (
                name,
                "PASS" if ok else "FAIL",
                f"expandable segments {expandable} ({os.environ.get('PYTORCH_ALLOC_CONF')}), tf32 {tf32}, "
                f"fused AdamW {fused}, bf16 pixels + fp64 frame timing {copies}",
            )
        )
    except Exception as err:  # noqa: BLE001
        rows.append((name, "ERROR", _one_line(err)))
    name = "entry point, 1 GPU bf16: per-rank peak memory per logging window"
    out = work / "one-gpu"
    cmd = [
        sys.executable,
        "train/finetune.py",
        "--config",
        "configs/demo.yaml",
        "model.name_or_path=builtin:tiny-llava",
        f"train.output_dir={out}",
        "train.resume=never",
        "train.max_steps=4",
        "train.logging_steps=2",
        "train.per_device_batch_size=4",
        "train.precision=bf16",
        "train.eval_steps=null",
        "wandb.enabled=false",
        "export.enabled=false",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        rows.append(
            (
                name,
                "FAIL",
                _one_line(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode),
            )
        )
        return rows
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    keys = (
        "peak_cuda_mb",
        "peak_cuda_reserved_mb",
        "peak_cuda_mb_per_rank",
        "peak_cuda_reserved_mb_per_rank",
    )
    ok = all(all(k in r for k in keys) for r in steps)
    rows.append(
        (
            name,
            "PASS" if ok else "FAIL",
            "; ".join(
                f"step {r['step']}: {r.get('peak_cuda_mb')} / {r.get('peak_cuda_reserved_mb')} MB"
                for r in steps
            ),
        )
    )
    return rows


def _one_line(err) -> str:
    text = f"{type(err).__name__}: {err}" if isinstance(err, BaseException) else str(err)
    return " ".join(text.split())[:300]


def print_table(rows: list[tuple[str, str, str]]) -> None:
    width = max(len(r[0]) for r in rows)
    print(f"{'check':<{width}}  result  detail")
    print(f"{'-' * width}  ------  ------")
    for name, result, detail in rows:
        print(f"{name:<{width}}  {result:<6}  {detail}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "gpu_check: skipped, no CUDA device (these checks need a GPU; the CPU test suite covers the rest)"
        )
        return 0

    dist.set_env_defaults()
    os.environ.setdefault("WANDB_MODE", "disabled")
    # Exact fp32 for the SDPA comparison; bf16 rows are unaffected.
    dist.apply_backend_settings(tf32=False)
    chosen = args.only or list(CHECKS)
    runners = {
        "packing": check_packing,
        "syncs": check_syncs,
        "zero3": check_zero3,
        "step": check_step,
        "settings": check_settings,
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = []
        started = time.perf_counter()
        for check in chosen:
            rows += runners[check](work)
        print(
            f"\nGPU check on {torch.cuda.get_device_name()} x {torch.cuda.device_count()}, "
            f"torch {torch.__version__}, {time.perf_counter() - started:.0f} s\n"
        )
        print_table(rows)
    return 1 if any(r[1] in ("FAIL", "ERROR") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
