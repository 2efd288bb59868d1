"""VisionZip on a tiny llava-hf checkpoint saved to disk: features, training, generation, save/load."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import LlamaForCausalLM, LlavaForConditionalGeneration, LlavaProcessor
from transformers.modeling_outputs import BaseModelOutputWithPooling

from visionzip_core import (
    VisionZipConfig,
    load_visionzip_model,
    load_visionzip_processor,
    num_image_tokens,
    remove_visionzip,
    visionzip,
    visionzip_processor,
)

PATCHES = 64
TEXT_HIDDEN = 64


@pytest.fixture
def model(tiny_llava_dir):
    return LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir).eval()


@pytest.fixture
def processor(tiny_llava_dir):
    return LlavaProcessor.from_pretrained(tiny_llava_dir)


def pixels(batch=2, seed=0):
    return torch.randn(batch, 3, 112, 112, generator=torch.Generator().manual_seed(seed))


def image(colour):
    return Image.new("RGB", (128, 100), colour)


def test_keeping_every_patch_reproduces_stock_features(model):
    pixel_values = pixels(3)
    with torch.no_grad():
        stock = model.get_image_features(pixel_values=pixel_values).pooler_output
        visionzip(model, dominant=PATCHES, contextual=0, keep_cls=False)
        ours = model.get_image_features(pixel_values=pixel_values).pooler_output
    assert len(ours) == len(stock) == 3
    for a, b in zip(ours, stock):
        assert torch.equal(a, b)


def test_get_image_features_type_and_shapes(model):
    visionzip(model, dominant=9, contextual=3)
    out = model.get_image_features(pixel_values=pixels(2))
    assert isinstance(out, BaseModelOutputWithPooling)
    assert isinstance(out.pooler_output, list) and len(out.pooler_output) == 2
    assert all(t.shape == (12, TEXT_HIDDEN) for t in out.pooler_output)
    assert out.last_hidden_state.shape == (2, PATCHES + 1, 32)
    # The base model path (LlavaModel.get_image_features) is the same adapted method.
    inner = model.model.get_image_features(pixel_values=pixels(2)).pooler_output
    torch.testing.assert_close(torch.stack(inner), torch.stack(out.pooler_output))
    assert model.config.visionzip == VisionZipConfig(dominant=9, contextual=3).model_dump(exclude_none=True)
    assert model.config.image_seq_length == 12 == num_image_tokens(model.config)


def test_bf16(model):
    model.to(torch.bfloat16)
    visionzip(model, dominant=9, contextual=3)
    out = model.get_image_features(pixel_values=pixels(2)).pooler_output
    assert all(t.dtype == torch.bfloat16 and t.shape == (12, TEXT_HIDDEN) for t in out)


def _batch(processor, prompts, images, padding_side="right"):
    processor.tokenizer.padding_side = padding_side
    return processor(text=prompts, images=images, return_tensors="pt", padding=True)


def test_gradients_reach_projector_and_unfrozen_tower(model, processor):
    visionzip(model, dominant=9, contextual=3)
    visionzip_processor(processor, model.config)
    batch = _batch(
        processor, ["USER: <image>\nWhat colour? ASSISTANT: red"] * 2, [image("red"), image("blue")]
    )
    batch["labels"] = batch["input_ids"].clone()
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.model.multi_modal_projector.parameters():
        p.requires_grad_(True)
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for p in model.model.multi_modal_projector.parameters()
    )
    assert all(p.grad is None for p in model.model.vision_tower.parameters())

    model.zero_grad(set_to_none=True)
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(True)
    model(**batch).loss.backward()
    tower = model.model.vision_tower
    # Feature layer -2 of 3: layers 0 and 1 run and learn; layer 2 and post_layernorm never run.
    for i in (0, 1):
        assert tower.encoder.layers[i].mlp.fc2.weight.grad.abs().sum() > 0
    assert tower.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in tower.encoder.layers[2].parameters())
    assert all(p.grad is None for p in tower.post_layernorm.parameters())


def test_processor_inserts_compressed_count(model, processor, tmp_path):
    stock = _batch(processor, ["USER: <image>\nHi ASSISTANT:"], [image("red")])
    assert (stock["input_ids"] == model.config.image_token_id).sum() == PATCHES
    visionzip(model, dominant=9, contextual=3)
    visionzip_processor(processor, model.config)
    ours = _batch(processor, ["USER: <image>\nHi ASSISTANT:"], [image("red")])
    assert (ours["input_ids"] == model.config.image_token_id).sum() == 12
    assert processor._get_num_multimodal_tokens(image_sizes=[[100, 128]] * 2).num_image_tokens == [12, 12]
    visionzip_processor(processor, VisionZipConfig(dominant=20, contextual=4))
    assert (
        _batch(processor, ["<image>"], [image("red")])["input_ids"] == model.config.image_token_id
    ).sum() == 24

    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = load_visionzip_processor(tmp_path)
    assert (
        _batch(reloaded, ["<image> hi"], [image("red")])["input_ids"] == model.config.image_token_id
    ).sum() == 12
    processor_only = tmp_path / "processor-only"
    processor.save_pretrained(processor_only)
    with pytest.raises(ValueError, match="config.json"):
        load_visionzip_processor(processor_only)
    explicit = load_visionzip_processor(
        processor_only, model_config=VisionZipConfig(dominant=5, contextual=1)
    )
    assert (
        _batch(explicit, ["<image>"], [image("red")])["input_ids"] == model.config.image_token_id
    ).sum() == 6


def test_batched_generate_matches_single_prompts(model, processor):
    visionzip(model, dominant=9, contextual=3)
    visionzip_processor(processor, model.config)
    prompts = [
        "USER: <image>\nWhat colour is the shape? ASSISTANT:",
        "USER: <image>\nHow many? ASSISTANT:",
        "USER: <image>\nDescribe the picture in the top left corner please. ASSISTANT:",
    ]
    images = [image("red"), image("green"), image("blue")]
    batch = _batch(processor, prompts, images, padding_side="left")
    assert (batch["attention_mask"] == 0).any()  # padding really happened
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=6, do_sample=False)
    new = out[:, batch["input_ids"].shape[1] :]
    assert new.shape == (3, 6)
    for i in range(3):
        single = _batch(processor, [prompts[i]], [images[i]], padding_side="left")
        with torch.no_grad():
            alone = model.generate(**single, max_new_tokens=6, do_sample=False)
        assert torch.equal(alone[0, single["input_ids"].shape[1] :], new[i]), i


def test_second_turn_with_two_images(model, processor):
    visionzip(model, dominant=9, contextual=3)
    visionzip_processor(processor, model.config)
    first = _batch(processor, ["USER: <image>\nWhat colour? ASSISTANT:"], [image("red")], padding_side="left")
    with torch.no_grad():
        answer_ids = model.generate(**first, max_new_tokens=5, do_sample=False)[
            0, first["input_ids"].shape[1] :
        ]
    answer = processor.tokenizer.decode(answer_ids, skip_special_tokens=True)
    follow_up = f"USER: <image>\nWhat colour? ASSISTANT: {answer}</s>USER: <image>\nAnd this one? ASSISTANT:"
    outputs = []
    for second in ("green", "yellow"):
        turn = _batch(processor, [follow_up], [image("red"), image(second)], padding_side="left")
        assert (turn["input_ids"] == model.config.image_token_id).sum() == 24
        with torch.no_grad():
            logits = model(**turn).logits[0, -1]
            generated = model.generate(**turn, max_new_tokens=4, do_sample=False)
        assert generated.shape[1] == turn["input_ids"].shape[1] + 4
        outputs.append(logits)
    # The second image's tokens reach the LLM: changing it changes the next-token logits.
    assert not torch.allclose(outputs[0], outputs[1])


def test_save_load_round_trip(model, tmp_path):
    visionzip(model, dominant=20, contextual=7, merge="mean")
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["visionzip"] == {
        "dominant": 20,
        "contextual": 7,
        "feature_layer": -2,
        "keep_cls": True,
        "merge": "mean",
    }
    assert saved["image_seq_length"] == 27

    plain = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert plain.config.visionzip == saved["visionzip"] and plain.config.image_seq_length == 27

    loaded = load_visionzip_model(tmp_path).eval()
    pixel_values = pixels(2)
    with torch.no_grad():
        expected = model.get_image_features(pixel_values=pixel_values).pooler_output
        got = loaded.get_image_features(pixel_values=pixel_values).pooler_output
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert got[0].shape == (27, TEXT_HIDDEN)


def test_load_without_settings_is_an_error(tiny_llava_dir):
    with pytest.raises(ValueError, match="visionzip"):
        load_visionzip_model(tiny_llava_dir)


def test_remove_and_reconfigure(model):
    pixel_values = pixels(2)
    with torch.no_grad():
        stock = model.get_image_features(pixel_values=pixel_values).pooler_output
        visionzip(model, dominant=9, contextual=3)
        visionzip(model, dominant=30, contextual=5, keep_cls=False)
        assert model.get_image_features(pixel_values=pixel_values).pooler_output[0].shape == (35, TEXT_HIDDEN)
        assert model.config.image_seq_length == 35
        assert remove_visionzip(model) is model
        restored = model.get_image_features(pixel_values=pixel_values).pooler_output
    assert not hasattr(model.config, "visionzip") and model.config.image_seq_length == PATCHES
    assert "visionzip" not in model.config.to_dict()
    assert all(torch.equal(a, b) for a, b in zip(restored, stock))


def test_unsupported_class_lists_supported(tiny_pretrain_dirs):
    _, llm_dir = tiny_pretrain_dirs
    llm = LlamaForCausalLM.from_pretrained(llm_dir)
    with pytest.raises(ValueError, match="LlavaForConditionalGeneration, LlavaModel"):
        visionzip(llm, dominant=9, contextual=3)
    with pytest.raises(ValueError, match="LlavaForConditionalGeneration"):
        visionzip(torch.nn.Linear(2, 2), dominant=9, contextual=3)


def test_list_feature_layer_rejected(model):
    model.config.vision_feature_layer = [-2, -1]
    with pytest.raises(ValueError, match="vision_feature_layer"):
        visionzip(model, dominant=9, contextual=3)


def test_peft_wrapped_model(model, processor):
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=r".*language_model.*\.(q_proj|v_proj)"))
    assert visionzip(wrapped, dominant=9, contextual=3) is wrapped
    assert wrapped.config.visionzip["dominant"] == 9
    visionzip_processor(processor, wrapped.config)
    batch = _batch(processor, ["USER: <image>\nHi ASSISTANT: red"], [image("red")])
    loss = wrapped(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    lora = [p for n, p in wrapped.named_parameters() if "lora_" in n]
    assert lora and any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
