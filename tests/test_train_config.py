"""Training config, DeepSpeed "auto" filling and checkpoint discovery: fast, no weights, no processes.

pytest tests/test_train_config.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from visionzip_core.training import checkpointing
from visionzip_core.training.config_loading import load_config
from visionzip_core.training.deepspeed_config import fill_deepspeed_config
from visionzip_core.training.schema import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_configs_are_found():
    names = {p.name for p in CONFIGS}
    assert "demo.yaml" in names and len(CONFIGS) >= 6, names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_shipped_yaml_validates_and_says_how_to_run_it(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "train/finetune.py --config configs/" in first, first
    assert str(path.relative_to(REPO)) in first
    settings = load_config(path)  # paths may be placeholders: existence is checked at build time
    assert settings.train.save_steps >= 1
    fill_deepspeed_config(settings, world_size=8, precision="bf16", hidden_size=4096)


def test_many_problems_reported_at_once_each_naming_its_key():
    overrides = [
        "train.save_step=3",  # typo
        "train.save_steps=0",  # out of range
        "optim.lr_llm=fast",  # wrong type
        "train.mode=pretrain",  # contradiction: a whole model (demo.yaml's name_or_path) under pretrain
        "lora.r=8",  # contradiction: lora settings without lora mode
        "trian.seed=1",  # unknown section
    ]
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "configs/demo.yaml", overrides)
    text = str(info.value)
    expected = [
        "train.save_step: unknown key (did you mean 'train.save_steps'?)",
        "train.save_steps:",
        "optim.lr_llm:",
        "train.mode: pretrain assembles a new model from model.vision_tower (CLIP) and model.language_model",
        "lora: LoRA settings given but train.mode is 'pretrain'",
        "trian: unknown section (did you mean 'train'?)",
    ]
    for item in expected:
        assert item in text, f"missing {item!r} in:\n{text}"
    assert len(info.value.problems) == len(expected)


def test_overrides_are_typed_by_yaml():
    s = load_config(
        REPO / "configs/demo.yaml",
        ["train.max_steps=7", "visionzip.enabled=false", "optim.betas=[0.9, 0.95]"],
    )
    assert s.train.max_steps == 7 and s.visionzip.enabled is False and s.optim.betas == (0.9, 0.95)
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(REPO / "configs/demo.yaml", ["train.max_steps=many"])


def test_overrides_reach_list_items_and_name_a_bad_index():
    s = load_config(REPO / "configs/demo.yaml", ["data.train.0.weight=0.5", "data.val.0.name=held-out"])
    assert s.data.train[0].weight == 0.5 and s.data.val[0].name == "held-out"
    assert s.data.train[0].path.endswith("instruct_train.json")  # the rest of the item is kept
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "configs/demo.yaml", ["data.train.3.weight=0.5", "data.train.first.weight=1"])
    text = str(info.value)
    assert "data.train.3.weight: data.train is a list of 2; '3' is not an index in it (0-1)" in text
    assert "data.train.first.weight: data.train is a list of 2; 'first' is not an index in it" in text


def test_fp16_on_cpu_and_json_conflicts_are_contradictions(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(
        json.dumps(
            {"train_micro_batch_size_per_gpu": 3, "optimizer": {"type": "Adam"}, "bf16": {"enabled": True}}
        )
    )
    overrides = [f"deepspeed.config={ds}", "train.precision=fp32"]
    if not _cuda():
        overrides.append("train.precision=fp16")
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "configs/demo.yaml", overrides)
    text = str(info.value)
    assert "train.per_device_batch_size: 16 but ds.json sets train_micro_batch_size_per_gpu=3" in text
    assert "deepspeed.config: ds.json has an optimizer/scheduler section" in text
    if not _cuda():
        assert "train.precision: fp16 needs a GPU" in text


def test_deepspeed_auto_fields_come_from_the_yaml():
    s = load_config(
        REPO / "configs/demo.yaml",
        ["train.per_device_batch_size=3", "train.grad_accum_steps=5", "optim.max_grad_norm=0.5"],
    )
    for name in ("zero2.json", "zero3.json", "zero3_offload.json"):
        s2 = s.model_copy(
            update={"deepspeed": s.deepspeed.model_copy(update={"config": f"configs/deepspeed/{name}"})}
        )
        cfg = fill_deepspeed_config(s2, world_size=4, precision="bf16", hidden_size=64)
        assert cfg["train_micro_batch_size_per_gpu"] == 3
        assert cfg["gradient_accumulation_steps"] == 5
        assert cfg["train_batch_size"] == 3 * 5 * 4
        assert cfg["gradient_clipping"] == 0.5
        assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
        assert "auto" not in json.dumps(cfg)
        assert "optimizer" not in cfg  # torch AdamW is passed in: per-module lrs, no FusedAdam compile


def test_bad_config_stops_the_entry_point_before_any_weights_load(tmp_path):
    env = {**os.environ, "VISIONZIP_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "train/finetune.py",
            "--config",
            "configs/demo.yaml",
            "train.sav_steps=1",
            "visionzip.dominant=0",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        # A hang guard, not a speed bound: with an empty cache the config check first builds the
        # demo tower (about 100 s on one thread), which left 120 s too close on a loaded machine.
        timeout=600,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "train.sav_steps: unknown key (did you mean 'train.save_steps'?)" in proc.stderr
    assert "visionzip.dominant:" in proc.stderr
    assert not (tmp_path / "cache").exists(), "a model was built although the config was invalid"
    assert time.perf_counter() - start < 60


def test_resume_auto_ignores_incomplete_and_interrupted_saves(tmp_path):
    import torch

    for step, complete in ((2, True), (4, True), (6, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if complete:
            (d / "engine").mkdir()
            torch.save({"module": {}}, d / "engine" / "mp_rank_00_model_states.pt")
            (d / "trainer_state.json").write_text(json.dumps({"step": step}))
            (d / checkpointing.MARKER).write_text("ok")
    (tmp_path / "checkpoint-8.tmp-deadbeef").mkdir()
    (tmp_path / "checkpoint-8.tmp-deadbeef" / checkpointing.MARKER).write_text("renamed never happened")
    assert checkpointing.resolve_resume("auto", tmp_path) == tmp_path / "checkpoint-4"
    assert checkpointing.resolve_resume("never", tmp_path) is None
    with pytest.raises(FileNotFoundError, match="checkpoint-6 is not a complete checkpoint"):
        checkpointing.resolve_resume(str(tmp_path / "checkpoint-6"), tmp_path)
    assert checkpointing.remove_incomplete(tmp_path) == [tmp_path / "checkpoint-8.tmp-deadbeef"]
    assert not (tmp_path / "checkpoint-8.tmp-deadbeef").exists()


def test_rng_state_round_trip_through_a_weights_only_load(tmp_path):
    import random

    import numpy as np
    import torch

    torch.save(checkpointing.rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpointing.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# --- what the config points at (load_config(check_files=True), as train/finetune.py calls it) ----


def _demo(tiny_llava_dir, tmp_path, *overrides, warn=None):
    base = [f"model.name_or_path={tiny_llava_dir}", f"train.output_dir={tmp_path / 'out'}"]
    return load_config(REPO / "configs/demo.yaml", base + list(overrides), check_files=True, warn=warn)


def test_the_demo_config_passes_the_file_checks_without_warnings(tiny_llava_dir, tmp_path):
    notes = []
    settings = _demo(tiny_llava_dir, tmp_path, warn=notes.append)
    assert settings.visionzip.dominant == 12 and notes == []


def test_path_model_and_schema_problems_are_one_list(tiny_llava_dir, tmp_path):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(ConfigError) as info:
        _demo(
            tiny_llava_dir,
            tmp_path,
            "train.sav_steps=1",  # a typo (schema stage)
            f"train.output_dir={tmp_path / 'a_file'}",
            f"data.train=[{{path: {tmp_path}/nope.json, image_folder: {tmp_path}/nodir}}, "
            f"{{path: {tmp_path}/empty.json}}]",
            "visionzip.dominant=60",  # 60 + 10 > 65 tokens of the tiny tower
            "visionzip.contextual=10",
        )
    problems = info.value.problems
    expected = [
        "train.sav_steps: unknown key",
        f"train.output_dir: {tmp_path / 'a_file'} is a file",
        f"data.train[0].path: no such file {tmp_path}/nope.json",
        f"data.train[0].image_folder: no such folder {tmp_path}/nodir",
        f"data.train[1].path: {tmp_path}/empty.json is empty (0 bytes)",
        "visionzip: dominant + contextual = 70 exceeds the 65 tokens available",
    ]
    for text in expected:
        assert sum(p.startswith(text) for p in problems) == 1, (text, problems)
    assert len(problems) == len(expected), problems


@pytest.mark.parametrize("layer", [99, -99, 0])
def test_feature_layer_out_of_range_is_a_config_error(tiny_llava_dir, tmp_path, layer):
    with pytest.raises(ConfigError) as info:
        _demo(tiny_llava_dir, tmp_path, f"visionzip.feature_layer={layer}")
    assert info.value.problems == [
        f"visionzip.feature_layer: {layer} is out of range for a 3-layer vision tower (allowed: 1..3 or -3..-1)"
    ]


def test_feature_layer_other_than_the_models_is_a_config_error(tiny_llava_dir, tmp_path):
    with pytest.raises(
        ConfigError, match="visionzip.feature_layer: -1 differs from the model's vision_feature_layer -2"
    ):
        _demo(tiny_llava_dir, tmp_path, "visionzip.feature_layer=-1")
    assert (
        _demo(tiny_llava_dir, tmp_path, "visionzip.feature_layer=2").visionzip.feature_layer == 2
    )  # = -2 of 3


def test_unknown_builtin_and_missing_model_folder(tmp_path):
    for name, expected in (
        ("builtin:tiny-lava", "model.name_or_path: unknown model 'builtin:tiny-lava'; built-in models:"),
        (str(tmp_path / "nomodel"), f"model.name_or_path: no such model folder {tmp_path / 'nomodel'}"),
    ):
        with pytest.raises(ConfigError) as info:
            _demo(name, tmp_path)
        assert len(info.value.problems) == 1 and info.value.problems[0].startswith(expected), (
            info.value.problems
        )


def test_settings_without_effect_are_warned_by_key(tiny_llava_dir, tmp_path):
    notes = []
    _demo(
        tiny_llava_dir,
        tmp_path,
        "optim.lr_vision=1e-5",
        "train.max_steps=5",
        "train.eval_steps=2",
        "data.val=[]",
        warn=notes.append,
    )
    assert [n.split(":")[1].strip() for n in notes] == [
        "optim.lr_vision",
        "train.epochs",
        "train.eval_steps",
        "eval.generate_accuracy",
    ]
    notes.clear()
    _demo(tiny_llava_dir, tmp_path, "train.mode=projector", "optim.lr_llm=1e-4", warn=notes.append)
    assert len(notes) == 1 and notes[0].startswith("warning: optim.lr_llm: has no effect in projector mode")
    notes.clear()
    _demo(tiny_llava_dir, tmp_path, "train.tune_vision_tower=true", "optim.lr_vision=1e-5", warn=notes.append)
    assert notes == []


def test_a_global_batch_larger_than_the_data_is_an_error_and_heavy_padding_a_warning():
    from types import SimpleNamespace

    from visionzip_core.training.input_checks import check_global_batch

    notes = []
    with pytest.raises(
        ConfigError, match=r"train.per_device_batch_size: a global batch of 1000 \(1000 x 1 x 1"
    ):
        check_global_batch(
            330, SimpleNamespace(per_device_batch_size=1000, grad_accum_steps=1), 1, notes.append
        )
    check_global_batch(330, SimpleNamespace(per_device_batch_size=100, grad_accum_steps=2), 1, notes.append)
    assert notes == [
        "warning: train.per_device_batch_size: a global batch of 200 (100 x 2 x 1 processes) pads each epoch "
        "of 330 samples to 400 by repeating 70"
    ]
    notes.clear()
    check_global_batch(330, SimpleNamespace(per_device_batch_size=16, grad_accum_steps=1), 1, notes.append)
    assert notes == []


def test_an_empty_data_file_says_so(tmp_path):
    from visionzip_core.data import BadDataError, DatasetSource
    from visionzip_core.data.sources import load_source

    for name, text in (("empty.json", ""), ("blank.jsonl", "\n  \n"), ("list.json", "[]")):
        (tmp_path / name).write_text(text)
        with pytest.raises(BadDataError, match=f"{name}: holds no samples"):
            load_source(DatasetSource(path=str(tmp_path / name)), str(tmp_path / "cache"))


def _entry_point(*overrides, cache=None):
    """``train/finetune.py`` on demo.yaml, started cold; ``cache``: a built-in model cache of its own
    (None: the ordinary one, where the demo model is built once for the whole suite)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"} | ({"VISIONZIP_CACHE": str(cache)} if cache else {})
    return subprocess.run(
        [sys.executable, "train/finetune.py", "--config", "configs/demo.yaml", *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        # A hang guard, not a speed bound: with an empty cache the config check first builds the
        # demo tower (about 100 s on one thread), which left 120 s too close on a loaded machine.
        timeout=600,
    )


def test_path_errors_at_the_entry_point_are_one_list_with_exit_2(tmp_path):
    (tmp_path / "a_file").write_text("x")
    proc = _entry_point(
        "model.name_or_path=builtin:tiny-lava",
        f"train.output_dir={tmp_path / 'a_file'}",
        f"data.train=[{{path: {tmp_path}/nope.json, image_folder: {tmp_path}/nodir}}]",
        cache=tmp_path / "cache",
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "config error: 4 problem(s)" in proc.stderr, proc.stderr[-3000:]
    for text in (
        "model.name_or_path: unknown model",
        "train.output_dir:",
        "data.train[0].path:",
        "image_folder:",
    ):
        assert text in proc.stderr


def test_feature_layer_stops_the_entry_point_before_weights_load(tmp_path):
    # The check reads the demo model's config: from the ordinary cache, so that the demo model is
    # built once for the suite (test_demo_tower.py uses it too), not once more here (~100 s).
    proc = _entry_point("visionzip.feature_layer=99", f"train.output_dir={tmp_path / 'out'}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "visionzip.feature_layer: 99 is out of range" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written: the run never started


def test_feature_layer_left_out_is_the_models_own_and_recorded_as_such(tiny_llava_dir, tmp_path):
    """visionzip.feature_layer can only equal the layer the projector reads: left out, it is derived
    from the model, and the resume record holds the layer itself, as records written before the key
    became optional do (so their runs resume under a config that leaves it out)."""
    import json

    from visionzip_core.training.model_spec import resolve_model_spec
    from visionzip_core.training.resume import run_record

    derived = _demo(tiny_llava_dir, tmp_path)
    explicit = _demo(tiny_llava_dir, tmp_path, "visionzip.feature_layer=-2")
    assert derived.visionzip.feature_layer is None and derived.visionzip.core(-2).feature_layer == -2
    records = [
        run_record(
            s, feature_layer=resolve_model_spec(s).feature_layer, world_size=1, precision="fp32", zero_stage=2
        )
        for s in (derived, explicit)
    ]
    assert records[0] == records[1] and records[0]["settings"]["visionzip"]["feature_layer"] == -2
    config = json.loads((tiny_llava_dir / "config.json").read_text())
    assert config["vision_feature_layer"] == -2


def test_anyres_needs_a_tiling_model(tiny_llava_dir, tiny_llava_next_dir, tmp_path):
    """``data.image_aspect_ratio: anyres`` on a one-crop model is a config error before anything
    loads; on LLaVA-NeXT it is the natural setting."""
    with pytest.raises(ConfigError, match="anyres does not apply to llava-1.5, .*: use pad, resize or crop"):
        _demo(tiny_llava_dir, tmp_path, "data.image_aspect_ratio=anyres")
    next_ = load_config(
        REPO / "configs/demo.yaml",
        [
            f"model.name_or_path={tiny_llava_next_dir}",
            f"train.output_dir={tmp_path / 'o'}",
            "data.image_aspect_ratio=anyres",
        ],
        check_files=True,
    )
    assert next_.data.image_aspect_ratio == "anyres"


def test_generate_accuracy_without_an_export_is_warned_and_its_keys_validate(tiny_llava_dir, tmp_path):
    notes = []
    _demo(tiny_llava_dir, tmp_path, "export.enabled=false", "wandb.log_artifact=none", warn=notes.append)
    assert notes == [
        "warning: eval.generate_accuracy: has no effect without a full exported model (it scores final/)"
    ]
    with pytest.raises(ConfigError, match="eval.max_new_tokens"):
        load_config(REPO / "configs/demo.yaml", ["eval.max_new_tokens=0"])
    assert load_config(REPO / "configs/demo.yaml", ["eval.limit=5"]).eval.limit == 5


def test_the_familys_data_defaults_apply_with_and_without_file_checks(tiny_qwen2_5_vl_dir, tmp_path):
    """One YAML trains one way: the loader applies the family's data defaults whether or not the
    input checks run (they used to be applied by the checks alone, so a Qwen config loaded
    without ``check_files`` fell back to LLaVA's vicuna_v1/pad)."""
    samples, images = tmp_path / "train.jsonl", tmp_path / "images"
    samples.write_text('{"id": "0", "image": "a.png", "conversations": []}\n')
    images.mkdir()
    config = tmp_path / "qwen.yaml"
    config.write_text(
        f"model: {{name_or_path: {tiny_qwen2_5_vl_dir}}}\n"
        f"data: {{train: [{{path: {samples}, image_folder: {images}}}], image_placement: start}}\n"
        f"train: {{mode: projector, output_dir: {tmp_path / 'out'}}}\n"
        "visionzip: {dominant_ratio: 0.25, contextual_ratio: 0.25}\n"
    )
    seen = [
        (d.template, d.image_placement, d.image_aspect_ratio)
        for d in (load_config(config).data, load_config(config, check_files=True).data)
    ]
    assert seen == [("chat_template", "start", "native")] * 2  # the given key stays the YAML's
    llava = load_config(config, [f"model.name_or_path={REPO / 'missing'}"]).data
    assert (llava.template, llava.image_aspect_ratio) == ("vicuna_v1", "pad")  # no folder: no family
