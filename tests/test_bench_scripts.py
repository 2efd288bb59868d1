"""Smoke runs of the benchmark entry points through the real command line: LLaVA-1.5's training
benchmark on its ``--quick`` size (the path BENCHMARKS.md's quick figures come from), the others on
the ``smoke`` size (the real image geometry at 64 wide, 2-layer models: plumbing in seconds, figures
meaningless)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import warm_python

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, out: Path, *extra: str, size: str = "smoke") -> list[dict]:
    """``script`` at budgets 576 and 64 on benchmark ``size`` ("quick": the cpu size's ``--quick``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    which = ["--quick"] if size == "quick" else ["--size", size]
    cmd = [sys.executable, str(ROOT / "scripts" / script), *which, "--threads", "1", "--budgets", "576,64"]
    warm_python.run([*cmd, *extra, "--out", str(out)], check=True, env=env, cwd=ROOT, timeout=600)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_bench_train_quick(tmp_path):
    results = _run("bench_train.py", tmp_path / "train.json", "--steps", "1", size="quick")
    assert [r["tokens"] for r in results] == [576, 64]
    stock, small = results
    for key in ("tokens", "step_time_s", "peak_mem_mb", "measured_speedup", "ideal_speedup"):
        assert key in stock and key in small
    assert stock["measured_speedup"] == 1.0 and stock["ideal_speedup"] == 1.0
    # Shapes, not timing: fewer tokens means less compute and less activation memory.
    assert small["ideal_speedup"] > 1.5
    assert small["seq_len"] == stock["seq_len"] - 512
    assert small["peak_above_resident_mb"] < stock["peak_above_resident_mb"]
    assert (tmp_path / "train.md").read_text().count("\n| ") == 3
    assert (tmp_path / "train.png").stat().st_size > 1000


@pytest.mark.slow
def test_bench_prefill_quick(tmp_path):
    results = _run("bench_prefill.py", tmp_path / "prefill.json", "--rounds", "1", "--new-tokens", "3")
    stock, small = results
    # The processor helper inserted the budget's image tokens: the prompts differ by 576 - 64.
    assert stock["prompt_len"] - small["prompt_len"] == 512
    assert small["ideal_prefill_speedup"] > 1.0 and stock["ttft_s"] > 0


def test_llava_7b_size_builds_on_meta_and_matches_flop_model():
    """The GPU size is built for real only on a GPU; here its structure and FLOP shapes are checked."""
    import torch

    from visionzip_core.bench.random_models import build_random_model
    from visionzip_core.families.clip_llama import SIZES, VisionTowerShape
    from visionzip_core.families.flops import LlamaShape

    size = SIZES["llava-1.5-7b"]
    model = build_random_model(size, "meta", family="llava-1.5")
    cfg = model.config
    assert VisionTowerShape.from_config(cfg.vision_config) == size.vision
    assert LlamaShape.from_config(cfg.text_config).dim_per_head == 128
    assert next(model.parameters()).dtype == torch.bfloat16
    params = sum(p.numel() for p in model.parameters())
    # LLaVA-1.5-7B: 6.74B Llama + 0.30B CLIP-L/336 + 21M projector (7.06B).
    assert 7.0e9 < params < 7.1e9


def test_smoke_size_has_the_real_geometry_and_the_other_sizes_keep_llava_hf_token_ids():
    """``--size smoke`` plans every budget as the cpu size does (so the smoke tests' token counts are
    the real ones), its batches stay inside its small vocabulary, the planner does not offer it, and
    the LLaVA sizes the figures come from keep llava-hf's ``<image>`` 32000 and ``<pad>`` 32001."""
    from visionzip_core.bench.budgets import image_plan
    from visionzip_core.bench.planner import known_models
    from visionzip_core.bench.random_models import bench_config
    from visionzip_core.bench.sizes import size_names
    from visionzip_core.families import FAMILIES, family_for

    with_smoke = [f.name for f in FAMILIES if "smoke" in (f.bench_sizes or {})]
    assert with_smoke == ["llava-1.5", "llava-next", "llava-onevision"]
    for family in with_smoke:
        smoke, cpu = (bench_config(family_for(family).bench_sizes[n], family) for n in ("smoke", "cpu"))
        for tokens in family_for(family).bench_budgets:
            assert image_plan(smoke, family, tokens) == image_plan(cpu, family, tokens), (family, tokens)
    assert "smoke" in size_names() and "smoke" not in known_models()

    fam = family_for("llava-next")
    for name, size in fam.bench_sizes.items():
        config = bench_config(size, fam)
        ids = (config.image_token_id, config.text_config.pad_token_id)
        assert ids == ((2048, 2049) if name == "smoke" else (32000, 32001)), name
    size = fam.bench_sizes["smoke"]
    config = bench_config(size, fam)
    plan = image_plan(config, "llava-next", 32)
    batch = fam.bench_batch(size, config, plan)
    assert int(batch["input_ids"].max()) < size.llm.vocab == config.text_config.vocab_size
    assert int((batch["input_ids"] == config.image_token_id).sum()) == plan.llm == 160
    items = fam.bench_items(size, [40, 50], 64)
    assert all(int((item["input_ids"] == 2048).sum()) == 64 for item in items)


@pytest.mark.slow
def test_bench_train_and_prefill_quick_for_llava_next(tmp_path):
    """``--family llava-next``: 672 px images, 5 crops each; the budget is per crop."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--size", "smoke", "--threads", "1", "--family", "llava-next", "--budgets", "576,32"]
    prefill = ["--rounds", "1", "--new-tokens", "2"]
    for script, extra in (("bench_train.py", ["--steps", "1"]), ("bench_prefill.py", prefill)):
        out = tmp_path / script.replace(".py", ".json")
        cmd = [sys.executable, str(ROOT / "scripts" / script), *common, *extra, "--out", str(out)]
        warm_python.run(cmd, check=True, env=env, cwd=ROOT, timeout=600)
        stock, small = json.loads(out.read_text())
        assert stock["crops_per_image"] == small["crops_per_image"] == 5
        # stock: 576 base + 48 x 48 tile grid + 48 newlines; compressed: 5 crops x 32
        assert (stock["image_tokens"], small["image_tokens"]) == (2928, 160)
        length = "seq_len" if script == "bench_train.py" else "prompt_len"
        assert stock[length] - small[length] == 2928 - 160
        assert (small.get("ideal_speedup") or small["ideal_prefill_speedup"]) > 1.5


def test_llava_next_7b_flop_ideal_training_speedup():
    """The FLOP-ideal training speed-up of LLaVA-NeXT-7B (full fine-tune of projector + LLM, 5-crop
    images, the LLaVA-665k-like text of the benchmarks) at the paper's 640 / 320 / 160 tokens.
    BENCHMARKS.md sets these against the paper's 2.1x measured training-time reduction."""
    from visionzip_core.bench.budgets import budgets_for, image_plan
    from visionzip_core.bench.random_models import build_random_model
    from visionzip_core.families.base import synthetic_text_lengths as text_lengths
    from visionzip_core.families.clip_llama import SIZES, llava_step_flops
    from visionzip_core.families.flops import TrainableParts

    size = SIZES["llava-next-7b"]
    model = build_random_model(size, "meta", family="llava-next")
    assert 7.0e9 < sum(p.numel() for p in model.parameters()) < 7.1e9
    text = round(sum(text_lengths(size)) / size.batch_size)

    def step(tokens: int) -> int:
        plan = image_plan(model.config, "llava-next", tokens)
        return llava_step_flops(
            size.vision,
            size.llm,
            TrainableParts(projector=True, llm="full"),
            num_images=size.batch_size,
            batch=size.batch_size,
            seq_len=1 + text + plan.llm,
            image_tokens=plan.llm,
            visionzip_split=budgets_for("llava-next")[tokens],
            crops_per_image=plan.crops,
            projector_tokens_per_image=plan.projected,
        )["total"].total

    speedups = {k: step(576) / step(k) for k in (128, 64, 32)}
    assert 3.5 < speedups[128] < speedups[64] < speedups[32] < 12.0, speedups


@pytest.mark.slow
def test_bench_train_compare_packing_quick(tmp_path):
    results = _run(
        "bench_train.py",
        tmp_path / "packing.json",
        "--compare-packing",
        "--samples",
        "6",
        "--batch-size",
        "3",
        "--row-tokens",
        "1536",
    )
    assert [r["tokens"] for r in results] == [576, 64]
    for r in results:
        layouts = r["layouts"]
        assert list(layouts) == ["padded, random order", "padded, length-grouped", "packed"]
        assert all(x["samples"] == 6 for x in layouts.values())
        assert layouts["packed"]["padding_fraction"] < layouts["padded, random order"]["padding_fraction"]
        assert layouts["packed"]["micro_batches"] <= 6
    # Fewer visual tokens: more samples fit a packed row.
    assert results[1]["layouts"]["packed"]["micro_batches"] < results[0]["layouts"]["packed"]["micro_batches"]
    assert (tmp_path / "packing.md").read_text().count("\n| ") == 7


@pytest.mark.slow
def test_paper_table_quick(tmp_path):
    """The four rows through the real entry points, on 3 steps each (values are not checked: a
    3-step model answers at chance; BENCHMARKS.md has the full run)."""
    out = tmp_path / "table.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "scripts/paper_table.py"), "--quick", "--out", str(out)]
    cmd += ["--work", str(tmp_path / "runs")]
    warm_python.run(cmd, check=True, env=env, cwd=ROOT, timeout=1200)
    rows = json.loads(out.read_text())
    assert [r["row"] for r in rows] == ["a", "b", "c", "d"]
    assert [r["tokens"] for r in rows] == [64, 8, 8, 8]
    assert rows[1]["step_time_s"] is None and all(rows[k]["step_time_s"] > 0 for k in (0, 2, 3))
    assert all(r["samples"] == 5 and 0 <= r["accuracy"] <= 1 for r in rows)
    assert (tmp_path / "table.md").read_text().count("\n| (") == 4
    assert (tmp_path / "table.png").stat().st_size > 1000


@pytest.mark.slow
def test_bench_train_and_prefill_quick_for_qwen2_5_vl(tmp_path):
    """``--family qwen2.5-vl``: 448 px images (16 x 16 = 256 merged tokens); the budget is the percent
    of each image's merged tokens kept (25 = 0.20 + 0.05 = 51 + 12 = 63)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--quick", "--threads", "1", "--family", "qwen2.5-vl", "--budgets", "100,25"]
    for script, extra in (("bench_train.py", ["--steps", "1"]), ("bench_prefill.py", ["--new-tokens", "2"])):
        out = tmp_path / script.replace(".py", ".json")
        cmd = [sys.executable, str(ROOT / "scripts" / script), *common, *extra, "--out", str(out)]
        warm_python.run(cmd, check=True, env=env, cwd=ROOT, timeout=600)
        stock, small = json.loads(out.read_text())
        assert (stock["tokens"], small["tokens"]) == (100, 25)
        assert (stock["image_tokens"], small["image_tokens"]) == (256, 63)
        assert small["image_tokens"] < stock["image_tokens"] == small["stock_image_tokens"]
        length = "seq_len" if script == "bench_train.py" else "prompt_len"
        assert stock[length] - small[length] == 256 - 63  # the LLM sees the compressed count
        assert (small.get("ideal_speedup") or small["ideal_prefill_speedup"]) > 1.2
        assert stock["split"] is None and small["split"] == [0.2, 0.05]
        assert "(25%)" in out.with_suffix(".md").read_text()
    train = json.loads((tmp_path / "bench_train.json").read_text())
    assert train[1]["peak_above_resident_mb"] < train[0]["peak_above_resident_mb"]


def test_qwen2_5_vl_7b_size_builds_on_meta_and_is_refused_on_cpu():
    """The Qwen2.5-VL-7B size has the released model's shapes (checked on meta); the scripts refuse
    it on a CPU with one line instead of allocating 16 GB."""
    from visionzip_core.bench.budgets import image_plan
    from visionzip_core.bench.random_models import build_random_model
    from visionzip_core.bench.sizes import size_error
    from visionzip_core.families.qwen_bench import QWEN_SIZES

    size = QWEN_SIZES["qwen2.5-vl-7b"]
    model = build_random_model(size, "meta", family="qwen2.5-vl")
    cfg = model.config
    v = cfg.vision_config
    assert (v.depth, v.hidden_size, v.num_heads, v.intermediate_size, v.out_hidden_size) == (
        32,
        1280,
        16,
        3420,
        3584,
    )
    assert v.window_size == 112
    assert v.fullatt_block_indexes == [7, 15, 23, 31]
    t = cfg.text_config
    heads = (t.num_attention_heads, t.num_key_value_heads)
    assert (t.num_hidden_layers, t.hidden_size, *heads) == (28, 3584, 28, 4)
    assert (t.intermediate_size, t.vocab_size) == (18944, 152064)
    # Qwen2.5-VL-7B-Instruct: 8.29B parameters (7.6B LLM with untied head + 0.68B vision).
    assert 8.2e9 < sum(p.numel() for p in model.parameters()) < 8.4e9
    assert [image_plan(cfg, "qwen2.5-vl", k).llm for k in (100, 70, 50, 25)] == [256, 178, 127, 63]
    assert "GPU size" in size_error("qwen2.5-vl", "qwen2.5-vl-7b", "cpu")
    assert size_error("qwen2.5-vl", "qwen2.5-vl-7b", "cuda") is None
    assert "not a qwen2.5-vl size" in size_error("qwen2.5-vl", "llava-1.5-7b", "cpu")
    for script in ("bench_train.py", "bench_prefill.py"):
        cmd = [sys.executable, str(ROOT / "scripts" / script), "--family", "qwen2.5-vl"]
        done = warm_python.run(
            [*cmd, "--size", "qwen2.5-vl-7b", "--device", "cpu"], capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 2 and "is a GPU size" in done.stderr
