"""Unusable weights are refused with one line naming the file and tensor, never loaded silently.

    pytest tests/test_weight_checks.py               # unit tests and scripts/generate.py, ~30 s
    pytest -m slow tests/test_weight_checks.py       # train/finetune.py from a damaged folder

Each damaged folder is a copy of a real export (``save_pretrained`` of the tiny LLaVA with
VisionZip settings) with one thing changed; the undamaged copy must load.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import warm_python
from safetensors.torch import load_file, save_file

from visionzip_core import load_visionzip_model, visionzip
from visionzip_core.weight_checks import WeightsError

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A saved VisionZip export of the tiny LLaVA (12 + 4 tokens), as train/finetune.py writes it."""
    from visionzip_core.testing.tiny import tiny_model

    out = tmp_path_factory.mktemp("export")
    model, processor = tiny_model("llava-1.5")
    visionzip(model, dominant=12, contextual=4)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _damaged(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    edit(dst / WEIGHTS)
    return dst


def _rewrite(change):
    def edit(path: Path) -> None:
        tensors = load_file(str(path))
        change(tensors)
        save_file(tensors, str(path), metadata={"format": "pt"})

    return edit


def _key(tensors: dict, part: str) -> str:
    return next(k for k in sorted(tensors) if part in k)


def _delete(tensors):
    del tensors[_key(tensors, "layers.0.mlp.up_proj.weight")]


def _extra(tensors):
    tensors["model.language_model.layers.0.mlp.extra.weight"] = torch.zeros(2, 2)


def _nan(tensors):
    tensors[_key(tensors, "layers.1.self_attn.q_proj.weight")][0, 0] = float("nan")


def _inf(tensors):
    tensors[_key(tensors, "multi_modal_projector.linear_2.bias")][3] = float("inf")


def _reshape(tensors):
    k = _key(tensors, "multi_modal_projector.linear_2.bias")
    tensors[k] = torch.zeros(tensors[k].numel() + 1)


def _truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])


def _bad_header(path: Path):
    data = bytearray(path.read_bytes())
    data[8:40] = b"{" * 32
    path.write_bytes(bytes(data))


CASES = {
    "deleted": (_rewrite(_delete), "lacks tensor model.language_model.layers.0.mlp.up_proj.weight"),
    "unexpected": (_rewrite(_extra), "holds tensor model.language_model.layers.0.mlp.extra.weight"),
    "nan": (_rewrite(_nan), "layers.1.self_attn.q_proj.weight holds 1 NaN/inf"),
    "inf": (_rewrite(_inf), "multi_modal_projector.linear_2.bias holds 1 NaN/inf"),
    "shape": (_rewrite(_reshape), "multi_modal_projector.linear_2.bias has shape"),
    "truncated": (_truncate, "not a readable safetensors file (truncated or corrupt"),
    "bad_header": (_bad_header, "not a readable safetensors file (truncated or corrupt"),
}


def test_the_undamaged_export_loads(export_dir):
    model = load_visionzip_model(export_dir)
    assert model.config.visionzip["dominant"] == 12


@pytest.mark.parametrize("case", sorted(CASES))
def test_load_visionzip_model_refuses_damaged_weights(export_dir, tmp_path, case):
    edit, expected = CASES[case]
    folder = _damaged(export_dir, tmp_path / case, edit)
    with pytest.raises(WeightsError) as err:
        load_visionzip_model(folder)
    message = str(err.value)
    assert expected in message and "\n" not in message
    assert str(folder / WEIGHTS) in message


def test_tied_embeddings_absent_from_the_file_are_not_refused(tmp_path):
    from transformers import LlavaForConditionalGeneration

    from visionzip_core.testing.tiny import tiny_model
    from visionzip_core.weight_checks import load_checked

    model, _ = tiny_model("llava-1.5")
    model.config.tie_word_embeddings = model.config.text_config.tie_word_embeddings = True
    model = LlavaForConditionalGeneration(model.config)  # built tied
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / WEIGHTS))
    assert not any("lm_head" in k for k in saved)  # the tie is not stored
    loaded = load_checked(LlavaForConditionalGeneration, tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()


def test_both_key_layouts_load(export_dir, tmp_path):
    """Keys as transformers 4.x wrote them and as 5.x names the modules; both are remapped on load."""
    from transformers import LlavaForConditionalGeneration

    from visionzip_core.weight_checks import load_checked

    reference = load_file(str(export_dir / WEIGHTS))

    def v5_names(tensors):
        renamed = {}
        for k, v in tensors.items():
            k = k.replace("language_model.model.", "model.language_model.")
            k = k.replace("language_model.lm_head.", "lm_head.")
            k = k.replace("vision_tower.vision_model.", "model.vision_tower.")
            if k.startswith(("vision_tower.", "multi_modal_projector.")):
                k = "model." + k
            renamed[k] = v
        tensors.clear()
        tensors.update(renamed)

    folder = _damaged(export_dir, tmp_path / "v5", _rewrite(v5_names))
    assert set(load_file(str(folder / WEIGHTS))) != set(reference)
    for path in (export_dir, folder):
        model = load_checked(LlavaForConditionalGeneration, path)
        state = model.state_dict()
        assert torch.equal(
            state["model.multi_modal_projector.linear_1.weight"],
            reference[_key(reference, "linear_1.weight")],
        )


def _generate(model: Path) -> subprocess.CompletedProcess:
    return warm_python.run(
        [sys.executable, "scripts/generate.py", "--model", str(model), "--max-new-tokens", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("case", ["deleted", "nan", "truncated"])
def test_generate_script_refuses_damaged_weights_with_exit_2(export_dir, tmp_path, case):
    edit, expected = CASES[case]
    folder = _damaged(export_dir, tmp_path / case, edit)
    proc = _generate(folder)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last and str(folder / WEIGHTS) in last
    assert "Traceback" not in proc.stderr and "generated:" not in proc.stdout


def test_generate_script_runs_on_the_undamaged_export(export_dir):
    proc = _generate(export_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "visual tokens per image: 16 of 64" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("case", ["deleted", "nan"])
def test_stage2_training_refuses_damaged_start_weights_before_loading(export_dir, tmp_path, case):
    from test_train_e2e import _base, train

    edit, expected = CASES[case]
    folder = _damaged(export_dir, tmp_path / case, edit)
    out = tmp_path / "run"
    proc = train(_base(folder, out), expect=2)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0] and str(folder / WEIGHTS) in errors[0], proc.stderr[
        -3000:
    ]
    assert "Traceback" not in proc.stderr and not list(out.glob("checkpoint-*"))
