"""The real entry point, end to end, on the tiny LLaVA and the bundled demo data (CPU, a few steps each).

    pytest -m slow tests/test_train_e2e.py        # ~2-3 minutes on 2 cores

Covers finetune and pretrain modes, the deepspeed launcher and torchrun, ZeRO-2 and ZeRO-3 with
two processes, exact resume after SIGKILL, export -> load -> generate, and the NaN guard. The
projector and lora modes of LLaVA-1.5 run in test_real_layouts.py (on the 4.x llava-hf folder) and
LLaVA-NeXT's in test_llava_next_train.py. Runs that several tests read are conftest.py's session
fixtures (``base_run``, ``zero3_two_process_run``, ``wandb_offline_run``, ...).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import warm_python
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled"}
    env.pop("RANK", None)
    env.update(extra)
    return env


def _base(model_dir: Path, out: Path) -> list[str]:
    return [
        f"model.name_or_path={model_dir}",
        f"train.output_dir={out}",
        "train.per_device_batch_size=4",
        "train.max_steps=4",
        "train.save_steps=2",
        "train.eval_steps=null",
        "train.logging_steps=1",
        "data.num_workers=0",
        "wandb.enabled=false",
        # Validation and scoring the export (50 forwards, a model load and 50 generations) are
        # shown by the deepspeed launcher test (DEMO_VAL) and the command matrix; every other run
        # skips those seconds.
        "data.val=[]",
        "eval.generate_accuracy=false",
    ]


# The shared ZeRO-3 run (conftest.py) and the offload runs compared with it (test_zero_offload.py).
ZERO3_FP32_STEPS = [
    "train.precision=fp32",
    "train.per_device_batch_size=2",
    "train.max_steps=4",
    "train.save_steps=2",
    "data.val=[]",
    "optim.weight_decay=0.1",  # so that a lost no-decay group would show in the weights
]


def pretrain_overrides(clip_dir: Path, llm_dir: Path, val: str = "[]") -> list[str]:
    """Stage 1 (``train.mode=pretrain``) on the demo's plain captions, from a CLIP folder and an LLM
    folder; ``val``: ``data.val``'s value."""
    return [
        "train.mode=pretrain",
        "model.name_or_path=null",
        f"model.vision_tower={clip_dir}",
        f"model.language_model={llm_dir}",
        "data.template=plain",
        "data.train=[{path: data/demo/pretrain_train.json, image_folder: data/demo/images}]",
        f"data.val={val}",
    ]


DEMO_VAL = [
    "data.val=[{path: data/demo/instruct_val.json, image_folder: data/demo/images}]",
    "eval.generate_accuracy=true",
]


def _cmd(launcher: str, overrides: list[str]) -> list[str]:
    # debug.* switches are test hooks, injected by tests/hooked_finetune.py, not config keys.
    hooked = ["tests/hooked_finetune.py"] if any(o.startswith("debug.") for o in overrides) else []
    script = [*hooked, "train/finetune.py", "--config", "configs/demo.yaml", *overrides]
    port = ["--master_port", str(warm_python.free_port())]
    if launcher == "python":
        return [sys.executable, *script]
    if launcher == "deepspeed":
        return [str(Path(sys.executable).parent / "deepspeed"), *port, *script]
    if launcher == "deepspeed2":
        return [str(Path(sys.executable).parent / "deepspeed"), *port, "--num_gpus", "2", *script]
    if launcher in ("torchrun2", "ranks2"):
        return [str(Path(sys.executable).parent / "torchrun"), *port, "--nproc_per_node", "2", *script]
    raise ValueError(launcher)


def train(overrides: list[str], launcher: str = "python", expect: int = 0, timeout: int = 600):
    """Run the entry point with ``overrides``. ``python train/finetune.py`` runs forked from a warm
    interpreter (tests/warm_python.py), and so do the two workers of ``ranks2`` (torchrun's command,
    its workers forked warm with the environment torchrun gives them: for tests of two processes,
    not of the launcher); the launchers themselves (``torchrun2``, ``deepspeed``...) start cold."""
    proc = warm_python.run(
        _cmd(launcher, overrides),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        warm_ranks=launcher == "ranks2",
    )
    assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


def _generate(final: Path) -> str:
    from PIL import Image
    from transformers import LlavaForConditionalGeneration

    from visionzip_core import load_visionzip_model, load_visionzip_processor

    plain = LlavaForConditionalGeneration.from_pretrained(final)
    assert plain.config.visionzip["dominant"] == 12
    model = load_visionzip_model(final).eval()
    processor = load_visionzip_processor(final)
    image = Image.open(REPO / "data/demo/images/val_0000.png")
    inputs = processor(
        images=image, text="USER: <image>\nWhat colour is the shape? ASSISTANT:", return_tensors="pt"
    )
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 16  # 12 dominant + 4 contextual
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    return processor.decode(out[0, inputs["input_ids"].shape[1] :])


def test_finetune_via_deepspeed_launcher_exports_a_model_that_loads_and_generates(tiny_llava_dir, tmp_path):
    out = tmp_path / "run"
    proc = train(
        _base(tiny_llava_dir, out) + ["train.max_steps=8", "train.save_total_limit=2", *DEMO_VAL],
        launcher="deepspeed",
    )
    records = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 9))
    for key in (
        "lr",
        "grad_norm",
        "samples_per_s",
        "tokens_per_s",
        "padding_fraction",
        "visual_tokens_per_image",
        "peak_rss_mb",
        "step_time_s",
        "elapsed_s",
    ):
        assert records[0][key] is not None, key
    assert records[0]["visual_tokens_per_image"] == 16 and set(records[0]["lr"]) == {"projector", "llm"}
    assert records[-1]["loss"] < records[0]["loss"]
    assert any("val_loss" in r for r in metrics(out))
    # keep the last K: only checkpoint-6 and checkpoint-8 remain, both complete
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]
    assert all((p / "COMPLETE").is_file() for p in out.glob("checkpoint-*"))
    assert f"model:   {out}/final" in proc.stdout and "metrics:" in proc.stdout and "wandb:" in proc.stdout
    # Outside a terminal: one plain line per logged step, no progress bar redrawn into one long
    # line, and none of the libraries' build notices.
    assert "step 8/8  loss " in proc.stderr and "eta 0:00:00" in proc.stderr
    assert "\r" not in proc.stdout + proc.stderr and "built successfully" not in proc.stdout + proc.stderr
    assert (out / "metrics.png").is_file() and f"plot:    {out}/metrics.png" in proc.stdout
    # eval.generate_accuracy (on here, off in _base): the export's answers scored on data.val after the run
    assert re.search(r"answers: \d\.\d{3} \(\d+/50 first replies exact", proc.stdout), proc.stdout[-2000:]
    # the LLM changed, the frozen vision tower did not
    base = load_file(str(tiny_llava_dir / "model.safetensors"))
    new = final_weights(out)
    vision = [k for k in base if "vision_tower" in k]
    llm = [k for k in base if "language_model" in k and "layers.0.mlp" in k]
    assert vision and all(torch.equal(base[k], new[k]) for k in vision)
    assert llm and not all(torch.equal(base[k], new[k]) for k in llm)
    _generate(out / "final")


def test_pretrain_mode_assembles_llava_from_clip_and_llm(tiny_pretrain_dirs, pretrain_run):
    clip_dir, _ = tiny_pretrain_dirs
    out = pretrain_run  # also test_llava_next_train.py's stage 1
    config = json.loads((out / "final/config.json").read_text())
    assert (
        config["architectures"] == ["LlavaForConditionalGeneration"] and config["visionzip"]["dominant"] == 12
    )
    new = final_weights(out)
    clip = load_file(str(clip_dir / "model.safetensors"))
    k = next(iter(clip))
    assert torch.equal(clip[k], new[f"vision_tower.{k}"])  # the CLIP weights, untouched (llava-hf names)
    assert set(load_file(str(out / "final/projector.safetensors"))) == {
        k for k in new if "multi_modal_projector" in k
    }


def test_zero3_two_processes_under_torchrun(tiny_llava_dir, zero3_two_process_run, tmp_path):
    out, overrides = zero3_two_process_run  # shared with test_zero_offload.py (its plain ZeRO-3 reference)
    assert (out / "checkpoint-4/COMPLETE").is_file()
    state = json.loads((out / "checkpoint-4/trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 4
    assert (out / "checkpoint-4/rng_state_rank1.pt").is_file()
    base, new = load_file(str(tiny_llava_dir / "model.safetensors")), final_weights(out)
    assert set(new) == set(base)  # whole (gathered) weights, not ZeRO-3 partitions
    assert all(new[k].shape == base[k].shape for k in base)
    _export_as_a_rebuilt_model_would(overrides, out, tmp_path / "rebuilt")


def _export_as_a_rebuilt_model_would(overrides: list[str], out: Path, folder: Path) -> None:
    """The ZeRO-3 export writes the gathered weights straight from the trained model; the export it
    replaces rebuilt the model from its folder and loaded the gathered weights into it first. Both
    must write the same files: the same tensors under the same names, the same config. The rebuilt
    model gets the run's last checkpoint (its trained tensors; the frozen ones are the base's)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from visionzip_core.training.checkpointing import ENGINE_TAG
    from visionzip_core.training.config_loading import load_config
    from visionzip_core.training.model_spec import resolve_model_spec
    from visionzip_core.training.modeling import build_model, build_processor

    settings = load_config(REPO / "configs/demo.yaml", overrides)
    spec = resolve_model_spec(settings)
    processor, _ = build_processor(settings, spec)
    rebuilt = build_model(settings, spec, torch.float32, processor, for_export=True)
    trained = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoint-4"), tag=ENGINE_TAG)
    assert trained and not rebuilt.load_state_dict(trained, strict=False).unexpected_keys
    rebuilt.config.use_cache = True
    rebuilt.save_pretrained(folder)
    written, expected = final_weights(out), load_file(str(folder / "model.safetensors"))
    assert set(written) == set(expected)
    assert [k for k in expected if not torch.equal(written[k], expected[k])] == []
    for name in ("config.json", "generation_config.json"):
        assert json.loads((out / "final" / name).read_text()) == json.loads((folder / name).read_text())


def test_zero3_lora_export_merges_the_gathered_adapter(tiny_llava_dir, tmp_path):
    """``lora`` under ZeRO-3: rank 0 writes the adapter and the merged model from the gathered tensors
    (a meta-device model wrapped in the trained adapter's config). The merged weights must be those of
    the base rebuilt from its folder, given the last checkpoint's tensors and merged by peft."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from visionzip_core.training.checkpointing import ENGINE_TAG
    from visionzip_core.training.config_loading import load_config
    from visionzip_core.training.model_spec import resolve_model_spec
    from visionzip_core.training.modeling import build_model, build_processor

    out = tmp_path / "run"
    overrides = _base(tiny_llava_dir, out) + [
        "train.mode=lora",
        "lora.r=4",
        "lora.alpha=8",
        "optim.lr_llm=1e-2",
        "train.max_steps=2",
        "export.merge_lora=true",
        "deepspeed.config=configs/deepspeed/zero3.json",
    ]
    train(overrides)
    assert (out / "final/adapter/adapter_model.safetensors").is_file()
    settings = load_config(REPO / "configs/demo.yaml", overrides)
    spec = resolve_model_spec(settings)
    processor, _ = build_processor(settings, spec)
    rebuilt = build_model(settings, spec, torch.float32, processor, for_export=True)
    trained = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoint-2"), tag=ENGINE_TAG)
    assert trained and not rebuilt.load_state_dict(trained, strict=False).unexpected_keys
    rebuilt.merge_and_unload().save_pretrained(tmp_path / "expected")
    expected = load_file(str(tmp_path / "expected/model.safetensors"))
    written, base = final_weights(out), load_file(str(tiny_llava_dir / "model.safetensors"))
    assert set(written) == set(base)
    assert [k for k in written if not torch.equal(written[k], expected[k])] == []
    assert any(k.startswith("language_model.") and not torch.equal(written[k], base[k]) for k in base)


def test_resume_after_sigkill_matches_an_unbroken_run(tiny_llava_dir, tmp_path):
    common = ["train.max_steps=7", "train.save_steps=3", "train.grad_accum_steps=2", "debug.log_samples=true"]
    unbroken, killed = tmp_path / "unbroken", tmp_path / "killed"
    train(_base(tiny_llava_dir, unbroken) + common)

    cmd = _cmd(
        "python",
        _base(tiny_llava_dir, killed)
        + common
        + [f"debug.hold_until={tmp_path / 'never'}", "debug.hold_from_step=4"],
    )
    proc = warm_python.popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (killed / "checkpoint-3" / "COMPLETE").is_file():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists() and not (killed / "checkpoint-6").exists()
    # kill -9 leaves the lock file behind; the kernel released the lock, so the resume goes ahead.
    assert str(proc.pid) in (killed / ".lock").read_text()
    # An interrupted save: a folder without the marker must be ignored (and cleaned) by resume=auto.
    torn = killed / "checkpoint-6.tmp-0badc0de"
    (torn / "engine").mkdir(parents=True)
    (torn / "engine" / "garbage.pt").write_bytes(b"half-written")

    resumed = train(_base(tiny_llava_dir, killed) + common)
    assert f"resumed from {killed}/checkpoint-3" in resumed.stdout
    assert not torn.exists()

    a, b = final_weights(unbroken), final_weights(killed)
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
    samples = [
        (unbroken / "debug/samples-rank0.jsonl").read_text(),
        (killed / "debug/samples-rank0.jsonl").read_text(),
    ]
    assert samples[0] == samples[1]  # the same samples, in the same order: none skipped or repeated
    losses = [[r["loss"] for r in metrics(d) if "loss" in r] for d in (unbroken, killed)]
    assert len(losses[1]) == 7
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_llava_dir, tmp_path):
    out = tmp_path / "run"
    proc = train(_base(tiny_llava_dir, out) + ["debug.nan_at_step=3"], expect=3)
    assert (
        "loss is nan at step 3" in proc.stderr and f"last good checkpoint: {out}/checkpoint-2" in proc.stderr
    )
    assert (out / "checkpoint-2/COMPLETE").is_file()
    assert not (out / "final").exists() and not list(out.glob("checkpoint-*.tmp-*"))


def train_wandb_offline(model_dir: Path, out: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    """A projector run of ``model_dir`` into ``out`` with a real offline wandb run (not the
    suite's disabled one), ``overrides`` added; asserts it exits 0."""
    args = [o for o in _base(model_dir, out) if not o.startswith("wandb.")]
    args += ["train.mode=projector", "wandb.mode=offline", *overrides]
    env = _env()
    env.pop("WANDB_MODE")
    env.pop("WANDB_API_KEY", None)
    proc = subprocess.run(
        _cmd("python", args), cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_wandb_offline_run_gets_metrics_and_the_projector_artifact(wandb_offline_run):
    out, proc = wandb_offline_run  # shared with test_wandb_overlays.py
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and "offline; upload with `wandb sync" in proc.stdout
    assert list(runs[0].glob("*.wandb"))
