"""VisionZip on a tiny LLaVA-OneVision laid out as llava-hf/llava-onevision-qwen2-7b-ov-hf: the
received-attention rule against an eager reference, keep-all parity with the stock model (one-crop
images, videos, tiled grids), counts for mixed sizes, generate, multi-image and video samples, the
processor folder, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from visionzip_core import (
    VisionZipConfig,
    load_visionzip_model,
    load_visionzip_processor,
    num_image_tokens,
    visionzip,
    visionzip_processor,
)
from visionzip_core.families import family_for, image_token_count
from visionzip_core.families.llava_next import crops_per_image, tile_grid

SIDE = 8  # patches per crop side: 64 px / 8 px
PATCHES = SIDE * SIDE
POOLED = 16  # a video frame after the stock 2x2 pooling: ceil(8 / 2) ** 2
D, K = 7, 3  # dominant and contextual tokens per crop (and per video frame)


@pytest.fixture
def folder(tiny_llava_onevision_dir):
    return tiny_llava_onevision_dir


@pytest.fixture
def model(folder):
    return family_for("llava-onevision").load(str(folder)).eval()


@pytest.fixture
def processor(folder):
    return family_for("llava-onevision").load_processor(str(folder))


def noise_image(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 255, (h, w, 3), dtype=np.uint8))


def noise_video(frames: int, seed: int = 0) -> list[Image.Image]:
    return [noise_image(48, 80, seed * 10 + i) for i in range(frames)]


def prompt(processor, images: int = 1, videos: int = 0, question: str = "What is here?") -> str:
    content = (
        [{"type": "image"}] * images + [{"type": "video"}] * videos + [{"type": "text", "text": question}]
    )
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


# --- the rule against an eager reference written with loops -------------------------------------------


def eager_reference(eager, pixel_values, vz: VisionZipConfig):
    """Per crop, from the eager tower's own attention maps: received attention with explicit loops
    over heads and queries, the top-D patches, the rest merged into K tokens by cosine of the
    head-averaged keys (uniform-stride targets, target + mean of its members), projected."""
    tower = eager.model.vision_tower
    attn = tower.encoder.layers[-1].self_attn
    keys = {}
    handle = attn.k_proj.register_forward_hook(lambda _m, _i, out: keys.setdefault("k", out))
    try:
        out = tower(pixel_values, output_attentions=True, output_hidden_states=True)
    finally:
        handle.remove()
    hidden, maps = out.hidden_states[-1], out.attentions[-1]  # (crops, N, C), (crops, heads, N, N)
    crops, heads, n, _ = maps.shape
    key = keys["k"].view(crops, n, heads, -1).mean(2)
    tokens, dominants = [], []
    for c in range(crops):
        score = [0.0] * n
        for j in range(n):
            for h in range(heads):
                for i in range(n):
                    score[j] += float(maps[c, h, i, j]) / heads
        dominant = sorted(sorted(range(n), key=lambda j: -score[j])[: vz.dominant])
        rest = [j for j in range(n) if j not in dominant]
        step = max(1, len(rest) // vz.contextual)
        targets = [rest[p] for p in range(0, len(rest), step)][: vz.contextual]
        members = {t: [] for t in targets}
        unit = torch.nn.functional.normalize(key[c].float(), dim=-1)
        for j in rest:
            if j in targets:
                continue
            best = max(targets, key=lambda t: float(unit[j] @ unit[t]))
            members[best].append(j)
        merged = [
            hidden[c, t] + (torch.stack([hidden[c, m] for m in members[t]]).mean(0) if members[t] else 0)
            for t in targets
        ]
        tokens.append(torch.stack([hidden[c, j] for j in dominant] + merged))
        dominants.append(dominant)
    return eager.model.multi_modal_projector(torch.stack(tokens)), dominants


def reference_layout(tokens, dominants, grid):
    """Base crop; the tiles' dominant patches in raster order over the whole tile grid; the tiles'
    contextual tokens, tile by tile."""
    rows, cols = grid
    out = list(tokens[0])
    placed = []
    for t in range(rows * cols):
        for slot, patch in enumerate(dominants[t + 1]):
            y, x = (t // cols) * SIDE + patch // SIDE, (t % cols) * SIDE + patch % SIDE
            placed.append((y, x, tokens[t + 1][slot]))
    out += [feat for _, _, feat in sorted(placed, key=lambda p: (p[0], p[1]))]
    for t in range(rows * cols):
        out += list(tokens[t + 1][D:])
    return torch.stack(out)


@pytest.mark.parametrize("size", [(50, 130), (150, 60)])
def test_each_crop_matches_the_eager_reference_and_the_layout(folder, model, processor, size):
    from transformers import LlavaOnevisionForConditionalGeneration

    eager = LlavaOnevisionForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    batch = processor.image_processor(images=[noise_image(*size, seed=sum(size))], return_tensors="pt")
    vz = VisionZipConfig(dominant=D, contextual=K, feature_layer=-1)
    visionzip(model, config=vz)
    crops = crops_per_image(model.config, size)
    pixel_values = batch["pixel_values"][0, :crops]
    with torch.no_grad():
        ours = model.model.get_image_features(
            pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"]
        ).pooler_output
        tokens, dominants = eager_reference(eager, pixel_values, vz)
    expected = reference_layout(tokens, dominants, tile_grid(model.config, size))
    assert crops > 2 and ours[0].shape == expected.shape == (crops * (D + K), 64)
    torch.testing.assert_close(ours[0], expected, atol=1e-5, rtol=1e-4)
    # The test can fail: a CLS-style ranking (the row of token 0) picks other patches.
    cls_row = eager.model.vision_tower(pixel_values, output_attentions=True).attentions[-1][:, :, 0].sum(1)
    assert any(sorted(cls_row[c].topk(D).indices.tolist()) != dominants[c] for c in range(crops))


# --- keeping every token is the stock model ----------------------------------------------------------


def test_keep_all_is_the_stock_model_for_several_images_and_a_video(model, processor):
    """A sample with two images (one crop + newline each) and a sample with a video: with every token
    kept, the same ids, logits and generated tokens as the stock model."""
    images = [noise_image(70, 40, 1), noise_image(64, 64, 2)]
    text = prompt(processor, images=2)
    stock_batch = processor(images=[images], text=[text], return_tensors="pt")
    video_batch = processor(videos=[noise_video(3)], text=[prompt(processor, 0, 1)], return_tensors="pt")
    with torch.no_grad():
        stock = [model(**b).logits for b in (stock_batch, video_batch)]
        stock_gen = [
            model.generate(**b, max_new_tokens=5, do_sample=False) for b in (stock_batch, video_batch)
        ]
    visionzip(model, dominant=PATCHES, contextual=0, feature_layer=-1)
    visionzip_processor(processor, model.config)
    ours_batch = processor(images=[images], text=[text], return_tensors="pt")
    assert torch.equal(ours_batch["input_ids"], stock_batch["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(model(**ours_batch).logits, stock[0])
        assert torch.equal(model.generate(**ours_batch, max_new_tokens=5, do_sample=False), stock_gen[0])
    visionzip(model, dominant=POOLED, contextual=0, feature_layer=-1)
    visionzip_processor(processor, model.config)
    ours_video = processor(videos=[noise_video(3)], text=[prompt(processor, 0, 1)], return_tensors="pt")
    assert torch.equal(ours_video["input_ids"], video_batch["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(model(**ours_video).logits, stock[1])
        assert torch.equal(model.generate(**ours_video, max_new_tokens=5, do_sample=False), stock_gen[1])


def test_keep_all_of_a_tiled_image_is_the_stock_grid_without_newlines(model, processor):
    """A 1 x 2 tiling of a 64 x 128 image (nothing to unpad, under anyres_max_2): the stock
    sequence is the base crop then each row of the 8 x 16 grid and a newline; kept whole, VisionZip
    gives the same tokens without the newlines."""
    batch = processor.image_processor(images=[noise_image(64, 128, 3)], return_tensors="pt")
    with torch.no_grad():
        stock = model.model.get_image_features(**batch).pooler_output[0]
        visionzip(model, dominant=PATCHES, contextual=0, feature_layer=-1)
        ours = model.model.get_image_features(**batch).pooler_output[0]
    grid = stock[PATCHES:].view(SIDE, 2 * SIDE + 1, -1)
    assert torch.equal(grid[:, -1], model.model.image_newline.expand(SIDE, -1))
    without_newlines = torch.cat([stock[:PATCHES], grid[:, :-1].reshape(-1, stock.shape[-1])])
    assert ours.shape == without_newlines.shape == (3 * PATCHES, 64)
    torch.testing.assert_close(ours, without_newlines, atol=1e-6, rtol=1e-5)


# --- counts, batches, generate ------------------------------------------------------------------------


def test_counts_equal_features_for_mixed_sizes_and_the_stock_count_is_transformers_own(model, processor):
    sizes = [(64, 64), (30, 200), (200, 30), (100, 140), (190, 190), (1, 300)]
    images = [noise_image(h, w, seed=h + w) for h, w in sizes]
    stock = processor(images=images, text=[prompt(processor)] * len(sizes), return_tensors="pt", padding=True)
    stock_ids = (stock["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert stock_ids == [num_image_tokens(model.config, s) for s in sizes]  # downsampling included
    visionzip(model, dominant=D, contextual=K, feature_layer=-1)
    visionzip_processor(processor, model.config)
    count = image_token_count(model.config, VisionZipConfig(dominant=D, contextual=K, feature_layer=-1))
    batch = processor(images=images, text=[prompt(processor)] * len(sizes), return_tensors="pt", padding=True)
    ids = (batch["input_ids"] == model.config.image_token_id).sum(1).tolist()
    with torch.no_grad():
        features = model.model.get_image_features(
            pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"]
        ).pooler_output
        model(**batch)  # the placeholder check inside the model passes
    crops = {crops_per_image(model.config, s) for s in sizes}
    assert len(crops) >= 3
    for size, n, feat in zip(sizes, ids, features):
        assert n == feat.shape[0] == crops_per_image(model.config, size) * (D + K) == count(size), size


def _left(processor, **kwargs):
    processor.tokenizer.padding_side = "left"
    return processor(return_tensors="pt", padding=True, **kwargs)


def test_batched_multi_turn_generate_with_left_padding_matches_single_rows(model, processor):
    visionzip(model, dominant=D, contextual=K, feature_layer=-1)
    visionzip_processor(processor, model.config)
    template = processor.apply_chat_template
    turns = [
        [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
            {"role": "user", "content": [{"type": "text", "text": "And the shape, in the top left corner?"}]},
        ],
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}],
    ]
    texts = [template(t, add_generation_prompt=True, tokenize=False) for t in turns]
    images = [noise_image(40, 150, 4), noise_image(130, 130, 5)]
    batch = _left(processor, images=images, text=texts)
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        new = model.generate(**batch, max_new_tokens=6, do_sample=False)[:, batch["input_ids"].shape[1] :]
    for i in range(2):
        single = _left(processor, images=[images[i]], text=[texts[i]])
        with torch.no_grad():
            alone = model.generate(**single, max_new_tokens=6, do_sample=False)
        assert torch.equal(alone[0, single["input_ids"].shape[1] :], new[i]), i


def test_multi_image_sample_and_video_compressed(model, processor):
    """Two images in one sample: one crop + newline each; a video: D + K per pooled frame + one
    newline; both reach the LLM (another second image or frame changes the logits)."""
    visionzip(model, dominant=D, contextual=K, feature_layer=-1)
    visionzip_processor(processor, model.config)
    first = noise_image(90, 50, 6)
    logits = []
    for seed in (7, 8):
        batch = processor(
            images=[[first, noise_image(50, 90, seed)]], text=[prompt(processor, 2)], return_tensors="pt"
        )
        assert int((batch["input_ids"] == model.config.image_token_id).sum()) == 2 * (D + K + 1)
        with torch.no_grad():
            logits.append(model(**batch).logits[0, -1])
    assert not torch.allclose(*logits)
    video = processor(videos=[noise_video(4, 1)], text=[prompt(processor, 0, 1)], return_tensors="pt")
    assert video["pixel_values_videos"].shape == (1, 4, 3, 64, 64)
    assert int((video["input_ids"] == model.config.video_token_id).sum()) == 4 * (D + K) + 1
    assert (
        family_for(model).compressed_tokens_per_video(
            model.config, VisionZipConfig(dominant=D, contextual=K), (4, 48, 80)
        )
        == 4 * (D + K) + 1
    )
    with torch.no_grad():
        out = model.generate(**video, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == video["input_ids"].shape[1] + 3


def test_video_frames_follow_the_rule_on_pooled_tokens(model, processor):
    """Each frame: the stock pooled features; its received-attention map and keys pooled by the
    same bilinear call; the top-D pooled tokens in raster order, then K merged tokens."""
    from visionzip_core.algorithm import compress_selected, select_by_scores
    from visionzip_core.families.llava_onevision import capture_received_attention

    visionzip(model, dominant=D, contextual=K, feature_layer=-1)
    video = processor.video_processor(videos=[noise_video(2, 2)], return_tensors="pt")["pixel_values_videos"]
    inner = model.model
    with torch.no_grad():
        ours = inner.get_video_features(video).pooler_output
        frames = video.flatten(0, 1)
        tower = inner.vision_tower(frames, output_hidden_states=True)
        stock = inner.apply_pooling(inner.multi_modal_projector(tower.hidden_states[-1]))
        _, scores, keys = capture_received_attention(inner.vision_tower, frames, -1)

        def grid(x):  # (2, 64, X) -> (2, 16, X): the stock pooling's bilinear call, written out
            x = x.view(2, SIDE, SIDE, -1).permute(0, 3, 1, 2)
            x = torch.nn.functional.interpolate(x, size=[4, 4], mode="bilinear")
            return x.permute(0, 2, 3, 1).reshape(2, POOLED, -1)

        selection = select_by_scores(grid(scores[..., None])[..., 0], grid(keys), D, K)
        expected = compress_selected(stock, selection).reshape(1, -1, 64)
    assert ours.shape == (1, 2 * (D + K) + 1, 64)
    torch.testing.assert_close(ours[:, :-1], expected)
    torch.testing.assert_close(ours[0, -1], inner.image_newline)


# --- the folder as downloaded, bad input ------------------------------------------------------------


def test_visionzip_and_load_visionzip_processor_on_the_download_layout(folder, tmp_path):
    files = {p.name for p in folder.iterdir()}
    assert {
        "config.json",
        "model.safetensors.index.json",
        "chat_template.json",
        "preprocessor_config.json",
        "processor_config.json",
        "added_tokens.json",
        "vocab.json",
        "merges.txt",
        "special_tokens_map.json",
    } <= files
    assert (folder / "video_processor" / "preprocessor_config.json").is_file()
    raw = json.loads((folder / "config.json").read_text())
    assert "image_token_index" in raw and "torch_dtype" in raw["text_config"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(k.startswith("language_model.model.") for k in index)
    assert any(k.startswith("vision_tower.vision_model.") for k in index)
    model = family_for("llava-onevision").load(str(folder)).eval()
    visionzip(model, dominant=D, contextual=K, feature_layer=-1)
    processor = load_visionzip_processor(str(folder), model.config)
    image = noise_image(100, 60, 9)
    batch = processor(images=[image], text=[prompt(processor)], return_tensors="pt")
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == crops_per_image(
        model.config, (100, 60)
    ) * (D + K)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = load_visionzip_model(tmp_path).eval()
    again = load_visionzip_processor(tmp_path)
    assert torch.equal(
        again(images=[image], text=[prompt(again)], return_tensors="pt")["input_ids"], batch["input_ids"]
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)


def test_bad_input_is_one_clear_line(model, processor, tmp_path):
    def one_line(match, call):
        with pytest.raises(ValueError, match=match) as err:
            call()
        assert "\n" not in str(err.value)

    one_line(
        r"dominant \+ contextual = 70 exceeds the 64 tokens",
        lambda: visionzip(model, dominant=60, contextual=10, feature_layer=-1),
    )
    one_line(
        r"feature_layer=-2 differs from model.config.vision_feature_layer=-1",
        lambda: visionzip(model, dominant=D, contextual=K, feature_layer=-2),
    )
    one_line(
        "takes counts per crop",
        lambda: visionzip(model, dominant_ratio=0.4, contextual_ratio=0.1, feature_layer=-1),
    )
    visionzip(model, dominant=20, contextual=5, feature_layer=-1)
    visionzip_processor(processor, model.config)
    one_line(
        r"a video frame \(16 tokens after the 2x2 pooling\)",
        lambda: processor(videos=[noise_video(2)], text=[prompt(processor, 0, 1)]),
    )
    visionzip(model, dominant=D, contextual=K, feature_layer=-1)
    visionzip_processor(processor, model.config)
    one_line(
        "Found total 2 <image> tokens and 1 images",
        lambda: processor(images=[noise_image(64, 64)], text=[prompt(processor, images=2)]),
    )
    (tmp_path / "processor_config.json").write_text("{}")
    one_line(
        "missing preprocessor_config.json", lambda: load_visionzip_processor(str(tmp_path), model.config)
    )


def test_the_7b_config_as_downloaded_counts_as_transformers_does():
    """llava-onevision-qwen2-7b-ov-hf's config.json (4.x keys): 729 tokens per 384 px crop, the 36
    tilings; the stock count is transformers' processor formula (unpadding, newlines, anyres_max_9
    downsampling), the compressed one ``crops x 64`` at 54 + 10."""
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

    pinpoints = [[384 * r, 384 * c] for r in range(1, 7) for c in range(1, 7)]
    raw = {
        "model_type": "llava_onevision",
        "image_token_index": 151646,
        "video_token_index": 151647,
        "image_grid_pinpoints": pinpoints,
        "vision_aspect_ratio": "anyres_max_9",
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
        "text_config": {
            "model_type": "qwen2",
            "hidden_size": 3584,
            "num_hidden_layers": 28,
            "rope_theta": 1000000.0,
            "torch_dtype": "bfloat16",
            "vocab_size": 152128,
        },
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_hidden_layers": 26,
            "num_attention_heads": 16,
            "image_size": 384,
            "patch_size": 14,
            "vision_use_head": False,
        },
    }
    family = family_for("llava-onevision")
    config = family.config_from_dict(raw)
    assert config.image_token_id == 151646 and family.tower_tokens(config) == 729
    stock = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)
    stock.num_image_tokens, stock.vision_aspect_ratio = 729, "anyres_max_9"
    stock.image_processor = type("P", (), {"image_grid_pinpoints": pinpoints})()
    vz = VisionZipConfig(dominant=54, contextual=10, feature_layer=-1)
    for size in [(384, 384), (480, 640), (1080, 1920), (2000, 300), (4000, 4000)]:
        assert family.stock_tokens_per_image(config, size) == stock._get_number_of_features(
            *size, 384, 384
        ), size
        assert family.compressed_tokens_per_image(config, vz, size) == crops_per_image(config, size) * 64
    assert family.stock_tokens_per_image(config, (384, 384)) == 729 + 729 + 27
    assert family.compressed_tokens_per_video(config, vz, (8, 384, 384)) == 8 * 64 + 1


# --- videos in training: the data pipeline and the trainer's forward -------------------------------------


def _training_rows(images_dir) -> list[dict]:
    """Text-only, image, a 3-frame video, an image with a 2-frame video (frames 70 x 100 px), and two
    images in one sample (one crop and a newline each, not tiled)."""
    for i, (h, w) in enumerate([(50, 130), (90, 60)]):
        noise_image(h, w, i).save(images_dir / f"im{i}.png")
    for k in range(3):
        noise_image(70, 100, 20 + k).save(images_dir / f"fr{k}.png")

    def ask(parts: list[dict], question: str, answer: str, sid: str) -> dict:
        return {
            "id": sid,
            "messages": [
                {"role": "user", "content": [*parts, {"type": "text", "text": question}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ],
        }

    video = {"type": "video", "video": ["fr0.png", "fr1.png", "fr2.png"]}
    return [
        ask([], "Say hi.", "Hi.", "text"),
        ask([{"type": "image", "image": "im0.png"}], "What is it?", "A cat.", "image"),
        ask([video], "What moves?", "A dog.", "video"),
        ask(
            [{"type": "image", "image": "im1.png"}, {**video, "video": video["video"][:2]}],
            "Same?",
            "No.",
            "both",
        ),
        ask(
            [{"type": "image", "image": "im0.png"}, {"type": "image", "image": "im1.png"}],
            "Same?",
            "No.",
            "two",
        ),
    ]


def _training_dataset(folder, processor, vz, tmp_path):
    """The trainer's dataset of :func:`_training_rows`, built as ``training/modeling.py`` builds it."""
    from visionzip_core.data import DataSettings, build_dataset
    from visionzip_core.data.templates import tokenizer_of
    from visionzip_core.families import video_token_count

    family = family_for("llava-onevision")
    config = family.config_from_file(str(folder / "config.json"))
    images = tmp_path / "images"
    images.mkdir()
    rows = _training_rows(images)
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = DataSettings(
        train=[{"path": str(path), "image_folder": str(images)}],
        template="chat_template",
        image_placement="keep",
        image_aspect_ratio="anyres",
        num_workers=0,
        cache_dir=str(tmp_path / "cache"),
    )
    dataset = build_dataset(
        settings,
        "train",
        tokenizer_of(processor),
        processor.image_processor,
        image_token_count(config, vz),
        image_token=family.image_token,
        video_processor=processor.video_processor,
        video_token=family.video_token,
        video_tokens=video_token_count(config, vz),
        image_layout=family.image_layout(processor.image_processor, processor.video_processor),
    )
    return dataset, rows, images


@pytest.mark.parametrize("compressed", [False, True], ids=["stock", "visionzip"])
def test_training_data_is_the_processors_ids_for_images_and_videos(folder, processor, compressed, tmp_path):
    """Each sample the trainer encodes (text, a tiled image, a video, an image and a video, two images)
    holds the ids the processor writes for it (the stock processor, or the VisionZip-adapted one), and
    the pixels."""
    vz = VisionZipConfig(dominant=D, contextual=K, feature_layer=-1) if compressed else None
    config = family_for("llava-onevision").config_from_file(str(folder / "config.json"))
    if vz is not None:
        visionzip_processor(processor, config=vz)
    dataset, rows, images = _training_dataset(folder, processor, vz, tmp_path)
    for i, row in enumerate(rows):
        item = dataset[i]
        parts = row["messages"][0]["content"]
        pictures = [Image.open(images / p["image"]).convert("RGB") for p in parts if p["type"] == "image"]
        videos = [
            [Image.open(images / f).convert("RGB") for f in p["video"]] for p in parts if p["type"] == "video"
        ]
        text = processor.apply_chat_template(row["messages"], tokenize=False)
        # One sample's images as one list: the processor lays out two images of one sample apart.
        ref = processor(
            text=[text], images=[pictures] if pictures else None, videos=videos or None, return_tensors="pt"
        )
        assert item["input_ids"].tolist() == ref["input_ids"][0].tolist(), row["id"]
        if videos:
            assert torch.equal(item["pixel_values_videos"], ref["pixel_values_videos"].flatten(0, 1))
            assert item["video_frames"].tolist() == [len(v) for v in videos]
        if pictures:
            crops = ref["pixel_values"][0] if len(pictures) == 1 else ref["pixel_values"][:, 0]
            assert torch.equal(item["pixel_values"], crops)
            assert item["batch_num_images"].tolist() == ref["batch_num_images"].tolist() == [len(pictures)]
    video_id = config.video_token_id
    per_frame = (D + K) if compressed else POOLED
    assert (dataset[2]["input_ids"] == video_id).sum() == 3 * per_frame + 1
    per_image = (D + K) if compressed else PATCHES
    assert (dataset[4]["input_ids"] == config.image_token_id).sum() == 2 * (per_image + 1)


@pytest.mark.parametrize("compressed", [False, True], ids=["stock", "visionzip"])
def test_the_trainers_forward_on_a_mixed_batch_is_the_models_forward_per_sample(
    folder, processor, compressed, tmp_path
):
    """The trainer's forward (one tower and projector call for the batch: text, a tiled image, videos of
    3 and 2 frames, two one-crop images) gives each row the logits the model's own forward gives that
    sample alone, and calls the same modules in the same order for every kind of batch (ZeRO-3: ranks stay in step);
    packed rows give the unpacked loss."""
    from visionzip_core.data import DataCollator
    from visionzip_core.data.collate import PackingCollator
    from visionzip_core.testing.call_order import call_order, first_difference

    family = family_for("llava-onevision")
    vz = VisionZipConfig(dominant=D, contextual=K, feature_layer=-1) if compressed else None
    reference = family.load(str(folder)).eval()
    if vz is not None:
        visionzip(reference, config=vz)
        visionzip_processor(processor, config=vz)
    dataset, _, _ = _training_dataset(folder, processor, vz, tmp_path)
    items = [dataset[i] for i in range(len(dataset))]
    trained = family.load(str(folder)).eval()
    if vz is not None:
        visionzip(trained, config=vz)
    family.keep_vision_in_graph(trained)
    pad = processor.tokenizer.pad_token_id
    collate = DataCollator(pad_token_id=pad)
    batch = collate(items)
    with torch.no_grad():
        logits = trained(**batch).logits
        for row, item in enumerate(items):
            alone = {"input_ids": item["input_ids"][None]}
            if "pixel_values" in item:
                alone |= {k: item[k] for k in ("pixel_values", "image_sizes", "batch_num_images")}
            if "pixel_values_videos" in item:
                alone["pixel_values_videos"] = item["pixel_values_videos"][None]
            n = len(item["input_ids"])
            torch.testing.assert_close(logits[row, :n], reference(**alone).logits[0], rtol=1e-4, atol=1e-4)
    # Packed rows (the samples reordered, videos and images following their rows) give the same loss.
    lengths = [len(item["input_ids"]) for item in items]
    packed = PackingCollator(pad_token_id=pad, max_tokens_per_row=sum(sorted(lengths)[-2:]))(items)
    assert packed["input_ids"].shape[0] < len(items)

    def summed_loss(rows):
        rows = {k: v for k, v in rows.items() if k != "num_tokens"}
        # No cache, as the trainer runs: with one, transformers reads no sample boundaries from positions.
        return trained(**rows, use_cache=False).loss * (rows["labels"][:, 1:] != -100).sum()

    with torch.no_grad():
        torch.testing.assert_close(summed_loss(packed), summed_loss(batch), rtol=1e-5, atol=1e-5)
    kinds = {
        "text-only": [items[0]],
        "image": [items[1], items[0]],
        "video": [items[2]],
        "image and video": [items[3], items[2]],
        "two images": [items[4]],
    }
    trained.train()
    orders = {kind: call_order(trained, trained, **collate(rows)) for kind, rows in kinds.items()}
    assert len(set(orders["video"])) > 10 and first_difference(orders) is None, first_difference(orders)
