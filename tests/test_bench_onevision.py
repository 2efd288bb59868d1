"""LLaVA-OneVision's benchmark hooks: the FLOP model against torch's own count of real steps (stock,
and VisionZip with its received-attention score), the released size's shapes on meta and its
one-line refusal on a CPU, and the prefill script end to end."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import warm_python
from torch.utils.flop_counter import FlopCounterMode

from visionzip_core import visionzip
from visionzip_core.bench.budgets import ImagePlan, image_plan, split_config
from visionzip_core.bench.random_models import build_random_model
from visionzip_core.bench.sizes import size_error
from visionzip_core.families import family_for
from visionzip_core.families.flops import TrainableParts
from visionzip_core.families.onevision_bench import onevision_synthetic_batch

ROOT = Path(__file__).resolve().parents[1]
FAMILY = "llava-onevision"


@pytest.mark.parametrize("split", [None, (6, 2)], ids=["stock", "visionzip"])
def test_step_flops_equal_a_counted_real_step(split):
    """Projector training on the quick size with 56 px crops (4 x 4 patches) and a 112 px image (base +
    2 x 2 tiles = 5 crops): the analytic count equals torch's, forward and backward, to the FLOP. Stock
    projects all 5 x 16 patches and the LLM sees 88 (unpadded, newlines); VisionZip adds its
    received-attention ``Q K^T`` per head, similarity and merge, and projects 5 x 8."""
    fam = family_for(FAMILY)
    quick = fam.bench_sizes["cpu"].quick()
    size = replace(quick, vision={**quick.vision, "image_size": 56}, text_tokens=(30, 30))
    model = build_random_model(size, "cpu", family=FAMILY)
    model.set_attn_implementation("eager")
    for name, p in model.named_parameters():
        p.requires_grad_(fam.module_group(name) == "projector")
    image = (112, 112)
    plan = ImagePlan(*fam.token_plan(model.config, split_config(split), image))
    assert plan == (ImagePlan(5, 80, 88) if split is None else ImagePlan(5, 40, 40))
    if split is not None:
        visionzip(model, dominant=split[0], contextual=split[1], feature_layer=-1)
    batch = onevision_synthetic_batch(size, model.config, plan, image)
    with FlopCounterMode(display=False) as forward:
        loss = model(**batch).loss
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    ours = fam.step_flops(
        size, model.config, TrainableParts(), plan, split, samples=1, seq_len=batch["input_ids"].shape[1]
    )
    assert (ours["total"].forward, ours["total"].backward) == (
        forward.get_total_flops(),
        backward.get_total_flops(),
    )
    assert (ours["visionzip"].forward > 0) == (split is not None)


def test_released_size_builds_on_meta_and_is_refused_on_cpu():
    """llava-onevision-qwen2-7b-ov-hf's shapes (built on meta: 8.03B parameters, the download's count;
    SigLIP 26 x 1152, Qwen2-7B); a 768 px image is 5 crops, 3699 stock tokens; the scripts refuse the
    size on a CPU in one line."""
    size = family_for(FAMILY).bench_sizes["llava-onevision-7b"]
    model = build_random_model(size, "meta", family=FAMILY)
    cfg = model.config
    v, t = cfg.vision_config, cfg.text_config
    assert (v.num_hidden_layers, v.hidden_size, v.intermediate_size, v.image_size, v.patch_size) == (
        26,
        1152,
        4304,
        384,
        14,
    )
    assert (t.num_hidden_layers, t.hidden_size, t.num_attention_heads, t.num_key_value_heads) == (
        28,
        3584,
        28,
        4,
    )
    assert len(cfg.image_grid_pinpoints) == 36 and cfg.vision_aspect_ratio == "anyres_max_9"
    assert 8.02e9 < sum(p.numel() for p in model.parameters()) < 8.04e9
    plans = [image_plan(cfg, FAMILY, k) for k in (729, 128, 64, 32)]
    assert [(p.crops, p.llm) for p in plans] == [(5, 3699), (5, 640), (5, 320), (5, 160)]
    assert "GPU size" in size_error(FAMILY, "llava-onevision-7b", "cpu")
    assert size_error(FAMILY, "llava-onevision-7b", "cuda") is None
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--family", FAMILY]
    done = warm_python.run(
        [*cmd, "--size", "llava-onevision-7b", "--device", "cpu"], capture_output=True, text=True, timeout=300
    )
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert done.returncode == 2 and len(errors) == 1 and "is a GPU size" in errors[0]


@pytest.mark.slow
def test_bench_prefill_quick(tmp_path):
    """``--family llava-onevision`` through the prefill script on the smoke size (the real crop and
    image geometry, 64 wide models): the processor built by the family expands a 768 px image to 3699
    stock tokens and 5 x 64 = 320 at 64 per crop."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "prefill.json"
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "bench_prefill.py"),
        "--size",
        "smoke",
        "--rounds",
        "1",
        "--threads",
        "1",
        "--family",
        FAMILY,
    ]
    warm_python.run(
        [*cmd, "--budgets", "729,64", "--new-tokens", "2", "--out", str(out)],
        check=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    stock, small = json.loads(out.read_text())
    assert (stock["image_tokens"], small["image_tokens"]) == (3699, 320)
    assert stock["prompt_len"] - small["prompt_len"] == 3699 - 320
    assert small["ideal_prefill_speedup"] > 3
