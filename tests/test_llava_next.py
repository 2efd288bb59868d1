"""VisionZip on a tiny LLaVA-NeXT saved to disk: per-crop parity, the layout rule, counts that match
features for every image size (mixed-size batches, generate, multi-turn), save/load, bad input."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

from visionzip_core import (
    VisionZipConfig,
    load_visionzip_model,
    load_visionzip_processor,
    num_image_tokens,
    visionzip,
    visionzip_processor,
)
from visionzip_core.algorithm import visionzip_compress
from visionzip_core.capture import resolve_feature_layer
from visionzip_core.families import family_for, image_token_count
from visionzip_core.families.llava_next import crops_per_image, tile_grid

SIDE = 8  # patches per crop side: 112 px / 14 px
PATCHES = SIDE * SIDE
D, K = 7, 3  # dominant (CLS + 6 patches) and contextual tokens per crop


@pytest.fixture
def model(tiny_llava_next_dir):
    return LlavaNextForConditionalGeneration.from_pretrained(tiny_llava_next_dir).eval()


@pytest.fixture
def processor(tiny_llava_next_dir):
    return LlavaNextProcessor.from_pretrained(tiny_llava_next_dir)


def noise_image(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 255, (h, w, 3), dtype=np.uint8))


def crops_of(processor, image):
    out = processor.image_processor(images=[image], return_tensors="pt")
    return out["pixel_values"][0], out["image_sizes"][0]


def eager_crop_tokens(tower, projector, pixel_values, vz: VisionZipConfig):
    """Each crop compressed from the stock eager tower's own outputs (attention weights returned
    by the model, keys from k_proj), then projected: ``(crops, D + K, H)`` and the dominant patches."""
    n_layers = len(tower.encoder.layers)
    index = resolve_feature_layer(vz.feature_layer, n_layers)
    attn = tower.encoder.layers[index - 1].self_attn
    keys = {}

    def hook(_m, _i, out):
        b, n, _ = out.shape
        keys["k"] = out.view(b, n, attn.num_heads, attn.head_dim).mean(2)

    handle = attn.k_proj.register_forward_hook(hook)
    try:
        out = tower(pixel_values, output_attentions=True, output_hidden_states=True)
    finally:
        handle.remove()
    hidden = out.hidden_states[vz.feature_layer]
    cls_attention = out.attentions[index - 1][:, :, 0, :].sum(1)
    tokens = projector(visionzip_compress(hidden, cls_attention, keys["k"], vz))
    top = cls_attention[:, 1:].topk(vz.dominant - 1, dim=1).indices.sort(dim=1).values  # patch numbers
    return tokens, top


def reference_layout(tokens, top, grid, vz: VisionZipConfig):
    """The documented layout, written out with loops: base crop; the tiles' dominant patches in
    raster order over the whole tiled grid; the tiles' CLS; the tiles' contextual tokens."""
    rows, cols = grid
    d = vz.dominant
    out = list(tokens[0])
    placed = []
    for t in range(rows * cols):
        for slot, patch in enumerate(top[t + 1].tolist()):
            y = (t // cols) * SIDE + patch // SIDE
            x = (t % cols) * SIDE + patch % SIDE
            placed.append((y, x, tokens[t + 1][1 + slot]))  # slot 0 is CLS
    out += [feat for _, _, feat in sorted(placed, key=lambda p: (p[0], p[1]))]
    out += [tokens[t + 1][0] for t in range(rows * cols)]
    for t in range(rows * cols):
        out += list(tokens[t + 1][d:])
    return torch.stack(out)


@pytest.mark.parametrize("size", [(112, 112), (60, 200), (300, 90), (224, 230), (100, 400)])
def test_each_crop_matches_the_eager_reference_and_the_layout_rule(tiny_llava_next_dir, model, size):
    eager = LlavaNextForConditionalGeneration.from_pretrained(
        tiny_llava_next_dir, attn_implementation="eager"
    ).eval()
    processor = LlavaNextProcessor.from_pretrained(tiny_llava_next_dir)
    pixel_values, image_size = crops_of(processor, noise_image(*size, seed=sum(size)))
    vz = VisionZipConfig(dominant=D, contextual=K)
    visionzip(model, config=vz)
    with torch.no_grad():
        ours = model.model.get_image_features(
            pixel_values=pixel_values[None], image_sizes=image_size[None]
        ).pooler_output
        tokens, top = eager_crop_tokens(
            eager.model.vision_tower, eager.model.multi_modal_projector, pixel_values, vz
        )
    grid = tile_grid(model.config, size)
    assert len(pixel_values) == 1 + grid[0] * grid[1] == crops_per_image(model.config, size)
    expected = reference_layout(tokens, top, grid, vz)
    assert len(ours) == 1 and ours[0].shape == expected.shape == (len(pixel_values) * (D + K), 64)
    torch.testing.assert_close(ours[0], expected, atol=1e-5, rtol=1e-4)


def test_keeping_every_patch_is_the_stock_grid_without_newlines(model, processor):
    """With every patch kept and CLS dropped, the base crop and the tile grid are the stock model's
    own features: for a 2x2 grid of a square image (nothing to unpad) the stock sequence is the
    base crop, then each row of the 16 x 16 grid followed by image_newline."""
    image = noise_image(224, 224, seed=3)
    batch = processor.image_processor(images=[image], return_tensors="pt")
    with torch.no_grad():
        stock = model.model.get_image_features(
            pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"]
        ).pooler_output[0]
        visionzip(model, dominant=PATCHES, contextual=0, keep_cls=False)
        ours = model.model.get_image_features(
            pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"]
        ).pooler_output[0]
    width = 2 * SIDE
    grid = stock[PATCHES:].view(2 * SIDE, width + 1, -1)
    assert torch.equal(grid[:, -1], model.model.image_newline.expand(2 * SIDE, -1))
    without_newlines = torch.cat([stock[:PATCHES], grid[:, :-1].reshape(-1, stock.shape[-1])])
    assert ours.shape == without_newlines.shape == (5 * PATCHES, 64)
    torch.testing.assert_close(ours, without_newlines, atol=1e-6, rtol=1e-5)


def random_sizes(n: int, seed: int = 0) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    sizes = [(rng.randint(8, 700), rng.randint(8, 700)) for _ in range(n)]
    # the tilings' own shapes and their boundaries, tall and wide extremes, a 1-pixel side
    sizes += [(112, 224), (224, 112), (224, 224), (336, 112), (112, 336), (111, 225), (1, 500), (500, 1)]
    return sizes


def test_processor_count_equals_features_for_many_sizes_in_mixed_batches(model, processor):
    visionzip(model, dominant=D, contextual=K)
    visionzip_processor(processor, model.config)
    count = image_token_count(model.config, VisionZipConfig(dominant=D, contextual=K))
    sizes = random_sizes(40)
    seen_crops = set()
    for start in range(0, len(sizes), 8):  # batches of 8 mixed sizes
        chunk = sizes[start : start + 8]
        images = [noise_image(h, w, seed=h * 7 + w) for h, w in chunk]
        prompts = [f"USER: <image>\nWhat is here {i}? ASSISTANT: a" for i in range(len(chunk))]
        batch = processor(images=images, text=prompts, return_tensors="pt", padding=True)
        per_sample = (batch["input_ids"] == model.config.image_token_id).sum(1).tolist()
        with torch.no_grad():
            features = model.model.get_image_features(
                pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"]
            ).pooler_output
            model(**batch)  # the placeholder check inside the model passes
        for size, n_ids, feat in zip(chunk, per_sample, features):
            crops = crops_per_image(model.config, size)
            seen_crops.add(crops)
            assert n_ids == feat.shape[0] == crops * (D + K) == count(size), size
            assert n_ids == num_image_tokens(model.config, size)
    assert seen_crops == {3, 4, 5}  # every tiling was exercised


def test_stock_count_is_transformers_own(model, processor):
    """Without VisionZip the family's count equals what the stock processor inserts and the stock
    model produces (unpadding and newlines included)."""
    for h, w in random_sizes(12, seed=1):
        batch = processor(images=[noise_image(h, w)], text=["<image>"], return_tensors="pt")
        ids = int((batch["input_ids"] == model.config.image_token_id).sum())
        with torch.no_grad():
            feats = model.model.get_image_features(
                pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"]
            ).pooler_output[0]
        assert ids == feats.shape[0] == num_image_tokens(model.config, (h, w)), (h, w)


def _batch(processor, prompts, images):
    processor.tokenizer.padding_side = "left"
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


def test_batched_generate_with_mixed_sizes_matches_single_prompts(model, processor):
    visionzip(model, dominant=D, contextual=K)
    visionzip_processor(processor, model.config)
    prompts = [
        "USER: <image>\nWhat colour is the shape? ASSISTANT:",
        "USER: <image>\nHow many? ASSISTANT:",
        "USER: <image>\nDescribe the picture in the top left corner please. ASSISTANT:",
    ]
    images = [noise_image(90, 300, 1), noise_image(112, 112, 2), noise_image(400, 150, 3)]
    batch = _batch(processor, prompts, images)
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=6, do_sample=False)
    new = out[:, batch["input_ids"].shape[1] :]
    for i in range(3):
        single = _batch(processor, [prompts[i]], [images[i]])
        with torch.no_grad():
            alone = model.generate(**single, max_new_tokens=6, do_sample=False)
        assert torch.equal(alone[0, single["input_ids"].shape[1] :], new[i]), i


def test_second_turn_with_two_images_of_different_sizes(model, processor):
    visionzip(model, dominant=D, contextual=K)
    visionzip_processor(processor, model.config)
    first_image = noise_image(60, 200, 4)
    follow_up = "USER: <image>\nWhat colour? ASSISTANT: red</s>USER: <image>\nAnd this one? ASSISTANT:"
    logits = []
    for second in (noise_image(300, 90, 5), noise_image(300, 90, 6)):
        turn = _batch(processor, [follow_up], [first_image, second])
        expected = (crops_per_image(model.config, (60, 200)) + crops_per_image(model.config, (300, 90))) * (
            D + K
        )
        assert int((turn["input_ids"] == model.config.image_token_id).sum()) == expected
        with torch.no_grad():
            logits.append(model(**turn).logits[0, -1])
            generated = model.generate(**turn, max_new_tokens=4, do_sample=False)
        assert generated.shape[1] == turn["input_ids"].shape[1] + 4
    assert not torch.allclose(logits[0], logits[1])  # the second image reaches the LLM


def test_save_load_round_trip(model, processor, tmp_path):
    visionzip(model, dominant=D, contextual=K)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["visionzip"]["dominant"] == D and saved["visionzip"]["contextual"] == K
    loaded = load_visionzip_model(tmp_path).eval()
    assert type(loaded) is LlavaNextForConditionalGeneration
    reloaded = load_visionzip_processor(tmp_path)
    image = noise_image(300, 90, 7)
    batch = reloaded(images=[image], text=["USER: <image>\nWhat? ASSISTANT:"], return_tensors="pt")
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == 4 * (D + K)
    with torch.no_grad():
        expected = model(**batch).logits
        got = loaded(**batch).logits
    torch.testing.assert_close(got, expected)


def test_training_gets_gradients_and_image_newline_is_unused(model, processor):
    visionzip(model, dominant=D, contextual=K)
    visionzip_processor(processor, model.config)
    family = family_for(model)
    assert family.unused_params(model) == {"model.image_newline"}
    batch = processor(
        images=[noise_image(100, 300, 8)], text=["USER: <image>\nWhat? ASSISTANT: red"], return_tensors="pt"
    )
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    assert model.model.image_newline.grad is None


def test_text_only_batches_keep_the_vision_path_in_the_graph(model, processor):
    visionzip(model, dominant=D, contextual=K)
    family_for(model).keep_vision_in_graph(model)
    for p in model.parameters():
        p.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    batch = processor.tokenizer(["USER: hello ASSISTANT: hi"], return_tensors="pt")
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()  # a projector-only loss still has a gradient (exactly zero)
    grad = model.model.multi_modal_projector.linear_1.weight.grad
    assert grad is not None and torch.count_nonzero(grad) == 0


def test_bad_input_is_one_clear_line(model, processor, tiny_llava_dir):
    from transformers import LlavaProcessor

    with pytest.raises(ValueError, match=r"dominant \+ contextual .*65") as err:
        visionzip(model, dominant=60, contextual=10)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="llava-next family takes LlavaNextProcessor; got LlavaProcessor"):
        family_for(model).adapt_processor(LlavaProcessor.from_pretrained(tiny_llava_dir), VisionZipConfig())
    with pytest.raises(ValueError, match="depends on the image size"):
        num_image_tokens(visionzip(model, dominant=D, contextual=K).config)


def test_remove_visionzip_restores_the_stock_model_and_processor(model, processor):
    image = noise_image(300, 90, 9)
    prompt = ["USER: <image>\nWhat? ASSISTANT:"]
    stock_batch = processor(images=[image], text=prompt, return_tensors="pt")
    with torch.no_grad():
        stock = model(**stock_batch).logits
    visionzip(model, dominant=D, contextual=K)
    visionzip_processor(processor, model.config)
    assert (
        processor(images=[image], text=prompt, return_tensors="pt")["input_ids"].shape[1]
        < stock_batch["input_ids"].shape[1]
    )
    from visionzip_core import remove_visionzip

    remove_visionzip(model)
    visionzip_processor(processor, model.config)  # no settings recorded: the stock count again
    again = processor(images=[image], text=prompt, return_tensors="pt")
    assert torch.equal(again["input_ids"], stock_batch["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(model(**again).logits, stock)
