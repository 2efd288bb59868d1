"""The download layouts users bring (tests/real_layouts.py), through the users' own paths.

Stage 1 from a whole CLIPModel ``.bin`` and a sharded-``.bin`` Vicuna; stage 2 and training-free
inference from a llava-hf folder saved by transformers 4.x; one clear line for a folder that
cannot work, before any weights load.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import warm_python
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def test_the_4x_llava_folder_loads_to_its_own_weights(llava_hf_4x_dir):
    """transformers 5 maps the 4.x keys and config onto today's classes: nothing missing, nothing
    unexpected, every tensor equal to the file's (so the stand-in really is in the old layout)."""
    from real_layouts import to_4x_key
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    saved = load_file(str(llava_hf_4x_dir / "model.safetensors"))
    assert any(k.startswith("language_model.model.layers.") for k in saved)
    assert any(k.startswith("vision_tower.vision_model.") for k in saved)
    assert "image_token_index" in json.loads((llava_hf_4x_dir / "config.json").read_text())
    model, info = LlavaForConditionalGeneration.from_pretrained(llava_hf_4x_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    state = model.state_dict()
    assert len(state) == len(saved) and all(torch.equal(saved[to_4x_key(k)], v) for k, v in state.items())
    processor = LlavaProcessor.from_pretrained(llava_hf_4x_dir)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id


def test_processor_from_full_clip_folder(full_clip_dir, tmp_path):
    """The patch size comes from the vision sub-config of a full CLIP folder; its own CLIP tokenizer
    files are left alone (the LLM's tokenizer is used)."""
    from transformers import AutoConfig, AutoTokenizer

    from visionzip_core.families import stage1_family
    from visionzip_core.testing.tokenizers import write_sentencepiece_tokenizer

    assert AutoConfig.from_pretrained(full_clip_dir).model_type == "clip"
    assert type(AutoTokenizer.from_pretrained(full_clip_dir)).__name__.startswith("CLIPTokenizer")
    llm = write_sentencepiece_tokenizer(tmp_path / "llm")
    processor = stage1_family().assemble_processor(str(full_clip_dir), str(llm), trust_remote_code=False)
    assert processor.patch_size == 14
    assert processor.tokenizer.convert_tokens_to_ids("<image>") is not None


def test_tower_config_readers_accept_a_full_clip_config(full_clip_dir):
    """Every reader of the tower's shape works on ``CLIPConfig`` (vision fields one level down)."""
    from transformers import AutoConfig

    from visionzip_core.families import stage1_family
    from visionzip_core.families.llava import vision_tower_config
    from visionzip_core.training.input_checks import _visionzip_fits

    config = AutoConfig.from_pretrained(full_clip_dir)
    vision = vision_tower_config(config)
    assert vision.image_size == 112 and vision.patch_size == 14
    family = stage1_family()
    assert family.tower_tokens(config) == family.tower_tokens(vision) == 65
    assert family.vision_layers(config) == 3 and family.feature_layer(config) == -2
    assert _visionzip_fits(_vz(12, 4), family, config) == []
    assert any("exceeds the 65 tokens" in p for p in _visionzip_fits(_vz(60, 10), family, config))


def _vz(dominant: int, contextual: int):
    from visionzip_core.training.schema import VisionZipSettings

    return VisionZipSettings(dominant=dominant, contextual=contextual)


def _stage1(clip: Path, llm: Path, out: Path) -> list[str]:
    from test_train_e2e import _base

    return _base(Path("unused"), out)[1:] + [
        "train.mode=pretrain",
        "model.name_or_path=null",
        f"model.vision_tower={clip}",
        f"model.language_model={llm}",
        "data.template=plain",
        "data.train=[{path: data/demo/pretrain_train.json, image_folder: data/demo/images}]",
        "data.val=[]",
    ]


@pytest.mark.slow
def test_pretrain_from_full_clip_bin_and_sharded_bin_vicuna(full_clip_dir, vicuna_dir, tmp_path):
    """Stage 1 through the real entry point on folders laid out like the LLaVA-1.5 downloads, under
    ZeRO-3 (the weights load into partitions; ZeRO-2 stage 1 is test_train_e2e.py's pretrain test),
    then stage 2 from its export."""
    from test_train_e2e import _base, train

    out = tmp_path / "run"
    train(_stage1(full_clip_dir, vicuna_dir, out) + ["deepspeed.config=configs/deepspeed/zero3.json"])
    new = load_file(str(out / "final/model.safetensors"))
    clip = torch.load(full_clip_dir / "pytorch_model.bin", weights_only=True)
    vision = {n: v for n, v in new.items() if "vision_tower" in n and "layers.0.self_attn.q_proj.weight" in n}
    assert len(vision) == 1, sorted(vision)
    k = "vision_model.encoder.layers.0.self_attn.q_proj.weight"
    assert torch.equal(
        clip[k], next(iter(vision.values())).to(clip[k].dtype)
    )  # CLIP's vision weights, untouched
    assert not any("text_model" in n or "text_projection" in n for n in new)  # the text tower is left out

    # Stage 2 starts from the stage-1 export.
    stage2 = tmp_path / "stage2"
    train(_base(out / "final", stage2) + ["train.mode=finetune"])
    assert (stage2 / "final/model.safetensors").is_file()


def _generate_cli(model: Path, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "scripts/generate.py"), "--model", str(model), "--max-new-tokens", "3"]
    return warm_python.run(cmd + list(flags), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["projector", "finetune", "lora"])
def test_stage2_modes_on_a_4x_llava_folder_export_load_and_generate(llava_hf_4x_dir, tmp_path, mode):
    """projector / finetune / lora from a llava-hf folder in 4.x's layout, then the export loads with
    load_visionzip_model and generates through scripts/generate.py. finetune runs under ZeRO-3 (the
    4.x weights load into partitions); the other modes under demo.yaml's ZeRO-2."""
    from real_layouts import to_4x_key
    from test_train_e2e import _base, train

    from visionzip_core import load_visionzip_model

    out = tmp_path / "run"
    extra = {
        "lora": ["lora.r=4", "lora.alpha=8", "optim.lr_llm=1e-2"],
        "finetune": ["deepspeed.config=configs/deepspeed/zero3.json"],
    }.get(mode, [])
    train(_base(llava_hf_4x_dir, out) + [f"train.mode={mode}", *extra])
    base = load_file(str(llava_hf_4x_dir / "model.safetensors"))
    model = load_visionzip_model(out / "final")
    new = {to_4x_key(k): v for k, v in model.state_dict().items()}
    assert set(new) == set(base)
    trained = [k for k in base if not torch.equal(base[k], new[k])]
    assert trained, "nothing trained"
    assert all("vision_tower" not in k for k in trained)  # the tower is frozen in every mode
    if mode == "projector":
        assert all(k.startswith("multi_modal_projector.") for k in trained)
        # the projector is also written alone, the export's own values under its names
        saved, projector = (
            load_file(str(out / "final/model.safetensors")),
            load_file(str(out / "final/projector.safetensors")),
        )
        assert set(projector) == {k for k in saved if "multi_modal_projector" in k}
        assert all(torch.equal(saved[k], v) for k, v in projector.items())
    else:
        assert any(k.startswith("language_model.") for k in trained)
    if mode == "lora":  # the adapter beside the merged model: LLM LoRA + the projector, no tower
        adapter = json.loads((out / "final/adapter/adapter_config.json").read_text())
        assert "language_model" in adapter["target_modules"]
        assert adapter["modules_to_save"] == ["multi_modal_projector"]
        lora = load_file(str(out / "final/adapter/adapter_model.safetensors"))
        assert any("lora_A" in k for k in lora) and any("multi_modal_projector" in k for k in lora)
        assert not any("vision_tower" in k and "lora" in k for k in lora)
        merged = load_file(str(out / "final/model.safetensors"))
        assert not any("lora_" in k or "base_layer" in k for k in merged)  # plain llava-hf names
    proc = _generate_cli(out / "final")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "visual tokens per image: 16 of 64" in proc.stdout


@pytest.mark.slow
def test_training_free_generation_on_a_4x_llava_folder(llava_hf_4x_dir):
    proc = _generate_cli(llava_hf_4x_dir, "--dominant", "9", "--contextual", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "visual tokens per image: 12 of 64 (VisionZip dominant 9 + contextual 3)" in proc.stdout


# --- Folders that cannot work: one line naming the folder and the setting, before weights load ---


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _break(case: str, folder: Path) -> None:
    if case == "no weights":
        for f in [*folder.glob("*.safetensors"), *folder.glob("*.bin"), *folder.glob("*.index.json")]:
            f.unlink()
    elif case == "missing shard":
        (folder / "pytorch_model-00002-of-00002.bin").unlink()
    elif case == "no tokenizer":
        for name in ("tokenizer.json", "tokenizer.model"):
            (folder / name).unlink(missing_ok=True)
    elif case == "no config":
        (folder / "config.json").unlink()
    elif case == "no image processor":
        (folder / "preprocessor_config.json").unlink()


FOLDER_CASES = [
    # (slot, case, expected words)
    ("name_or_path", "no weights", "has no weights"),
    ("name_or_path", "no tokenizer", "has no tokenizer"),
    ("name_or_path", "no config", "has no config.json"),
    ("name_or_path", "no image processor", "has no preprocessor_config.json"),
    ("name_or_path", "a Llama folder", "not a model of a supported family"),
    ("language_model", "missing shard", "missing shard(s): pytorch_model-00002-of-00002.bin"),
    ("language_model", "no tokenizer", "has no tokenizer"),
    ("language_model", "a CLIP folder", "not a causal language model"),
    ("vision_tower", "no weights", "has no weights"),
    ("vision_tower", "a Llama folder", "not a CLIP vision tower"),
]


def _config_for(slot: str, case: str, folders: dict[str, Path], tmp_path: Path) -> list[str]:
    src = {"name_or_path": "llava", "language_model": "llm", "vision_tower": "clip"}[slot]
    if case == "a Llama folder":
        src = "llm"
    elif case == "a CLIP folder":
        src = "clip"
    broken = _copy(folders[src], tmp_path / "broken")
    _break(case, broken)
    if slot == "name_or_path":
        return [f"model.name_or_path={broken}"]
    chosen = {"vision_tower": folders["clip"], "language_model": folders["llm"], slot: broken}
    return [
        "train.mode=pretrain",
        "model.name_or_path=null",
        f"model.vision_tower={chosen['vision_tower']}",
        f"model.language_model={chosen['language_model']}",
        "data.template=plain",
    ]


@pytest.fixture
def folders(llava_hf_4x_dir, vicuna_dir, full_clip_dir):
    return {"llava": llava_hf_4x_dir, "llm": vicuna_dir, "clip": full_clip_dir}


@pytest.mark.parametrize("slot,case,words", FOLDER_CASES, ids=[f"{s}-{c}" for s, c, _ in FOLDER_CASES])
def test_an_unusable_model_folder_is_one_problem_naming_its_key(folders, tmp_path, slot, case, words):
    from visionzip_core.training.config_loading import load_config
    from visionzip_core.training.schema import ConfigError

    overrides = _config_for(slot, case, folders, tmp_path) + [f"train.output_dir={tmp_path / 'out'}"]
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs/demo.yaml", overrides, check_files=True)
    found = [p for p in err.value.problems if words in p]
    assert len(found) == 1 and found[0].startswith(f"model.{slot}: "), err.value.problems
    assert str(tmp_path / "broken") in found[0]


def test_a_sentencepiece_only_folder_without_sentencepiece_says_what_to_install(vicuna_dir, monkeypatch):
    import importlib.util

    from visionzip_core.model_folders import check_model_folder

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "sentencepiece" else real(name, *a)
    )
    problems = check_model_folder(vicuna_dir, "llm", "model.language_model")
    assert len(problems) == 1 and "pip install sentencepiece protobuf" in problems[0], problems


@pytest.mark.slow
def test_the_entry_points_refuse_an_unusable_folder_with_exit_2(llava_hf_4x_dir, tmp_path):
    """train/finetune.py, scripts/check_data.py and scripts/generate.py: one line, exit 2."""
    from test_train_e2e import _base, train

    broken = _copy(llava_hf_4x_dir, tmp_path / "broken")
    _break("no weights", broken)
    proc = train(_base(broken, tmp_path / "run"), expect=2)
    assert f"model.name_or_path: {broken} has no weights" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()
    check = warm_python.run(
        [
            sys.executable,
            "scripts/check_data.py",
            "--config",
            "configs/demo.yaml",
            f"model.name_or_path={broken}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert check.returncode == 2 and f"{broken} has no weights" in check.stderr, check.stderr[-2000:]
    gen = _generate_cli(broken)
    assert gen.returncode == 2 and f"--model: {broken} has no weights" in gen.stderr, gen.stderr[-2000:]
    assert "Traceback" not in gen.stderr


class _OpensAFile:
    """Unpickling this creates a file: a stand-in for code hidden in a ``.bin``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_bin_weights_load_without_running_pickled_code(full_clip_dir, tmp_path):
    """``.bin`` weights are read with ``weights_only``: a pickle that calls a function is refused."""
    from transformers import CLIPVisionModel

    folder = _copy(full_clip_dir, tmp_path / "clip")
    marker = tmp_path / "ran"
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    state["extra"] = _OpensAFile(marker)
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(
        pickle.UnpicklingError, match="[Ww]eights only load failed|weights_only|Unsupported global"
    ):
        CLIPVisionModel.from_pretrained(folder)
    assert not marker.exists()
