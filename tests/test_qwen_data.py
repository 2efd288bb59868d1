"""The data pipeline for Qwen2.5-VL: messages with image and video parts, native-resolution image
sizes, counts that match the adapted processor's, labels on assistant replies only, batching.

Run: ``PYTHONPATH=$PWD .venv/bin/python -m pytest tests/test_qwen_data.py`` (about a minute, CPU).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from visionzip_core.config import VisionZipConfig
from visionzip_core.data import DataCollator, DataSettings, build_dataset
from visionzip_core.data.encode import IGNORE_INDEX, Encoder
from visionzip_core.data.images import ImageTransform
from visionzip_core.data.sources import to_conversation
from visionzip_core.data.templates import tokenizer_of
from visionzip_core.data.validation import BadDataError, SampleError
from visionzip_core.families import family_for, image_token_count, video_token_count
from visionzip_core.testing.tiny import write_tiny

IMG, VID = "<|image_pad|>", "<|video_pad|>"
VZ = VisionZipConfig(dominant_ratio=0.25, contextual_ratio=0.25)
# odd sizes (H, W): below min_pixels, above max_pixels, far from square, not multiples of 28
ODD_SIZES = [(97, 143), (300, 61), (50, 50), (1000, 30), (113, 113), (256, 500)]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    folder = write_tiny("qwen2.5-vl", tmp_path_factory.mktemp("qwen"), vision_depth=2)
    family = family_for("qwen2.5-vl")
    processor = family.load_processor(str(folder))
    tokenizer_of(processor)  # the download keeps the chat template on the processor
    config = family.config_from_file(str(folder / "config.json"))
    return family, processor, config


def _picture(path, size, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[0], size[1], 3), dtype=np.uint8)).save(path)
    return str(path)


def _encoder(processor, config, template="chat_template", max_len=4096):
    return Encoder(
        tokenizer=processor.tokenizer,
        template=template,
        image_token=IMG,
        image_tokens_per_image=image_token_count(config, VZ),
        model_max_length=max_len,
        image_placement="keep",
        video_token=VID,
        video_tokens_per_video=video_token_count(config, VZ),
    )


# --- sources ---------------------------------------------------------------------------------------


def test_video_parts_and_inline_paths_become_placeholders_in_order():
    row = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": "a.png"},
                    {"type": "video"},
                    {"type": "image"},
                    {"type": "video", "video": ["f1.png", "f2.png"]},
                    {"type": "text", "text": "Describe."},
                ],
            },
            {"role": "assistant", "content": "Things."},
        ],
        "images": ["b.png"],
        "videos": [["v1.png", "v2.png", "v3.png"]],
    }
    conv = to_conversation(row, "messages", IMG, VID)
    assert conv.turns[0] == ("user", f"{IMG}{VID}{IMG}{VID}Describe.")
    assert conv.images == ("a.png", "b.png")
    assert conv.videos == (("v1.png", "v2.png", "v3.png"), ("f1.png", "f2.png"))


def test_arrow_nulls_of_other_part_kinds_are_absent_paths():
    # datasets gives every part every key of the file's parts, None where a part lacks it
    row = {
        "messages": [
            {"role": "user", "content": [{"type": "image", "image": None, "video": None, "text": None}]},
            {"role": "assistant", "content": [{"type": "text", "text": "x", "image": None, "video": None}]},
        ],
        "images": ["a.png"],
        "videos": None,
    }
    conv = to_conversation(row, "messages", IMG, VID)
    assert conv.images == ("a.png",) and conv.videos == ()


@pytest.mark.parametrize(
    "row, words",
    [
        (
            {"messages": [{"role": "user", "content": "x"}], "videos": ["a.png"]},
            "videos must be a list of videos",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "videos": [[]]}, "videos must be a list of videos"),
        (
            {"messages": [{"role": "user", "content": [{"type": "video", "video": "a.png"}]}]},
            "'video' must be a non-empty list of frame paths",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "image": ["a.png"]}]}]},
            "'image' must be a non-empty path",
        ),
    ],
)
def test_bad_media_shapes_are_one_line(row, words):
    with pytest.raises(SampleError, match=words) as err:
        to_conversation(row, "messages", IMG, VID)
    assert "\n" not in err.value.reason


def test_a_video_part_for_a_model_without_video_is_a_bad_sample():
    row = {"messages": [{"role": "user", "content": [{"type": "video", "video": ["a.png"]}]}]}
    with pytest.raises(SampleError, match="takes no video"):
        to_conversation(row, "messages", "<image>", None)


# --- sizes: preflight's rule == the processor's own output ----------------------------------------


def _layout(family, processor):
    """The layout the trainer gives the data pipeline for this family's processor."""
    return family.image_layout(processor.image_processor, processor.video_processor)


@pytest.mark.parametrize("aspect", ["native", "pad"])
def test_size_rule_matches_the_processor(qwen, tmp_path, aspect):
    family, processor, config = qwen
    transform = ImageTransform(
        processor.image_processor, aspect, processor.video_processor, _layout(family, processor)
    )
    rule = transform.size_rule
    for i, size in enumerate(ODD_SIZES):
        path = _picture(tmp_path / f"{i}.png", size, seed=i)
        loaded = transform.load([path])
        grid = loaded["image_grid_thw"][0].tolist()
        assert tuple(loaded["image_sizes"][0].tolist()) == rule(size) == (grid[1] * 14, grid[2] * 14), size
        assert loaded["pixel_values"].shape == (grid[0] * grid[1] * grid[2], 3 * 2 * 14 * 14)


def test_video_size_rule_matches_the_video_processor(qwen, tmp_path):
    family, processor, config = qwen
    transform = ImageTransform(
        processor.image_processor, "native", processor.video_processor, _layout(family, processor)
    )
    for n_frames, size in [(4, (97, 143)), (3, (300, 61)), (1, (50, 50))]:
        frames = [_picture(tmp_path / f"v{n_frames}_{k}.png", size, seed=k) for k in range(n_frames)]
        loaded = transform.load_videos([frames])
        t, h, w = loaded["video_grid_thw"][0].tolist()
        expected = transform.size_rule.video_size(n_frames, size)
        assert tuple(loaded["video_sizes"][0].tolist()) == expected == (t * 2, h * 14, w * 14)
        assert loaded["second_per_grid_ts"].tolist() == [1.0]  # 2 frames per group / 2 fps


def test_other_aspect_ratios_are_refused_for_a_native_processor(qwen):
    family, processor, config = qwen
    with pytest.raises(ValueError, match="data.image_aspect_ratio: 'crop' does not apply"):
        ImageTransform(processor.image_processor, "crop", layout=_layout(family, processor))


# --- encoding: ids == the adapted processor's, labels on replies only -----------------------------


def test_ids_equal_the_adapted_processors_and_labels_are_the_replies(qwen, tmp_path):
    family, processor, config = qwen
    family.adapt_processor(processor, VZ, config)
    sizes = [(97, 143), (300, 61)]
    paths = [_picture(tmp_path / f"p{i}.png", s, seed=i) for i, s in enumerate(sizes)]
    frames = [_picture(tmp_path / f"f{k}.png", (60, 90), seed=10 + k) for k in range(4)]
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "And these?"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "A dog and a bird."}]},
    ]
    transform = ImageTransform(
        processor.image_processor, "native", processor.video_processor, _layout(family, processor)
    )
    conv = to_conversation({"messages": messages, "images": paths, "videos": [frames]}, "messages", IMG, VID)
    images = transform.load(paths)
    videos = transform.load_videos([frames])
    enc = _encoder(processor, config)
    ids, labels = enc(
        conv.turns,
        2,
        [tuple(s) for s in images["image_sizes"].tolist()],
        [tuple(s) for s in videos["video_sizes"].tolist()],
    )

    # reference: the processor's own template and expansion, as at inference
    text = processor.apply_chat_template(messages, tokenize=False)
    opened = [Image.open(p).convert("RGB") for p in paths]
    video = [Image.open(f).convert("RGB") for f in frames]
    ref = processor(text=[text], images=opened, videos=[video], return_tensors="pt")
    assert ids == ref["input_ids"][0].tolist()
    assert torch.equal(images["pixel_values"], ref["pixel_values"])
    assert torch.equal(videos["video_grid_thw"], ref["video_grid_thw"])

    # trained ids: exactly each reply and its <|im_end|>, nothing else
    tok = processor.tokenizer
    trained = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    reply = tok("A cat.<|im_end|>A dog and a bird.<|im_end|>", add_special_tokens=False)["input_ids"]
    assert trained == reply
    assert all(lab == i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX)
    # and they sit right after each "<|im_start|>assistant\n"
    head = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    starts = [k + len(head) for k in range(len(ids)) if ids[k : k + len(head)] == head]
    assert len(starts) == 2 and all(
        labels[s] != IGNORE_INDEX and labels[s - 1] == IGNORE_INDEX for s in starts
    )
    # every image/video id counted as the family says and untrained
    image_id, video_id = tok.convert_tokens_to_ids(IMG), tok.convert_tokens_to_ids(VID)
    expected_images = sum(
        family.compressed_tokens_per_image(config, VZ, tuple(s)) for s in images["image_sizes"].tolist()
    )
    assert ids.count(image_id) == expected_images
    assert ids.count(video_id) == family.compressed_tokens_per_video(
        config, VZ, tuple(videos["video_sizes"][0].tolist())
    )
    family.adapt_processor(processor, None, config)


def test_an_image_too_small_for_the_split_is_a_bad_sample(qwen):
    family, processor, config = qwen
    vz = VisionZipConfig(dominant_ratio=0.9, contextual_ratio=0.1)  # 1 + 1 > 1 token of the smallest
    enc = Encoder(
        tokenizer=processor.tokenizer,
        template="chat_template",
        image_token=IMG,
        image_tokens_per_image=image_token_count(config, vz),
        model_max_length=4096,
        image_placement="keep",
    )
    # min_pixels of the tiny processor allows a 2x2-merged-token image: 4 tokens, 3 + 1 fit
    enc((("user", IMG + "x"), ("assistant", "y")), 1, [(56, 56)])
    vz_tight = VisionZipConfig(dominant_ratio=0.5, contextual_ratio=0.5)
    with pytest.raises(SampleError, match="image 1"):
        Encoder(
            tokenizer=processor.tokenizer,
            template="chat_template",
            image_token=IMG,
            image_tokens_per_image=image_token_count(config, vz_tight),
            model_max_length=4096,
            image_placement="keep",
        )((("user", IMG + "x"), ("assistant", "y")), 1, [(28, 28)])


# --- the dataset and the collator ----------------------------------------------------------------


def _write_data(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i, size in enumerate([(97, 143), (300, 61), (120, 80)]):
        _picture(images / f"im{i}.png", size, seed=i)
    for k in range(4):
        _picture(images / f"fr{k}.png", (70, 100), seed=20 + k)
    rows = [
        {
            "id": "image",
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
            ],
            "images": ["im0.png"],
        },
        {
            "id": "video",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "video", "video": [f"fr{k}.png" for k in range(4)]},
                        {"type": "text", "text": "What moves?"},
                    ],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "A dog."}]},
            ],
        },
        {
            "id": "multi",
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image", "image": "im1.png"}, {"type": "text", "text": "Colour?"}],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
                {
                    "role": "user",
                    "content": [{"type": "image", "image": "im2.png"}, {"type": "text", "text": "And this?"}],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]},
            ],
        },
        {
            "id": "text",
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Say hi."}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Hi."}]},
            ],
        },
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, images


def _dataset(qwen, tmp_path, path, images):
    family, processor, config = qwen
    settings = DataSettings(
        train=[{"path": str(path), "image_folder": str(images)}],
        template="chat_template",
        image_placement="keep",
        image_aspect_ratio="native",
        num_workers=0,
        cache_dir=str(tmp_path / "cache"),
    )
    return build_dataset(
        settings,
        "train",
        processor.tokenizer,
        processor.image_processor,
        image_token_count(config, VZ),
        image_token=IMG,
        video_processor=processor.video_processor,
        video_token=VID,
        video_tokens=video_token_count(config, VZ),
        image_layout=_layout(family, processor),
    )


def test_preflight_lengths_equal_loaded_lengths_and_batches_concatenate(qwen, tmp_path):
    family, processor, config = qwen
    path, images = _write_data(tmp_path)
    ds = _dataset(qwen, tmp_path, path, images)
    items = [ds[i] for i in range(len(ds))]
    assert [abs(n) for n in ds.lengths] == [len(it["input_ids"]) for it in items]
    assert [n < 0 for n in ds.lengths] == [False, False, False, True]
    assert "image_sizes" not in items[0]  # counting only; the model takes image_grid_thw
    assert set(items[1]) == {
        "input_ids",
        "labels",
        "pixel_values_videos",
        "video_grid_thw",
        "second_per_grid_ts",
    }

    batch = DataCollator(pad_token_id=processor.tokenizer.pad_token_id)(
        [items[2], items[1], items[0], items[3]]
    )
    grids = torch.cat([items[2]["image_grid_thw"], items[0]["image_grid_thw"]])
    assert torch.equal(batch["image_grid_thw"], grids)
    assert torch.equal(batch["pixel_values"], torch.cat([items[2]["pixel_values"], items[0]["pixel_values"]]))
    assert torch.equal(batch["video_grid_thw"], items[1]["video_grid_thw"])
    assert batch["second_per_grid_ts"].tolist() == [1.0]
    assert batch["pixel_values_videos"].shape[0] == int(items[1]["video_grid_thw"].prod())


def test_frames_of_different_sizes_name_the_sample(qwen, tmp_path):
    path, images = _write_data(tmp_path)
    _picture(images / "fr3.png", (71, 100), seed=1)
    with pytest.raises(
        BadDataError,
        match=r"sample 1 \(id 'video'\): the frames of a video differ in size: frame 4 \(.*fr3.png\) is 71x100",
    ):
        _dataset(qwen, tmp_path, path, images)
