"""ZeRO-Offload end to end: two processes, ZeRO-3 with optimizer and parameters on the CPU.

    pytest -m slow tests/test_zero_offload.py     # ~1 minute on 2 cores (+ ~90 s once: CPU Adam compiles)

Offload needs DeepSpeed's CPU Adam (it refuses torch's AdamW); its steps must follow the plain
ZeRO-3 run's (same per-module learning rates and no-decay groups), and a run killed with SIGKILL
must resume to the same weights as an unbroken one.
"""

from __future__ import annotations

import pytest
import torch
from kill_resume import SAVE_STEPS, STEPS, kill_after_checkpoint_2_and_resume
from test_train_e2e import ZERO3_FP32_STEPS, _base, final_weights, metrics, train

from visionzip_core.training.optimization import uses_offload

pytestmark = pytest.mark.slow

COMMON = ZERO3_FP32_STEPS
OFFLOAD = ["deepspeed.config=configs/deepspeed/zero3_offload.json"]


def test_offload_is_recognised_in_either_section():
    assert not uses_offload({"zero_optimization": {"stage": 3}})
    assert not uses_offload({"zero_optimization": {"offload_param": {"device": "none"}}})
    assert uses_offload({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}})
    assert uses_offload({"zero_optimization": {"offload_param": {"device": "nvme"}}})


def test_offload_follows_plain_zero3_and_resumes_exactly_after_sigkill(
    tiny_llava_dir, tmp_path, zero3_two_process_run
):
    offload, killed = tmp_path / "offload", tmp_path / "killed"
    plain, plain_overrides = zero3_two_process_run  # the same run as COMMON, without offload
    assert set(COMMON) <= set(plain_overrides)
    proc = train(_base(tiny_llava_dir, offload) + COMMON + OFFLOAD, "ranks2", timeout=600)
    assert "zero=3 processes=2" in proc.stdout

    a, b = final_weights(plain), final_weights(offload)
    assert set(a) == set(b)
    base = final_weights_of(tiny_llava_dir)
    for key in a:
        # CPU Adam vectorises differently from torch's AdamW: close, not bitwise.
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=2e-5, msg=lambda m, key=key: f"{key}: {m}")
    # finetune mode trains the projector and the LLM (the tower is frozen): the comparison is not vacuous
    trained = [k for k in a if "vision_tower" not in k]
    assert trained and all(not torch.equal(b[k], base[k]) for k in trained)
    losses = [[r["loss"] for r in metrics(d) if "loss" in r] for d in (plain, offload)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-4)

    assert (STEPS, SAVE_STEPS) == (4, 2) and {"train.max_steps=4", "train.save_steps=2"} <= set(COMMON)
    kill_after_checkpoint_2_and_resume(
        _base(tiny_llava_dir, killed) + COMMON + OFFLOAD, killed, tmp_path / "release", launcher="ranks2"
    )
    c = final_weights(killed)
    for key in b:
        # CPU Adam's C++ state keeps beta^t by multiplying once per step and recomputes it with pow()
        # after a load: the resumed run differs in the last bits (seen: 3e-8), as resumes elsewhere.
        torch.testing.assert_close(c[key], b[key], rtol=0, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")


def final_weights_of(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))
