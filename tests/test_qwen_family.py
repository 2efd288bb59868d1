"""Qwen2.5-VL and Qwen2-VL families: the authors' rule against an eager-attention reference, keep-all parity with
the stock model, mixed-size batches, batched multi-turn generate, video, and one-line errors.

The model is the tiny download-layout folder (4.x config and key names, sharded safetensors, the
real chat template), loaded the user's way: ``family.load`` and the torchvision-free processor.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import warm_python
from PIL import Image
from transformers import AttentionInterface
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import eager_attention_forward

from visionzip_core.adapt import remove_visionzip, visionzip, visionzip_processor
from visionzip_core.config import VisionZipConfig
from visionzip_core.families import family_for
from visionzip_core.families.qwen2_5_vl import compress_vision
from visionzip_core.testing.tiny import write_tiny


# Qwen2.5-VL (windowed attention, the authors' release) and Qwen2-VL (full attention everywhere).
@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen2_vl"])
def tiny_qwen(request, tmp_path_factory):
    return write_tiny(request.param, tmp_path_factory.mktemp(request.param) / "tiny")


@pytest.fixture()
def family(tiny_qwen):
    import json

    return family_for(json.loads((tiny_qwen / "config.json").read_text())["model_type"])


@pytest.fixture()
def model(tiny_qwen, family):
    return family.load(str(tiny_qwen)).eval()


@pytest.fixture()
def processor(tiny_qwen, family):
    return family.load_processor(str(tiny_qwen))


def _image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((width, height), Image.Resampling.NEAREST)


def _chat(processor, turns: list[list], add_generation_prompt: bool = True) -> str:
    """A user/assistant conversation: each user turn a list of "image"/"video" markers and text."""
    messages = []
    for i, turn in enumerate(turns):
        if i % 2:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": turn}]})
            continue
        content = [{"type": p} if p in ("image", "video") else {"type": "text", "text": p} for p in turn]
        messages.append({"role": "user", "content": content})
    return processor.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _batch(processor, texts, images=None, videos=None):
    processor.tokenizer.padding_side = "left"
    return processor(text=texts, images=images, videos=videos, padding=True, return_tensors="pt")


# --- the rule, against an eager reference -------------------------------------------------------------


def _reference(model, pixel_values, grid_thw, vz: VisionZipConfig):
    """The documented rule from eager attention weights, written out with loops: the last block's
    softmax(q k^T) (post-RoPE), mean over heads, sum over queries, mean over each 2x2 unit, raster
    order; top-D by score; targets at a uniform stride over the rest; each other token to its most
    cosine-similar target (unit-averaged, head-averaged keys); target + mean of its members."""
    visual = model.model.visual
    last = visual.blocks[-1].attn
    calls = []

    def record(module, query, key, value, attention_mask=None, **kwargs):
        out, weights = eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
        if module is last:
            calls.append((weights.detach(), key.detach()))
        return out, weights

    AttentionInterface.register("visionzip_test_record", record)
    saved = visual.config._attn_implementation
    visual.config._attn_implementation = "visionzip_test_record"
    try:
        with torch.no_grad():
            merged = visual(pixel_values, grid_thw=grid_thw).pooler_output
    finally:
        visual.config._attn_implementation = saved
    # Segments (one per image here) in window order, concatenated.
    scores = torch.cat([w[0].float().mean(0).sum(0) for w, _ in calls])
    keys = torch.cat([k[0].float().mean(0) for _, k in calls])
    from transformers.vision_utils import get_vision_window_index

    scores = scores.view(-1, 4).mean(1)
    keys = keys.view(-1, 4, keys.shape[-1]).mean(1)
    if getattr(visual, "window_size", None):  # Qwen2.5-VL's blocks run in window order
        window_index, _ = get_vision_window_index(
            grid_thw, visual.spatial_merge_size, visual.window_size, visual.patch_size
        )
        reverse = torch.argsort(window_index)
        scores, keys = scores[reverse], keys[reverse]
    out, offset = [], 0
    for t, h, w in grid_thw.tolist():
        n = h * w // 4
        for _ in range(t):
            s, k, f = scores[offset : offset + n], keys[offset : offset + n], merged[offset : offset + n]
            d, c = vz.split_for(n)
            dominant = sorted(s.topk(d).indices.tolist())
            rest = [i for i in range(n) if i not in dominant]
            step = max(1, len(rest) // c) if c else 1
            targets = rest[::step][:c] if c else []
            members = {tgt: [] for tgt in targets}
            for i in rest:
                if i in targets:
                    continue
                sims = [float(F.cosine_similarity(k[i], k[tgt], dim=0)) for tgt in targets]
                members[targets[int(np.argmax(sims))]].append(i)
            rows = {i: f[i] for i in dominant}
            for tgt in targets:
                extra = torch.stack([f[i] for i in members[tgt]]).mean(0) if members[tgt] else 0
                rows[tgt] = f[tgt] + extra
            out.append((sorted(rows), torch.stack([rows[i] for i in sorted(rows)])))
            offset += n
    return out


@pytest.mark.parametrize(
    "split", [{"dominant_ratio": 0.45, "contextual_ratio": 0.1}, {"dominant": 7, "contextual": 3}]
)
def test_selection_equals_the_eager_reference_of_the_rule(model, processor, split):
    images = [_image(112, 168, 0), _image(140, 112, 1)]
    pixel = processor.image_processor(images=images, return_tensors="pt")
    vz = visionzip(model, **split).config.visionzip
    vz = VisionZipConfig(**vz)
    reference = _reference(model, pixel["pixel_values"], pixel["image_grid_thw"], vz)
    with torch.no_grad():
        features, kept, _ = compress_vision(model.model, pixel["pixel_values"], pixel["image_grid_thw"])
    assert len(features) == len(reference) == 2
    for (places, rows), got, where in zip(reference, features, kept):
        assert where.tolist() == places
        torch.testing.assert_close(got, rows, atol=1e-5, rtol=1e-5)


# --- parity and batches ---------------------------------------------------------------------------------


def test_keeping_every_token_reproduces_the_stock_logits(model, processor):
    texts = [_chat(processor, [["image", "What is it?"]]), _chat(processor, [["image", "image", "Compare."]])]
    images = [_image(112, 168, 0), _image(84, 56, 1), _image(140, 112, 2)]
    inputs = _batch(processor, texts, images)
    with torch.no_grad():
        stock = model(**inputs).logits
        visionzip(model, dominant_ratio=1.0, contextual_ratio=0.0)
        kept_all = visionzip_processor(processor, model.config)
        again = _batch(kept_all, texts, images)
        assert torch.equal(again["input_ids"], inputs["input_ids"])
        compressed = model(**again).logits
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(compressed[mask], stock[mask], atol=1e-5, rtol=1e-5)
    remove_visionzip(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits[mask], stock[mask])


def test_mixed_size_batch_counts_equal_features(model, processor):
    visionzip(model, dominant_ratio=0.5, contextual_ratio=0.1)
    adapted = visionzip_processor(processor, model.config)
    images = [_image(112, 168, 0), _image(56, 84, 1), _image(224, 140, 2)]
    texts = [_chat(adapted, [["image", "a"]]), _chat(adapted, [["image", "image", "b"]])]
    inputs = _batch(adapted, texts, images)
    with torch.no_grad():
        features = model.model.get_image_features(
            inputs["pixel_values"], inputs["image_grid_thw"]
        ).pooler_output
    image_id = model.config.image_token_id
    runs = []
    for row in inputs["input_ids"].tolist():
        run = 0
        for tok in row + [None]:
            if tok == image_id:
                run += 1
            elif run:
                runs.append(run)
                run = 0
    assert runs == [f.shape[0] for f in features]
    stock_counts = [int(g.prod()) // 4 for g in inputs["image_grid_thw"]]
    assert runs == [
        sum(VisionZipConfig(dominant_ratio=0.5, contextual_ratio=0.1).split_for(n)) for n in stock_counts
    ]
    assert all(r < n for r, n in zip(runs, stock_counts))
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()


def test_batched_multi_turn_generate_decodes_at_the_positions_a_full_forward_uses(model, processor):
    """Greedy generate at batch 2 (left padding, different image sizes, a multi-turn row): each
    generated token is the argmax of one forward over the finished sequence, so prefill positions
    (compressed) and decode positions (rope_deltas) agree with a fresh computation."""
    visionzip(model, dominant_ratio=0.4, contextual_ratio=0.1)
    adapted = visionzip_processor(processor, model.config)
    texts = [
        _chat(adapted, [["image", "Describe."]]),
        _chat(adapted, [["image", "First?"], "A cat.", ["image", "And this one?"]]),
    ]
    images = [_image(168, 112, 3), _image(112, 112, 4), _image(84, 140, 5)]
    inputs = _batch(adapted, texts, images)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 6
    full = dict(inputs)
    full["input_ids"] = out
    full["attention_mask"] = torch.cat(
        [inputs["attention_mask"], torch.ones(out.shape[0], 6, dtype=inputs["attention_mask"].dtype)], dim=1
    )
    full.pop("mm_token_type_ids", None)
    with torch.no_grad():
        logits = model(**full).logits
    prompt = inputs["input_ids"].shape[1]
    assert torch.equal(logits[:, prompt - 1 : -1].argmax(-1), out[:, prompt:])


def test_generate_with_every_token_kept_equals_stock_generate(model, processor):
    texts = [_chat(processor, [["image", "Hi"]]), _chat(processor, [["image", "Yo"], "ok", ["More"]])]
    images = [_image(112, 140, 6), _image(140, 84, 7)]
    inputs = _batch(processor, texts, images)
    with torch.no_grad():
        stock = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        visionzip(model, dominant_ratio=1.0, contextual_ratio=0.0)
        kept = model.generate(
            **_batch(visionzip_processor(processor, model.config), texts, images),
            max_new_tokens=5,
            do_sample=False,
        )
    assert torch.equal(stock, kept)


# --- video ----------------------------------------------------------------------------------------------


def test_video_is_compressed_per_temporal_group(model, processor):
    visionzip(model, dominant_ratio=0.5, contextual_ratio=0.1)
    adapted = visionzip_processor(processor, model.config)
    frames = [_image(112, 140, 10 + i) for i in range(4)]
    text = _chat(adapted, [["video", "What happens?"]])
    inputs = adapted(text=[text], videos=[frames], return_tensors="pt")
    grid = inputs["video_grid_thw"][0]
    assert grid.tolist()[0] == 2  # 4 frames, 2 per temporal group
    per_group = int(grid[1] * grid[2]) // 4
    expected = 2 * sum(VisionZipConfig(dominant_ratio=0.5, contextual_ratio=0.1).split_for(per_group))
    assert int((inputs["input_ids"] == model.config.video_token_id).sum()) == expected
    vz = VisionZipConfig(**model.config.visionzip)
    reference = _reference(model, inputs["pixel_values_videos"], inputs["video_grid_thw"], vz)
    with torch.no_grad():
        features, kept, _ = compress_vision(
            model.model, inputs["pixel_values_videos"], inputs["video_grid_thw"], "video"
        )
        logits = model(**inputs).logits
    rows = torch.cat([r for _, r in reference])
    torch.testing.assert_close(features[0], rows, atol=1e-5, rtol=1e-5)
    places = reference[0][0] + [p + per_group for p in reference[1][0]]
    assert kept[0].tolist() == places
    assert torch.isfinite(logits).all()


# --- errors ---------------------------------------------------------------------------------------------


def test_a_ratio_out_of_range_is_one_line():
    with pytest.raises(ValueError, match="dominant_ratio") as err:
        VisionZipConfig(dominant_ratio=1.5, contextual_ratio=0.1)
    assert "\n" not in str(err.value).strip().split("\n")[0]
    with pytest.raises(ValueError, match="keeps more than every token"):
        VisionZipConfig(dominant_ratio=0.8, contextual_ratio=0.3)
    with pytest.raises(ValueError, match="together"):
        VisionZipConfig(dominant_ratio=0.5)


def test_an_image_too_small_for_the_budget_names_it(model, processor):
    visionzip(model, dominant=30, contextual=5)
    adapted = visionzip_processor(processor, model.config)
    with pytest.raises(
        ValueError, match=r"image 0 has 4 visual tokens, too few for dominant \+ contextual = 35"
    ):
        adapted(text=[_chat(adapted, [["image", "x"]])], images=[_image(56, 56, 0)], return_tensors="pt")


def test_more_image_runs_than_images_is_one_line(model, processor):
    visionzip(model, dominant_ratio=0.5, contextual_ratio=0.1)
    adapted = visionzip_processor(processor, model.config)
    inputs = adapted(
        text=[_chat(adapted, [["image", "x"]])], images=[_image(112, 112, 0)], return_tensors="pt"
    )
    ids = inputs["input_ids"]
    pads = ids[0] == model.config.image_token_id
    doubled = torch.cat([ids[0], torch.tensor([5]), ids[0][pads]])[None]
    with pytest.raises(ValueError, match=r"more <\|image_pad\|> runs than the 1 image"):
        model(input_ids=doubled, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])


def test_kept_tokens_take_their_stock_positions_in_forward_and_in_generate(model, processor):
    """The LLM sees, for each kept token, the 3D position the stock model gives the merged token it
    stands at (a contextual token its target's), and the stock positions for all text."""
    image = _image(140, 168, 8)
    text = _chat(processor, [["image", "Where?"]])
    full = processor(text=[text], images=[image], return_tensors="pt")
    stock_positions, _ = type(model.model).get_rope_index(
        model.model,
        full["input_ids"],
        full["mm_token_type_ids"],
        full["image_grid_thw"],
        attention_mask=full["attention_mask"],
    )
    visionzip(model, dominant_ratio=0.3, contextual_ratio=0.1)
    small = visionzip_processor(processor, model.config)(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        _, kept, _ = compress_vision(model.model, small["pixel_values"], small["image_grid_thw"])
    image_id = model.config.image_token_id
    full_image = (full["input_ids"][0] == image_id).nonzero().flatten()
    small_image = (small["input_ids"][0] == image_id).nonzero().flatten()
    expected = torch.empty(3, small["input_ids"].shape[1], dtype=torch.long)
    before = int(small_image[0])
    expected[:, :before] = stock_positions[:, 0, :before]
    expected[:, small_image] = stock_positions[:, 0, full_image[kept[0]]]
    after = int(full_image[-1]) + 1
    expected[:, int(small_image[-1]) + 1 :] = stock_positions[:, 0, after:]

    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["position_ids"]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model(**small)
            model.generate(**small, max_new_tokens=2, do_sample=False)
    finally:
        hook.remove()
    assert torch.equal(seen[0][-3:, 0], expected)  # forward: (3, B, L)
    assert torch.equal(seen[1][-3:, 0], expected)  # generate's prefill: (4, B, L), rows 1..3 are 3D
    # decode continues after the last stock text position
    assert int(seen[2][-3:, 0, -1].max()) == int(stock_positions[:, 0].max()) + 1


def test_lookup_module_groups_and_lora_targets(model, processor, family):
    import re

    from peft import LoraConfig, get_peft_model

    assert family_for(model) is family and family_for(model.model) is family
    assert family_for(processor) is family and family_for(model.config) is family
    names = {n: family.module_group(n) for n, _ in model.named_parameters()}
    assert {n for n, g in names.items() if g == "projector"} == {
        n for n in names if n.startswith("model.visual.merger.")
    }
    assert {g for n, g in names.items() if n.startswith("model.visual.") and ".merger." not in n} == {
        "vision"
    }
    assert {g for n, g in names.items() if not n.startswith("model.visual.")} == {"llm"}
    pattern = re.compile(family.lora_target_regex(family.lora_targets))
    targets = [n for n, _ in model.named_modules() if pattern.fullmatch(n)]
    # the ViT's MLP has gate_proj/up_proj/down_proj too: none of them may be wrapped
    assert targets and not any(".visual." in n for n in targets)
    assert any(n.endswith("mlp.gate_proj") for n in targets)
    wrapped = get_peft_model(
        model, LoraConfig(r=2, target_modules=family.lora_target_regex(family.lora_targets))
    )
    assert family_for(wrapped) is family
    visionzip(wrapped, dominant_ratio=0.5, contextual_ratio=0.1)  # adapts the model inside the wrapper
    assert model.model.config.visionzip["dominant_ratio"] == 0.5


def test_save_and_reload_keep_the_split_for_model_and_processor(model, processor, tmp_path):
    from visionzip_core.adapt import load_visionzip_model, load_visionzip_processor

    visionzip(model, dominant_ratio=0.45, contextual_ratio=0.05)
    adapted = visionzip_processor(processor, model.config)
    model.save_pretrained(tmp_path)
    adapted.save_pretrained(tmp_path)
    again = load_visionzip_model(tmp_path).eval()
    again_processor = load_visionzip_processor(tmp_path)
    assert again.config.visionzip == model.config.visionzip
    texts = [_chat(adapted, [["image", "a"]]), _chat(adapted, [["image", "b"]])]
    images = [_image(112, 168, 0), _image(196, 84, 1)]
    first, second = _batch(adapted, texts, images), _batch(again_processor, texts, images)
    assert torch.equal(first["input_ids"], second["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(again(**second).logits, model(**first).logits)


def test_generate_cli_on_a_qwen_folder_with_an_image_and_a_video(tiny_qwen, tmp_path):
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    image = tmp_path / "img.png"
    _image(150, 90, 9).save(image)
    frames = []
    for i in range(4):
        frames.append(tmp_path / f"f{i}.png")
        _image(100, 130, 20 + i).save(frames[-1])
    cmd = [
        sys.executable,
        str(repo / "scripts/generate.py"),
        "--model",
        str(tiny_qwen),
        "--max-new-tokens",
        "2",
    ]
    run = warm_python.run(
        [
            *cmd,
            "--image",
            str(image),
            "--video",
            ",".join(map(str, frames)),
            "--dominant",
            "3",
            "--contextual",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    # 150x90 -> 140x84 after smart_resize: 5 x 3 = 15 merged tokens; 4 frames = 2 groups of 4 x 5
    assert "visual tokens per image: 4 of 15 (VisionZip dominant 3 + contextual 1)" in run.stdout
    assert "video tokens: 8 " in run.stdout
    bad = warm_python.run(
        [*cmd, "--image", str(image), "--dominant-ratio", "1.2", "--contextual-ratio", "0.1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2
    assert (
        bad.stderr.strip().splitlines()[-1]
        == "error: visionzip.dominant_ratio: Input should be less than or equal to 1"
    )
