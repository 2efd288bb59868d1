"""Qwen2.5-VL processing without torchvision, and the tiny Qwen2.5-VL download-layout folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from visionzip_core.families.qwen_downloads import TINY_QWEN_MAX_PIXELS, TINY_QWEN_MIN_PIXELS
from visionzip_core.families.qwen_processing import (
    FrameVideoProcessor,
    QwenProcessorFilesError,
    load_qwen_processor,
)
from visionzip_core.testing.tiny import write_tiny

REPO = Path(__file__).resolve().parents[1]
SIZES = {"min_pixels": TINY_QWEN_MIN_PIXELS, "max_pixels": TINY_QWEN_MAX_PIXELS}


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory) -> Path:
    return write_tiny("qwen2.5-vl", tmp_path_factory.mktemp("qwen") / "tiny-qwen2.5-vl")


@pytest.fixture(scope="module")
def processor(tiny_qwen):
    return load_qwen_processor(tiny_qwen)


def _image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _count(ids, token_id: int) -> int:
    return int((torch.as_tensor(ids) == token_id).sum())


def test_loading_and_processing_never_import_torchvision(tiny_qwen, tmp_path):
    # torchvision set to None in sys.modules: any `import torchvision` raises ImportError.
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torchvision"] = None
        import numpy as np
        from PIL import Image
        from visionzip_core.families.qwen_processing import load_qwen_processor
        p = load_qwen_processor({str(tiny_qwen)!r})
        img = Image.fromarray(np.full((112, 112, 3), 90, np.uint8))
        text = "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|video_pad|><|vision_end|>"
        out = p(text=[text], images=[img], videos=[[img, img, img]], return_tensors="pt")
        assert out["video_grid_thw"].tolist() == [[2, 8, 8]], out["video_grid_thw"]
        p.save_pretrained({str(tmp_path / "saved")!r})
        load_qwen_processor({str(tmp_path / "saved")!r})
        assert "torchvision" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


def test_image_path_matches_pil_image_processor_and_counts_pads(processor):
    images = [_image(112, 112, 0), _image(60, 150, 1), _image(300, 200, 2)]
    reference = Qwen2VLImageProcessorPil(**SIZES)(images, return_tensors="pt")
    text = [f"<|vision_start|><|image_pad|><|vision_end|> picture {i}" for i in range(3)]
    out = processor(text=text, images=images, return_tensors="pt", padding=True)
    assert torch.equal(out["pixel_values"], reference["pixel_values"])
    assert torch.equal(out["image_grid_thw"], reference["image_grid_thw"])
    grids = out["image_grid_thw"]
    assert len({tuple(g.tolist()) for g in grids}) == 3  # really a mixed-size batch
    pad_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for row, grid in zip(out["input_ids"], grids):
        assert _count(row, pad_id) == int(grid.prod()) // 4


def test_still_video_equals_the_image():
    # Qwen2-VL feeds an image as temporal_patch_size copies of itself: a still video must match it.
    image = _image(100, 130, 3)
    ref = Qwen2VLImageProcessorPil(**SIZES)([image])
    out = FrameVideoProcessor(**SIZES)([image, image])
    assert np.array_equal(out["pixel_values_videos"], ref["pixel_values"])
    assert np.array_equal(out["video_grid_thw"], ref["image_grid_thw"])


def test_video_frames_grid_padding_and_paths(tmp_path):
    vp = FrameVideoProcessor(**SIZES)
    frames = [_image(84, 112, 10 + i) for i in range(4)]
    four = vp(frames)
    assert four["video_grid_thw"].tolist() == [[2, 6, 8]]
    assert four["pixel_values_videos"].shape == (2 * 6 * 8, 3 * 2 * 14 * 14)
    # 3 frames -> padded to 4 by repeating the last one
    three = vp(frames[:3])
    by_hand = vp(frames[:3] + [frames[2]])
    assert three["video_grid_thw"].tolist() == [[2, 6, 8]]
    assert np.array_equal(three["pixel_values_videos"], by_hand["pixel_values_videos"])
    assert not np.array_equal(three["pixel_values_videos"], four["pixel_values_videos"])
    # frames given as files equal the same frames given as PIL images, and as numpy arrays
    paths = []
    for i, frame in enumerate(frames):
        frame.save(tmp_path / f"f{i}.png")
        paths.append(str(tmp_path / f"f{i}.png"))
    assert np.array_equal(vp(paths)["pixel_values_videos"], four["pixel_values_videos"])
    arrays = [np.asarray(f) for f in frames]
    assert np.array_equal(vp(arrays)["pixel_values_videos"], four["pixel_values_videos"])
    # two videos in one batch keep their own grids
    both = vp([frames, frames[:2]])
    assert both["video_grid_thw"].tolist() == [[2, 6, 8], [1, 6, 8]]


def test_processor_video_tokens_and_second_per_grid(processor, tmp_path):
    frames = [_image(112, 112, 20 + i) for i in range(4)]
    for i, frame in enumerate(frames):
        frame.save(tmp_path / f"v{i}.png")
    paths = [str(tmp_path / f"v{i}.png") for i in range(4)]
    text = ["<|vision_start|><|video_pad|><|vision_end|> what happens?"]
    pad_id = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    outs = [
        processor(text=text, videos=[frames], return_tensors="pt"),
        # a list of frame paths must be nested once more: ProcessorMixin counts a flat list of
        # strings as that many video files
        processor(text=text, videos=[[paths]], return_tensors="pt"),
    ]
    for out in outs:
        grid = out["video_grid_thw"]
        assert grid.tolist() == [[2, 8, 8]]
        assert _count(out["input_ids"], pad_id) == int(grid.prod()) // 4
        assert out["second_per_grid_ts"].tolist() == [1.0]  # temporal_patch_size 2 / default fps 2.0
    assert torch.equal(outs[0]["pixel_values_videos"], outs[1]["pixel_values_videos"])
    given_fps = processor(text=text, videos=[frames], fps=4.0, return_tensors="pt")
    assert given_fps["second_per_grid_ts"].tolist() == [0.5]


def test_tiny_folder_round_trip(tiny_qwen, processor, tmp_path):
    from safetensors import safe_open
    from transformers import Qwen2_5_VLForConditionalGeneration

    from visionzip_core.weight_checks import load_checked

    names = sorted(p.name for p in tiny_qwen.iterdir())
    assert {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"} <= set(names)
    assert {"chat_template.json", "vocab.json", "merges.txt", "tokenizer.json"} <= set(names)
    config = json.loads((tiny_qwen / "config.json").read_text())
    assert "text_config" not in config and config["rope_scaling"]["type"] == "mrope"

    model = load_checked(Qwen2_5_VLForConditionalGeneration, tiny_qwen)  # raises on missing/unexpected keys
    text_cfg = model.config.text_config
    head_dim = text_cfg.hidden_size // text_cfg.num_attention_heads
    assert sum(text_cfg.rope_parameters["mrope_section"]) == head_dim // 2
    state = model.state_dict()
    index = json.loads((tiny_qwen / "model.safetensors.index.json").read_text())
    assert any(k.startswith("visual.blocks.") for k in index["weight_map"])
    assert any(k.startswith("model.layers.") for k in index["weight_map"])
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(str(tiny_qwen / file), "pt") as f:
            for key in f.keys():
                new = ("model." + key) if key.startswith("visual.") else key
                new = new.replace("model.layers.", "model.language_model.layers.", 1)
                for old, five in (
                    ("model.embed_tokens", "model.language_model.embed_tokens"),
                    ("model.norm", "model.language_model.norm"),
                ):
                    if new.startswith(old):
                        new = five + new[len(old) :]
                assert torch.equal(state[new], f.get_tensor(key)), key

    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert "<|vision_start|><|image_pad|><|vision_end|>What colour is it?" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    inputs = processor(text=[prompt], images=[_image(112, 112, 5)], return_tensors="pt")
    video = processor(
        text=["<|vision_start|><|video_pad|><|vision_end|>"],
        videos=[[_image(112, 112, 6)] * 3],
        return_tensors="pt",
    )
    with torch.no_grad():
        for batch in (inputs, video):
            logits = model(**batch).logits
            assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()

    # windowed attention matters at this size: 112 px = 4x4 merged tokens in 2x2-token windows
    visual = model.model.visual
    with torch.no_grad():
        windowed = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
        visual.window_size = 112  # one window holding the whole image: plain full attention
        full = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
        visual.window_size = model.config.vision_config.window_size
    assert not torch.allclose(windowed, full)

    processor.save_pretrained(tmp_path / "saved")
    again = load_qwen_processor(tmp_path / "saved")
    assert type(again).__name__ == "Qwen2_5_VLProcessor"
    redo = again(text=[prompt], images=[_image(112, 112, 5)], return_tensors="pt")
    assert torch.equal(redo["input_ids"], inputs["input_ids"])
    assert torch.equal(redo["pixel_values"], inputs["pixel_values"])
    assert again.video_processor.to_dict() == processor.video_processor.to_dict()
    assert type(load_qwen_processor(tiny_qwen, "Qwen2VLProcessor")).__name__ == "Qwen2VLProcessor"


def test_missing_preprocessor_config_is_one_line(tiny_qwen, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.json"):
        (folder / name).write_bytes((tiny_qwen / name).read_bytes())
    with pytest.raises(QwenProcessorFilesError) as err:
        load_qwen_processor(folder)
    message = str(err.value)
    assert "\n" not in message and str(folder) in message and "preprocessor_config.json" in message

    (folder / "preprocessor_config.json").write_bytes((tiny_qwen / "preprocessor_config.json").read_bytes())
    (folder / "tokenizer.json").unlink()
    with pytest.raises(QwenProcessorFilesError, match="tokenizer.json") as err:
        load_qwen_processor(folder)
    assert "\n" not in str(err.value) and str(folder) in str(err.value)
