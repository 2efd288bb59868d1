"""Checkpoints never run code, and a damaged one is named (and passed over by ``resume: auto``).

    pytest tests/test_checkpoint_safety.py            # unit tests, seconds
    pytest -m slow tests/test_checkpoint_safety.py    # the real entry point, ~2-3 minutes

The crafted files are real pickles whose ``__reduce__`` would create a marker file when unpickled
with ``weights_only=False``, as DeepSpeed's own loader does.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from test_train_e2e import _base, final_weights, train

from visionzip_core.training import checkpointing
from visionzip_core.training.checkpointing import CheckpointError, safe_torch_load, verify_checkpoint


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: a stand-in for any command."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _craft(path: Path, marker: Path) -> None:
    """Overwrite ``path`` with a state dict that looks normal but carries the payload."""
    torch.save({"module": {"w": torch.zeros(2)}, "extra": _Payload(marker)}, path)


def test_safe_load_refuses_a_pickle_with_code_and_the_marker_is_never_written(tmp_path):
    marker = tmp_path / "MARKER"
    _craft(tmp_path / "evil.pt", marker)
    with pytest.raises(CheckpointError) as err:
        safe_torch_load(tmp_path / "evil.pt")
    assert err.value.unsafe and str(tmp_path / "evil.pt") in str(err.value) and "\n" not in str(err.value)
    assert "holds io.open" in str(err.value)
    assert not marker.exists()


def test_safe_load_reads_deepspeed_state_classes(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    state = {"zero_stage": ZeroStageEnum.gradients, "loss_scaler": LossScaler(1.0), "t": torch.ones(3)}
    torch.save(state, tmp_path / "optim.pt")
    loaded = safe_torch_load(tmp_path / "optim.pt")
    assert loaded["zero_stage"] == ZeroStageEnum.gradients and loaded["loss_scaler"].cur_scale == 1.0
    assert torch.equal(loaded["t"], torch.ones(3))


def test_truncated_file_is_one_line_naming_it(tmp_path):
    torch.save({"w": torch.randn(1000)}, tmp_path / "x.pt")
    data = (tmp_path / "x.pt").read_bytes()
    (tmp_path / "x.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        safe_torch_load(tmp_path / "x.pt")
    assert not err.value.unsafe and str(tmp_path / "x.pt") in str(err.value)
    assert "truncated" in str(err.value) and "\n" not in str(err.value)


def test_engine_instance_is_adapted_and_the_class_is_not(tmp_path):
    from types import SimpleNamespace

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    original = TorchCheckpointEngine.load
    engine = SimpleNamespace(checkpoint_engine=TorchCheckpointEngine())
    checkpointing.use_safe_loading(engine)
    marker = tmp_path / "MARKER"
    _craft(tmp_path / "evil.pt", marker)
    with pytest.raises(CheckpointError):
        engine.checkpoint_engine.load(str(tmp_path / "evil.pt"), map_location="cpu")
    assert not marker.exists()
    assert TorchCheckpointEngine.load is original and "load" not in vars(TorchCheckpointEngine())


def _fake_checkpoint(root: Path, step: int) -> Path:
    path = root / f"checkpoint-{step}"
    (path / "engine").mkdir(parents=True)
    torch.save(
        {"module": {"w": torch.full((4,), float(step))}}, path / "engine" / "mp_rank_00_model_states.pt"
    )
    torch.save(checkpointing.rng_state(), path / "rng_state_rank0.pt")
    (path / "trainer_state.json").write_text(f'{{"step": {step}}}')
    (path / "COMPLETE").write_text("")
    return path


def test_resume_auto_falls_back_past_a_truncated_checkpoint_and_warns(tmp_path):
    older, newer = _fake_checkpoint(tmp_path, 2), _fake_checkpoint(tmp_path, 4)
    f = newer / "engine" / "mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[:100])
    warnings = []
    assert checkpointing.resolve_resume("auto", tmp_path, warn=warnings.append) == older
    assert len(warnings) == 1 and str(f) in warnings[0] and str(older) in warnings[0]
    with pytest.raises(CheckpointError, match="truncated"):  # a path given explicitly must be usable
        checkpointing.resolve_resume(str(newer), tmp_path)


def test_resume_auto_never_falls_back_past_a_file_with_code(tmp_path):
    _fake_checkpoint(tmp_path, 2)
    newer = _fake_checkpoint(tmp_path, 4)
    marker = tmp_path / "MARKER"
    _craft(newer / "engine" / "mp_rank_00_model_states.pt", marker)
    with pytest.raises(CheckpointError, match="refused") as err:
        checkpointing.resolve_resume("auto", tmp_path, warn=print)
    assert err.value.unsafe and not marker.exists()


def test_a_checkpoint_with_no_older_one_to_fall_back_to_is_an_error(tmp_path):
    only = _fake_checkpoint(tmp_path, 2)
    (only / "rng_state_rank0.pt").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(CheckpointError, match="no older complete checkpoint"):
        checkpointing.resolve_resume("auto", tmp_path, warn=print)
    with pytest.raises(CheckpointError):
        verify_checkpoint(only)


# --- the real entry point ---------------------------------------------------------------------

_ZERO = {
    2: ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    3: ("zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
}


@pytest.fixture(scope="module")
def trained_runs(base_run, tiny_llava_dir, tmp_path_factory):
    """``{stage: output_dir}``: 4 steps with checkpoints at 2 and 4, under ZeRO-2 (the session's
    ``base_run``: demo.yaml's zero2.json) and ZeRO-3."""
    out = tmp_path_factory.mktemp("zero3") / "run"
    train(_base(tiny_llava_dir, out) + ["deepspeed.config=configs/deepspeed/zero3.json"])
    return {2: base_run, 3: out}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("kind", ["model", "optim"])
def test_resume_refuses_crafted_engine_states(trained_runs, tiny_llava_dir, tmp_path, stage, kind):
    out = tmp_path / "run"
    shutil.copytree(trained_runs[stage], out)
    shutil.rmtree(out / "final")
    name = _ZERO[stage][0 if kind == "model" else 1]
    target = out / "checkpoint-4" / "engine" / name
    assert target.is_file(), sorted(p.name for p in target.parent.iterdir())
    marker = tmp_path / "MARKER"
    _craft(target, marker)
    proc = train(
        _base(tiny_llava_dir, out)
        + [f"deepspeed.config=configs/deepspeed/zero{stage}.json", "train.max_steps=6"],
        expect=2,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(target) in errors[0] and "refused" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not marker.exists()
    assert not (out / "final").exists()


@pytest.mark.slow
def test_truncated_newest_checkpoint_resumes_from_the_older_one_with_exact_weights(
    trained_runs, tiny_llava_dir, tmp_path
):
    out = tmp_path / "run"
    shutil.copytree(trained_runs[2], out)
    shutil.rmtree(out / "final")
    target = out / "checkpoint-4" / "engine" / _ZERO[2][1]
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 3])
    proc = train(_base(tiny_llava_dir, out) + ["deepspeed.config=configs/deepspeed/zero2.json"])
    assert str(target) in proc.stdout and f"previous checkpoint {out}/checkpoint-2" in proc.stdout
    assert f"resumed from {out}/checkpoint-2" in proc.stdout
    # steps 3-4 trained again from checkpoint-2 give the weights the unbroken run exported
    a, b = final_weights(trained_runs[2]), final_weights(out)
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
