"""Qwen3-VL (DeepStack) and Qwen3.5 (hybrid LLM) families: the rule and the DeepStack merge against
an eager reference written out with loops, keep-all parity with the stock model (logits and
generate), positions, mixed sizes, batched multi-turn generate, video per frame group, one-line
errors, and saving / reloading.

The models are tiny folders laid out as the downloads (``Qwen/Qwen3-VL-8B-Instruct``: 4.57 config
keys, ``chat_template.json``; ``Qwen/Qwen3.5-9B``: odd shard names, an ``mtp.*`` tensor,
``chat_template.jinja``), loaded the user's way: ``family.load`` and the torchvision-free processor.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AttentionInterface
from transformers.models.qwen3_vl.modeling_qwen3_vl import eager_attention_forward

from visionzip_core.adapt import (
    load_visionzip_model,
    load_visionzip_processor,
    remove_visionzip,
    visionzip,
    visionzip_processor,
)
from visionzip_core.config import VisionZipConfig
from visionzip_core.families import family_for
from visionzip_core.testing.tiny import write_tiny

VARIANTS = ["qwen3_vl", "qwen3_5"]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    return {v: write_tiny(v, tmp_path_factory.mktemp(v) / "tiny") for v in VARIANTS}


@pytest.fixture(params=VARIANTS)
def variant(request):
    return request.param


@pytest.fixture()
def folder(tiny_dirs, variant):
    return tiny_dirs[variant]


@pytest.fixture()
def family(variant):
    return family_for(variant)


@pytest.fixture()
def model(folder, family):
    return family.load(str(folder)).eval()


@pytest.fixture()
def processor(folder, family):
    processor = family.load_processor(str(folder))
    processor.tokenizer.padding_side = "left"
    return processor


def _image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((width, height), Image.Resampling.NEAREST)


def _chat(processor, turns: list) -> str:
    """User/assistant turns: a user turn is a list of "image"/"video" markers and text."""
    messages = []
    for i, turn in enumerate(turns):
        if i % 2:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": turn}]})
            continue
        content = [{"type": p} if p in ("image", "video") else {"type": "text", "text": p} for p in turn]
        messages.append({"role": "user", "content": content})
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _inputs(processor, texts, images=None, videos=None):
    return processor(text=texts, images=images, videos=videos, padding=True, return_tensors="pt")


# --- the eager reference ------------------------------------------------------------------------------


def _eager_tower(model, pixel_values, grid_thw):
    """The stock tower with eager attention, recording the last block's attention weights and
    post-RoPE keys per segment; returns ``(main, levels, weights, keys)``."""
    visual = model.model.visual
    last = visual.blocks[-1].attn
    calls = []

    def record(module, query, key, value, attention_mask=None, **kwargs):
        out, weights = eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
        if module is last:
            calls.append((weights.detach(), key.detach()))
        return out, weights

    AttentionInterface.register("visionzip_test_record3", record)
    saved = visual.config._attn_implementation
    visual.config._attn_implementation = "visionzip_test_record3"
    try:
        with torch.no_grad():
            out = visual(pixel_values, grid_thw=grid_thw)
    finally:
        visual.config._attn_implementation = saved
    levels = list(getattr(out, "deepstack_features", None) or [])
    return out.pooler_output, levels, calls


def _reference_selection(model, pixel_values, grid_thw, vz: VisionZipConfig):
    """Per frame group, written out with loops: scores = the last block's attention received (mean
    over heads, sum over queries), mean over each 2x2 unit; dominant = top-D; targets at a uniform
    stride over the rest; every other token joins its most cosine-similar target (unit- and
    head-averaged keys). Returns ``[(kept places, {target: members}, dominant)]`` per group and the
    tower outputs ``(main, levels)``."""
    main, levels, calls = _eager_tower(model, pixel_values, grid_thw)
    scores = torch.cat([w[0].float().mean(0).sum(0) for w, _ in calls])
    keys = torch.cat([k[0].float().mean(0) for _, k in calls])
    scores = scores.view(-1, 4).mean(1)
    keys = keys.view(-1, 4, keys.shape[-1]).mean(1)
    groups, offset = [], 0
    for t, h, w in grid_thw.tolist():
        n = h * w // 4
        for _ in range(t):
            s, k = scores[offset : offset + n], keys[offset : offset + n]
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
            groups.append((offset, sorted(dominant + targets), members))
            offset += n
    return groups, main, levels


def _merge(features: torch.Tensor, groups) -> torch.Tensor:
    """One feature table (main or one DeepStack level) compressed by the reference's selection:
    dominant rows as they are, each target + the mean of its members, in raster order."""
    rows = []
    for offset, places, members in groups:
        for p in places:
            row = features[offset + p]
            if members.get(p):
                row = row + torch.stack([features[offset + m] for m in members[p]]).mean(0)
            rows.append(row)
    return torch.stack(rows)


def _runs(ids: list[int], token: int) -> list[tuple[int, int]]:
    """``(start, length)`` of each run of ``token``."""
    out, start = [], None
    for i, t in enumerate([*ids, None]):
        if t == token and start is None:
            start = i
        elif t != token and start is not None:
            out.append((start, i - start))
            start = None
    return out


def _expected_positions(full_ids, small_ids, stock, kept_per_run, tokens) -> torch.Tensor:
    """``(3, L_small)``: text tokens keep their stock positions (in order); the ``r``-th vision run
    of the compressed row takes the stock positions of the ``r``-th full run at its kept places."""
    out = torch.empty(3, len(small_ids), dtype=torch.long)
    full_runs = sorted(r for t in tokens for r in _runs(full_ids, t))
    small_runs = sorted(r for t in tokens for r in _runs(small_ids, t))
    assert len(full_runs) == len(small_runs) == len(kept_per_run)
    full_text = [i for i, t in enumerate(full_ids) if t not in tokens]
    small_text = [i for i, t in enumerate(small_ids) if t not in tokens]
    out[:, small_text] = stock[:, full_text]
    for (fs, _), (ss, sl), kept in zip(full_runs, small_runs, kept_per_run):
        assert len(kept) == sl
        out[:, ss : ss + sl] = stock[:, [fs + k for k in kept]]
    return out


def _stock_positions(model, inputs) -> torch.Tensor:
    positions, _ = type(model.model).get_rope_index(
        model.model,
        inputs["input_ids"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"),
        attention_mask=inputs["attention_mask"],
    )
    return positions


def _reference_logits(model, small, groups, main, levels, positions, permute_levels=False):
    """The adapted model's logits rebuilt by hand: the compressed main rows written at the image
    tokens, the compressed DeepStack rows added at the same positions after the first decoder layers
    (the stock language model does the adding), the stock positions gathered at the kept places."""
    inner = model.model
    ids = small["input_ids"]
    with torch.no_grad():
        embeds = inner.get_input_embeddings()(ids).clone()
        mask = ids == model.config.image_token_id
        rows = _merge(main, groups)
        where = mask[0].nonzero().flatten()
        for j, p in enumerate(where.tolist()):
            embeds[0, p] = rows[j]
        extra = {}
        if levels:
            stacked = [_merge(level, groups) for level in levels]
            if permute_levels:
                stacked = [s.roll(1, dims=0) for s in stacked]
            extra = {"visual_pos_masks": mask, "deepstack_visual_embeds": stacked}
        text_row = (small["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
        hidden = inner.language_model(
            inputs_embeds=embeds,
            position_ids=torch.cat([text_row[None], positions[:, None]]),
            attention_mask=small["attention_mask"],
            **extra,
        ).last_hidden_state
        return model.lm_head(hidden)


@pytest.mark.parametrize(
    "split", [{"dominant_ratio": 0.45, "contextual_ratio": 0.15}, {"dominant": 5, "contextual": 2}]
)
def test_logits_equal_the_eager_reference_with_deepstack_merged_alike(model, processor, split, variant):
    """The rule, the merge of the main and of every DeepStack level with one selection, and the
    decoder fed the kept rows at their stock positions: the adapted model's logits equal the
    reference's; with the DeepStack rows moved by one token they do not (Qwen3-VL)."""
    texts = [_chat(processor, [["image", "image", "Compare."]])]
    images = [_image(128, 192, 0), _image(160, 128, 1)]
    full = _inputs(processor, texts, images)
    visionzip(model, **split)
    vz = VisionZipConfig(**model.config.visionzip)
    small = _inputs(visionzip_processor(processor, model.config), texts, images)
    groups, main, levels = _reference_selection(model, small["pixel_values"], small["image_grid_thw"], vz)
    assert bool(levels) == (variant == "qwen3_vl")
    positions = _expected_positions(
        full["input_ids"][0].tolist(),
        small["input_ids"][0].tolist(),
        _stock_positions(model, full)[:, 0],
        [places for _, places, _ in groups],
        {model.config.image_token_id},
    )
    reference = _reference_logits(model, small, groups, main, levels, positions)
    with torch.no_grad():
        logits = model(**small).logits
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-4)
    if levels:
        shifted = _reference_logits(model, small, groups, main, levels, positions, permute_levels=True)
        assert (logits - shifted).abs().max() > 1e-3


# --- parity and batches ---------------------------------------------------------------------------------


def test_keeping_every_token_reproduces_stock_logits_and_generate(model, processor):
    texts = [
        _chat(processor, [["image", "What is it?"]]),
        _chat(processor, [["image", "image", "Compare."], "Two.", ["And now?"]]),
    ]
    images = [_image(128, 192, 0), _image(64, 96, 1), _image(160, 128, 2)]
    inputs = _inputs(processor, texts, images)
    with torch.no_grad():
        stock = model(**inputs).logits
        stock_tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        visionzip(model, dominant_ratio=1.0, contextual_ratio=0.0)
        again = _inputs(visionzip_processor(processor, model.config), texts, images)
        assert torch.equal(again["input_ids"], inputs["input_ids"])
        kept = model(**again).logits
        kept_tokens = model.generate(**again, max_new_tokens=4, do_sample=False)
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(kept[mask], stock[mask], atol=1e-5, rtol=1e-5)
    assert torch.equal(kept_tokens, stock_tokens)


def test_mixed_sizes_and_frame_groups_counts_equal_feature_rows_and_positions_are_stock(model, processor):
    """Two images of different sizes and a 4-frame video (2 frame groups, a timestamp before each)
    in one row: each image's run and each group's run holds exactly its feature rows, and every
    token's 3D position is the stock one (text) or the stock one at its kept place (vision)."""
    texts = [_chat(processor, [["image", "video", "image", "What changes?"]])]
    images = [_image(128, 192, 0), _image(96, 64, 1)]
    frames = [_image(64, 128, 10 + i) for i in range(4)]
    full = _inputs(processor, texts, images, [frames])
    visionzip(model, dominant_ratio=0.4, contextual_ratio=0.2)
    vz = VisionZipConfig(**model.config.visionzip)
    adapted = visionzip_processor(processor, model.config)
    small = _inputs(adapted, texts, images, [frames])
    text = adapted.tokenizer.decode(small["input_ids"][0])
    assert text.count("seconds>") == 2  # the timestamps stay between the frame groups
    image_id, video_id = model.config.image_token_id, model.config.video_token_id
    with torch.no_grad():
        image_rows = model.model.get_image_features(
            small["pixel_values"], small["image_grid_thw"]
        ).pooler_output
        video_rows = model.model.get_video_features(
            small["pixel_values_videos"], small["video_grid_thw"]
        ).pooler_output
    ids = small["input_ids"][0].tolist()
    image_runs = [n for _, n in _runs(ids, image_id)]
    video_runs = [n for _, n in _runs(ids, video_id)]
    assert image_runs == [r.shape[0] for r in image_rows]
    assert len(video_runs) == 2 and sum(video_runs) == video_rows[0].shape[0]
    stock_counts = [int(g.prod()) // 4 for g in small["image_grid_thw"]]
    assert stock_counts[0] != stock_counts[1]
    assert image_runs == [sum(vz.split_for(n)) for n in stock_counts]
    # positions: against the reference's kept places per run, in sequence order
    groups_i, _, _ = _reference_selection(model, small["pixel_values"], small["image_grid_thw"], vz)
    groups_v, _, _ = _reference_selection(model, small["pixel_values_videos"], small["video_grid_thw"], vz)
    kept = [groups_i[0][1], groups_v[0][1], groups_v[1][1], groups_i[1][1]]  # image, 2 groups, image
    expected = _expected_positions(
        full["input_ids"][0].tolist(), ids, _stock_positions(model, full)[:, 0], kept, {image_id, video_id}
    )
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["position_ids"]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            logits = model(**small).logits
            model.generate(**small, max_new_tokens=2, do_sample=False)
    finally:
        hook.remove()
    assert torch.isfinite(logits).all()
    assert torch.equal(seen[0][-3:, 0], expected)  # forward
    assert torch.equal(seen[1][-3:, 0], expected)  # generate's prefill
    assert int(seen[2][-3:, 0, -1].max()) == int(_stock_positions(model, full)[:, 0].max()) + 1  # decode


def test_batched_multi_turn_generate_with_left_padding_equals_each_row_alone(model, processor):
    """Batch of 2 (left padding, mixed image sizes, a multi-turn row) through generate (Qwen3.5:
    through the hybrid linear-attention cache): each row's tokens equal its unbatched run."""
    visionzip(model, dominant_ratio=0.4, contextual_ratio=0.1)
    adapted = visionzip_processor(processor, model.config)
    texts = [
        _chat(adapted, [["image", "Describe."]]),
        _chat(adapted, [["image", "First?"], "A cat.", ["image", "And this one?"]]),
    ]
    images = [[_image(192, 128, 3)], [_image(128, 128, 4), _image(96, 160, 5)]]
    batch = _inputs(adapted, texts, images)
    assert (batch["attention_mask"][0] == 0).any()  # the short row is left padded
    with torch.no_grad():
        together = model.generate(**batch, max_new_tokens=5, do_sample=False)[:, -5:]
        for row, (text, pictures) in enumerate(zip(texts, images)):
            alone = model.generate(**_inputs(adapted, [text], pictures), max_new_tokens=5, do_sample=False)
            assert torch.equal(together[row], alone[0, -5:]), row


# --- errors ---------------------------------------------------------------------------------------------


def test_bad_budgets_and_placeholders_are_one_line(model, processor):
    # The library call raises the config's validation error naming the key (the commands print its
    # one line: test_generate_cli_on_the_qwen3_folders); nothing is adapted.
    with pytest.raises(ValueError, match="dominant_ratio"):
        visionzip(model, dominant_ratio=1.5, contextual_ratio=0.1)
    assert "visionzip" not in model.config.to_dict()
    visionzip(model, dominant=30, contextual=5)
    adapted = visionzip_processor(processor, model.config)
    with pytest.raises(
        ValueError, match=r"image 0 has 4 visual tokens, too few for dominant \+ contextual = 35"
    ):
        adapted(text=[_chat(adapted, [["image", "x"]])], images=[_image(64, 64, 0)], return_tensors="pt")
    remove_visionzip(model)
    visionzip(model, dominant_ratio=0.5, contextual_ratio=0.1)
    adapted = visionzip_processor(processor, model.config)
    inputs = adapted(
        text=[_chat(adapted, [["image", "x"]])], images=[_image(128, 128, 0)], return_tensors="pt"
    )
    ids = inputs["input_ids"][0]
    doubled = torch.cat([ids, torch.tensor([5]), ids[ids == model.config.image_token_id]])[None]
    with pytest.raises(ValueError, match=r"more <\|image_pad\|> runs than the 1 image") as err:
        model(input_ids=doubled, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    assert len(str(err.value).splitlines()) == 1


def test_module_groups_cover_every_deepstack_merger_and_lora_stays_in_the_llm(model, family, variant):
    import re

    names = {n: family.module_group(n) for n, _ in model.named_parameters()}
    projector = {n for n, g in names.items() if g == "projector"}
    expected = {
        n for n in names if n.startswith(("model.visual.merger.", "model.visual.deepstack_merger_list."))
    }
    assert projector == expected and any(".merger." in n for n in projector)
    assert any("deepstack" in n for n in projector) == (variant == "qwen3_vl")
    pattern = re.compile(family.lora_target_regex(family.lora_targets))
    targets = [n for n, _ in model.named_modules() if pattern.fullmatch(n)]
    assert targets and not any(".visual." in n for n in targets)
    if variant == "qwen3_5":  # the Gated DeltaNet layers (3 of 4) are adapted too
        assert any(n.endswith("linear_attn.in_proj_qkv") for n in targets)
        assert family.packing_refusal(model.config).startswith("its Gated DeltaNet layers")


def test_the_download_folder_and_a_saved_model_reload_with_the_split(model, processor, folder, tmp_path):
    """``visionzip(model, ...)`` + ``load_visionzip_processor(download, model.config)``, then
    ``save_pretrained`` of both and ``load_visionzip_model`` / ``load_visionzip_processor``."""
    assert json.loads((folder / "config.json").read_text())["model_type"] in VARIANTS
    visionzip(model, dominant_ratio=0.45, contextual_ratio=0.05)
    from_download = load_visionzip_processor(folder, model.config)
    from_download.tokenizer.padding_side = "left"
    texts = [_chat(from_download, [["image", "a"]]), _chat(from_download, [["image", "b"]])]
    images = [_image(128, 192, 0), _image(224, 96, 1)]
    first = _inputs(from_download, texts, images)
    model.save_pretrained(tmp_path)
    from_download.save_pretrained(tmp_path)
    again = load_visionzip_model(tmp_path).eval()
    again_processor = load_visionzip_processor(tmp_path)
    again_processor.tokenizer.padding_side = "left"
    assert again.config.visionzip == model.config.visionzip
    second = _inputs(again_processor, texts, images)
    assert torch.equal(first["input_ids"], second["input_ids"])
    n = int((first["input_ids"][0] == model.config.image_token_id).sum())
    assert n == sum(VisionZipConfig(dominant_ratio=0.45, contextual_ratio=0.05).split_for(4 * 6))
    with torch.no_grad():
        torch.testing.assert_close(again(**second).logits, model(**first).logits)


def test_training_data_lays_a_video_out_as_the_processor_does(model, processor):
    """The data pipeline's encoder expands a video placeholder into the processor's layout (a
    timestamp and a run per frame group, each with the group's compressed count): the ids of the
    user turn are the processor's."""
    from visionzip_core.data.encode import Encoder
    from visionzip_core.data.templates import tokenizer_of
    from visionzip_core.families import image_token_count, video_token_count

    visionzip(model, dominant_ratio=0.4, contextual_ratio=0.2)
    vz = VisionZipConfig(**model.config.visionzip)
    adapted = visionzip_processor(processor, model.config)
    frames = [_image(64, 128, 10 + i) for i in range(4)]
    question = [{"type": "video"}, {"type": "text", "text": "What moves?"}]
    text = adapted.apply_chat_template([{"role": "user", "content": question}], tokenize=False)
    inputs = adapted(text=[text], videos=[frames], return_tensors="pt")
    t, h, w = inputs["video_grid_thw"][0].tolist()
    encoder = Encoder(
        tokenizer=tokenizer_of(adapted),
        template="chat_template",
        image_token="<|image_pad|>",
        image_tokens_per_image=image_token_count(model.config, vz),
        model_max_length=512,
        image_placement="keep",
        video_token="<|video_pad|>",
        video_tokens_per_video=video_token_count(model.config, vz),
    )
    turns = [("user", "<|video_pad|>What moves?"), ("assistant", "A dog.")]
    ids, labels = encoder(turns, 0, [], video_sizes=[(2 * t, h * 16, w * 16)])
    end = model.config.text_config.eos_token_id  # <|im_end|>: the user turn's end
    expected = inputs["input_ids"][0].tolist()
    user = expected[: expected.index(end) + 1]
    assert ids[: len(user)] == user
    assert sum(i == model.config.video_token_id for i in ids) == 2 * sum(vz.split_for(h * w // 4))


def test_text_image_and_video_batches_call_the_same_modules_in_training(model, processor):
    """ZeRO-3 gathers a module's parameters when it is called, so every batch kind a rank can draw
    must call the same parameter-owning modules in the same order (embedding, tower with every
    DeepStack merger, LLM): a text-only batch runs the tower on a blank image, and the embeddings go
    to the stock forward once (Qwen3-VL's forward takes ids or embeddings, not both)."""
    from visionzip_core.testing.call_order import call_order, first_difference

    family = family_for(model)
    model.train()
    visionzip(model, dominant_ratio=0.25, contextual_ratio=0.25)
    family.keep_vision_in_graph(model)
    adapted = visionzip_processor(processor, model.config)
    frames = [_image(64, 64, 20 + i) for i in range(4)]
    batches = {
        "text": adapted(text=[_chat(adapted, [["Say hi."]])], return_tensors="pt"),
        "image": adapted(
            text=[_chat(adapted, [["image", "What?"]])], images=[_image(128, 128, 0)], return_tensors="pt"
        ),
        "video": adapted(text=[_chat(adapted, [["video", "What?"]])], videos=[frames], return_tensors="pt"),
    }
    orders = {}
    for kind, batch in batches.items():
        batch = {**batch, "labels": batch["input_ids"].clone()}
        orders[kind] = call_order(model, lambda b=batch: model(**b).loss.backward())
    assert first_difference(orders) is None, first_difference(orders)
    assert orders["text"].count("model.language_model.embed_tokens") == 1
    assert any("deepstack_merger_list" in name for name in orders["text"]) == (
        "Qwen3VL" in type(model).__name__
    )
