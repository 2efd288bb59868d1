"""What a multi-GPU bf16 run needs from the trainer, checked on CPU: the filled DeepSpeed config,
environment defaults, device copies, host reads per optimizer step, and the collective timeout.
What only a GPU can show is in scripts/gpu_check.py (README, "GPU notes").

pytest tests/test_train_hardware.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import warm_python

from visionzip_core.training.config_loading import load_config

REPO = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    return env | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)} | extra


# --- DeepSpeed config, optimizer, environment --------------------------------------------------


@pytest.mark.parametrize(
    "ds_json,precision,expected",
    [
        ("zero2.json", "bf16", "fp32"),
        ("zero3.json", "bf16", "fp32"),
        ("zero2.json", "fp32", None),
    ],
)
def test_bf16_runs_accumulate_gradients_in_fp32(ds_json, precision, expected):
    from visionzip_core.training.deepspeed_config import fill_deepspeed_config

    settings = load_config(REPO / "configs/demo.yaml", [f"deepspeed.config=configs/deepspeed/{ds_json}"])
    cfg = fill_deepspeed_config(settings, 2, precision, 64)
    assert cfg.get("data_types", {}).get("grad_accum_dtype") == expected


def test_a_json_that_names_its_own_grad_accum_dtype_keeps_it(tmp_path):
    import json

    from visionzip_core.training.deepspeed_config import fill_deepspeed_config

    own = json.loads((REPO / "configs/deepspeed/zero2.json").read_text()) | {
        "data_types": {"grad_accum_dtype": "bf16"}
    }
    path = tmp_path / "own.json"
    path.write_text(json.dumps(own))
    settings = load_config(REPO / "configs/demo.yaml", [f"deepspeed.config={path}"])
    assert fill_deepspeed_config(settings, 1, "bf16", 64)["data_types"]["grad_accum_dtype"] == "bf16"


def test_adamw_is_fused_on_cuda_and_the_plain_loop_on_cpu():
    from visionzip_core.training.optimization import build_optimizer

    settings = load_config(REPO / "configs/demo.yaml", [])
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2, 2))], "lr": 1e-3, "weight_decay": 0.0}]
    assert build_optimizer(groups, settings.optim, fused=True).defaults["fused"] is True
    assert not build_optimizer(groups, settings.optim, fused=False).defaults["fused"]


ENV_DEFAULTS = """
import os, sys
from visionzip_core.training import distributed as dist
dist.set_env_defaults()
dist.apply_backend_settings(tf32=sys.argv[1] == "true")
import torch
print(os.environ.get("PYTORCH_ALLOC_CONF"), os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
      torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
"""


@pytest.mark.parametrize(
    "user,tf32,expected",
    [
        ({}, "true", "expandable_segments:True None tf32 tf32"),
        (
            {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"},
            "false",
            "None max_split_size_mb:128 ieee ieee",
        ),
        (
            {"PYTORCH_ALLOC_CONF": "garbage_collection_threshold:0.8"},
            "true",
            "garbage_collection_threshold:0.8 None tf32 tf32",
        ),
    ],
)
def test_allocator_and_tf32_defaults_keep_the_users_own_settings(user, tf32, expected):
    env = {k: v for k, v in _env().items() if k not in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}
    done = subprocess.run(
        [sys.executable, "-c", ENV_DEFAULTS, tf32],
        env=env | user,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[-2] == expected


def test_new_config_keys_default_to_tf32_and_a_long_collective_timeout():
    t = load_config(REPO / "configs/demo.yaml", []).train
    assert t.tf32 is True and t.collective_timeout_min >= 60


# --- batches to the device ---------------------------------------------------------------------


def test_batch_to_device_casts_pixels_but_never_frame_timing():
    from visionzip_core.training.dataloaders import batch_to_device

    batch = {
        "input_ids": torch.tensor([[1, 2, 3]]),
        "pixel_values": torch.rand(4, 3, dtype=torch.float32),
        "pixel_values_videos": torch.rand(4, 3, dtype=torch.float32),
        "second_per_grid_ts": torch.tensor([1 / 3, 0.5], dtype=torch.float64),
        "video_grid_thw": torch.tensor([[2, 2, 2]]),
    }
    out = batch_to_device(batch, torch.device("cpu"), torch.bfloat16)
    assert out["pixel_values"].dtype == out["pixel_values_videos"].dtype == torch.bfloat16
    assert out["second_per_grid_ts"].dtype == torch.float64
    assert torch.equal(out["second_per_grid_ts"], batch["second_per_grid_ts"])
    assert out["input_ids"].dtype == out["video_grid_thw"].dtype == torch.long


# --- one host read of the loss per optimizer step ----------------------------------------------


class OnDevice(torch.Tensor):
    """Stands for a tensor on an accelerator: every read of its value by the host is counted."""

    reads = 0
    HOST_READS = {
        torch.Tensor.item,
        torch.Tensor.tolist,
        torch.Tensor.numpy,
        torch.Tensor.__float__,
        torch.Tensor.__int__,
        torch.Tensor.__bool__,
        torch.Tensor.__index__,
    }

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in cls.HOST_READS:
            OnDevice.reads += 1
        return super().__torch_function__(func, types, args, kwargs or {})


class FakeEngine:
    """The parts of a DeepSpeed engine ``train_step`` uses, around a tiny linear model."""

    def __init__(self):
        self.module = torch.nn.Linear(3, 1)
        self.skipped_steps = 0
        self.lr_scheduler = SimpleNamespace(get_last_lr=lambda: [1e-3])

    def __call__(self, input_ids, labels, attention_mask=None, **_):
        loss = self.module(input_ids.float()).pow(2).mean()
        return SimpleNamespace(loss=loss.as_subclass(OnDevice))

    def backward(self, loss):
        loss.backward()

    def step(self):
        pass

    def get_global_grad_norm(self):
        return None


def _finetune_module():
    from visionzip_core.training import recipe

    return recipe


def test_a_training_step_reads_the_loss_to_the_host_once_whatever_the_accumulation():
    from visionzip_core.training.hooks import TrainHooks

    finetune = _finetune_module()
    run = SimpleNamespace(
        engine=FakeEngine(),
        state=SimpleNamespace(step=0, nonfinite_steps=0),
        settings=SimpleNamespace(train=SimpleNamespace(max_nonfinite_steps=0)),
        hooks=TrainHooks(),
        device=torch.device("cpu"),
        dtype=torch.float32,
        group_names=["projector"],
    )
    micro = [
        {
            "input_ids": torch.full((2, 3), i + 1),
            "labels": torch.ones(2, 3, dtype=torch.long),
            "attention_mask": torch.ones(2, 3, dtype=torch.long),
            "sample_index": [2 * i, 2 * i + 1],
        }
        for i in range(4)
    ]
    with torch.no_grad():
        expected = sum(float(run.engine.module(b["input_ids"].float()).pow(2).mean()) for b in micro) / len(
            micro
        )
    OnDevice.reads = 0
    stats = finetune.train_step(run, micro)
    assert OnDevice.reads == 1, f"{OnDevice.reads} host reads of the loss in one step of 4 micro-batches"
    assert stats["loss"] == pytest.approx(expected, rel=1e-6)
    assert (stats["samples"], stats["tokens"], stats["slots"]) == (8, 24, 24)


# --- the collective timeout --------------------------------------------------------------------

SLOW_RANK0 = """
import os, sys, time
from datetime import timedelta
from visionzip_core.training import distributed as dist
dist.set_env_defaults()
dist.init(timeout=timedelta(seconds=float(sys.argv[1])))
if dist.is_main():
    time.sleep(float(sys.argv[2]))  # rank 0 alone preflights the data: the others wait
try:
    dist.barrier()
    print("waited", flush=True)
except Exception as err:
    print("timed out:", type(err).__name__, flush=True)
    os._exit(1)  # a broken group can hang a normal exit in gloo's threads
dist.shutdown()
"""


def _two_ranks(tmp_path: Path, timeout_s: float, sleep_s: float) -> subprocess.CompletedProcess:
    """SLOW_RANK0 on two ranks (torchrun's workers, forked warm: both start at once)."""
    script = tmp_path / "slow_rank0.py"
    script.write_text(SLOW_RANK0)
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2"]
    return warm_python.run(
        [*torchrun, str(script), str(timeout_s), str(sleep_s)],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=240,
        warm_ranks=True,
    )


@pytest.mark.slow
def test_ranks_wait_for_a_slow_rank0_as_long_as_the_configured_timeout(tmp_path):
    """Rank 0 sleeps 8 s before a collective: a 4 s timeout fails the waiting rank there (as
    DeepSpeed's 10-minute default did for a first run on a large dataset), and the failed rank
    stops the run; a 30 s timeout lets both go on. (The short one is not shorter: the two processes
    must first meet within it at start-up.)"""
    short = _two_ranks(tmp_path, timeout_s=4, sleep_s=8)
    assert short.returncode != 0 and "timed out" in short.stdout, short.stderr[-2000:]
    long = _two_ranks(tmp_path, timeout_s=30, sleep_s=8)
    assert long.returncode == 0 and long.stdout.count("waited") == 2, long.stderr[-2000:]


def test_the_entry_point_passes_the_configured_timeout_to_the_process_group():
    text = (REPO / "visionzip_core/training/recipe.py").read_text()
    assert "timeout=timedelta(minutes=settings.train.collective_timeout_min)" in text


# --- the GPU check ------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the check runs for real")
def test_gpu_check_skips_in_one_line_without_cuda():
    done = subprocess.run(
        [sys.executable, "scripts/gpu_check.py"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: skipped, no CUDA device"), done.stdout
