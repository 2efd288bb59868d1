"""What the commands ask the model family, checked without training (seconds): the evaluation
prompt against the training render, the config and data messages a user of each family gets, and
where a config problem came from. The end-to-end runs are in tests/test_command_matrix.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image
from test_command_matrix import FAMILIES, run_script, write_matrix_data

from visionzip_core.data import BadDataError, build_dataset
from visionzip_core.data.templates import place_images_first, render, tokenizer_of
from visionzip_core.families import family_for
from visionzip_core.training.config_loading import load_config
from visionzip_core.training.schema import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folders(family_dirs) -> dict[str, Path]:
    return family_dirs  # conftest.py's, shared with the command matrix


def _training_prompt(family, processor, question: str, media: str) -> str:
    """The text training puts before the first reply, for a user turn of ``media`` then ``question``
    rendered by the family's default template (as the data pipeline renders it)."""
    template = family.data_defaults.get("template", "vicuna_v1")
    turns = ((("user", media + question)), ("assistant", "A cat."))
    if family.data_defaults.get("image_placement", "start") == "start":
        turns = place_images_first(turns, family.image_token)
    pieces = render(
        template, turns, tokenizer_of(processor), family.image_token, None, video_token=family.video_token
    )
    assert pieces[1] == (pieces[1][0], True) and pieces[1][0].startswith((" A cat.", "A cat."))
    return pieces[0][0]


@pytest.mark.parametrize("name", FAMILIES)
def test_the_evaluation_prompt_is_the_one_training_renders(folders, name):
    """evaluate.py and eval.generate_accuracy ask a question exactly as the family trained on it
    (vicuna_v1 for LLaVA, the chat template for Qwen), images and, where taken, videos."""
    family = family_for(name)
    processor = family.load_processor(str(folders[name]))
    asked = family.prompt(processor, "What is it?", images=1)
    assert asked == _training_prompt(family, processor, "What is it?", family.image_token)
    if family.takes_video:
        asked = family.prompt(processor, "What moves?", images=0, videos=1)
        assert asked == _training_prompt(family, processor, "What moves?", family.video_token)
    else:
        with pytest.raises(ValueError, match=f"{name} takes images only"):
            family.prompt(processor, "What moves?", images=0, videos=1)


def _llava_data(tmp_path: Path) -> Path:
    Image.new("RGB", (60, 40), "red").save(tmp_path / "a.png")
    rows = [
        {
            "id": f"s{i}",
            "image": "a.png",
            "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Red."}],
        }
        for i in range(4)
    ]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    return tmp_path / "train.json"


def _overrides(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model.name_or_path={model}",
        f"train.output_dir={out}",
        f"data.train=[{{path: {data}, image_folder: {data.parent}}}]",
        "data.val=[]",
        f"data.cache_dir={out}-cache",
        "train.per_device_batch_size=2",
        "train.max_steps=1",
        "wandb.enabled=false",
        *extra,
    ]


QWEN = ("visionzip.dominant_ratio=0.25", "visionzip.contextual_ratio=0.25", "data.template=chat_template")


@pytest.mark.parametrize("name", ["qwen2-vl", "qwen2.5-vl"])
def test_llava_format_data_on_qwen_is_one_line_asking_for_messages(folders, tmp_path, name):
    """Before any sample is checked (and before weights load), training's dataset and check_data.py
    say the same: this model reads messages format."""
    from visionzip_core.training.model_spec import resolve_model_spec
    from visionzip_core.training.modeling import build_processor, dataset_inputs

    data = _llava_data(tmp_path)
    overrides = _overrides(folders[name], data, tmp_path / "out", *QWEN)
    words = f"data.train[0] ({data}): llava-format samples, but this model is trained on messages format"
    settings = load_config(REPO / "configs/demo.yaml", overrides, check_files=True)
    spec = resolve_model_spec(settings)
    processor, count = build_processor(settings, spec)
    with pytest.raises(BadDataError) as err:
        build_dataset(
            settings.data,
            "train",
            tokenizer=processor.tokenizer,
            image_processor=processor.image_processor,
            image_tokens_per_image=count,
            **dataset_inputs(settings, spec, processor),
        )
    assert str(err.value).startswith(words) and "\n" not in str(err.value)
    code, stdout, _ = run_script("check_data", "--config", "configs/demo.yaml", *overrides)
    assert code == 1 and words in stdout and "<image>' token" not in stdout


def test_pretrain_on_a_whole_qwen_model_is_one_error_naming_the_mode(folders, tmp_path):
    """No per-key stage-1 errors, and no template the user never set."""
    overrides = [
        f"model.name_or_path={folders['qwen2.5-vl']}",
        f"train.output_dir={tmp_path}",
        "train.mode=pretrain",
    ]
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs/demo.yaml", overrides, check_files=True)
    [problem] = err.value.problems
    assert problem.startswith("train.mode: pretrain assembles a new model") and "vicuna" not in str(err.value)
    # Following the stage-1 keys to the same folder: the family's refusal, once.
    overrides = [
        f"model.vision_tower={folders['qwen2.5-vl']}",
        f"model.language_model={folders['qwen2.5-vl']}",
        "model.name_or_path=null",
        "data.template=plain",
        f"train.output_dir={tmp_path}",
        "train.mode=pretrain",
    ]
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs/demo.yaml", overrides, check_files=True)
    [problem] = err.value.problems
    assert problem.startswith("train.mode: pretrain is not supported for qwen2.5-vl")


def test_an_aspect_ratio_the_family_cannot_take_lists_the_ones_it_can(folders, tmp_path):
    overrides = [f"model.name_or_path={folders['llava-next']}", f"train.output_dir={tmp_path}"]
    with pytest.raises(ConfigError) as err:
        load_config(
            REPO / "configs/demo.yaml", [*overrides, "data.image_aspect_ratio=native"], check_files=True
        )
    [problem] = err.value.problems
    assert problem.startswith("data.image_aspect_ratio: native does not apply to llava-next")
    assert "use anyres, pad, resize or crop" in problem
    settings = load_config(
        REPO / "configs/demo.yaml", [*overrides, "data.image_aspect_ratio=anyres"], check_files=True
    )
    assert settings.data.image_aspect_ratio == "anyres"


def test_config_errors_say_whether_they_came_from_the_command_line(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs/demo.yaml", ["train.lr=3", "data.train.0.weight=-1"])
    assert str(err.value).startswith("2 problem(s) in the command line (overrides to ")
    lines = str(err.value).splitlines()[1:]
    assert len(lines) == 2 and all(line.endswith("(command line)") for line in lines), lines
    config = tmp_path / "c.yaml"
    raw = yaml.safe_load((REPO / "configs/demo.yaml").read_text())
    raw["train"]["sav_steps"] = 3  # a typo in the file
    config.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        load_config(config, ["train.lr=3"])
    assert str(err.value).startswith(f"2 problem(s) in {config} and the command line:")
    marks = {
        line.split(":")[0].strip(" -"): line.endswith("(command line)")
        for line in str(err.value).splitlines()[1:]
    }
    assert marks == {"train.sav_steps": False, "train.lr": True}


@pytest.mark.parametrize("name", ["qwen2-vl", "qwen2.5-vl"])
def test_check_data_takes_the_shipped_qwen_config(folders, tmp_path, name):
    """configs/qwen2.5-vl-7b/projector.yaml with only its paths and sizes overridden (as a user points it at
    a download and a data set) passes check_data.py, videos included."""
    matrix_data = write_matrix_data(tmp_path)
    code, stdout, stderr = run_script(
        "check_data",
        "--config",
        "configs/qwen2.5-vl-7b/projector.yaml",
        f"model.name_or_path={folders[name]}",
        f"data.train=[{{path: {matrix_data}/messages_train.jsonl, image_folder: {matrix_data}/images}}]",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"train.output_dir={tmp_path / 'out'}",
        "train.per_device_batch_size=2",
        "train.grad_accum_steps=1",  # the shipped 4 x 4 per GPU makes a batch of 128 over 8 GPUs
    )
    assert code == 0, stdout[-2000:] + stderr[-2000:]
    assert "data.train: 6 samples per epoch" in stdout and stdout.rstrip().endswith("data OK for training")
