"""bf16 end to end on CPU, through the real entry point and DeepSpeed's CPU accelerator: ZeRO-2,
ZeRO-3 and LoRA train with a finite, falling loss that starts where the fp32 run's does (bf16
also switches DeepSpeed's gradient accumulation to fp32, see deepspeed_config.py).

pytest -m slow tests/test_train_bf16.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from test_train_e2e import _base, train

pytestmark = pytest.mark.slow

RUNS = {
    "zero2": ["deepspeed.config=configs/deepspeed/zero2.json"],
    "zero3": ["deepspeed.config=configs/deepspeed/zero3.json"],
    "lora": ["train.mode=lora", "lora.r=4", "lora.alpha=8", "optim.lr_llm=1e-2"],
}


def _losses(model_dir: Path, out: Path, extra: list[str], precision: str) -> list[float]:
    overrides = _base(model_dir, out) + [
        f"train.precision={precision}",
        "train.max_steps=6",
        "train.grad_accum_steps=2",
        "train.per_device_batch_size=2",
        "train.save_steps=1000",
        "optim.warmup_ratio=0",
        "export.enabled=false",
        *extra,
    ]
    proc = train(overrides)
    assert f"precision={precision}" in proc.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.parametrize("kind", list(RUNS))
def test_bf16_trains_like_fp32(tiny_llava_dir, tmp_path, kind):
    bf16 = _losses(tiny_llava_dir, tmp_path / "bf16", RUNS[kind], "bf16")
    assert len(bf16) == 6 and all(isinstance(x, float) and math.isfinite(x) for x in bf16), bf16
    assert min(bf16[-2:]) < bf16[0], f"bf16 loss did not fall: {bf16}"
    if kind == "zero2":  # one fp32 reference: the same data and seed, so the first loss agrees closely
        fp32 = _losses(tiny_llava_dir, tmp_path / "fp32", RUNS[kind], "fp32")
        assert bf16[0] == pytest.approx(fp32[0], rel=0.03), (bf16, fp32)
        assert bf16[-1] == pytest.approx(fp32[-1], rel=0.15), (bf16, fp32)
