"""The FLOP model against torch's own count of a real training step on a tiny LLaVA.

``FlopCounterMode`` counts every matmul that runs (it does not see CPU SDPA kernels, hence eager
attention here). Forward and backward are counted separately and must match exactly.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from visionzip_core import num_image_tokens, remove_visionzip, visionzip
from visionzip_core.bench.memory_sim import TINY_SIZE
from visionzip_core.families.clip_llama import SIZES, VisionTowerShape, llava_step_flops
from visionzip_core.families.flops import LORA_TARGETS, Flops, LlamaShape, TrainableParts

BATCH, TEXT = 2, 11


def _tiny_eager_llava():
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from visionzip_core.families.llava import tiny_text_config, tiny_vision_config

    config = LlavaConfig(
        vision_config=tiny_vision_config(),
        text_config=tiny_text_config(300),
        image_token_id=299,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlavaForConditionalGeneration._from_config(config, attn_implementation="eager")


def _batch(model):
    k = num_image_tokens(model.config)
    text = torch.randint(0, 298, (BATCH, TEXT))
    image = torch.full((BATCH, k), model.config.image_token_id)
    input_ids = torch.cat([text[:, :3], image, text[:, 3:]], dim=1)
    pixel_values = torch.randn(BATCH, 3, 112, 112)
    return input_ids, pixel_values


def _counted(model, input_ids, pixel_values) -> Flops:
    with FlopCounterMode(display=False) as forward_counter:
        loss = model(input_ids=input_ids, pixel_values=pixel_values, labels=input_ids).loss
    with FlopCounterMode(display=False) as backward_counter:
        loss.backward()
    return Flops(forward_counter.get_total_flops(), backward_counter.get_total_flops())


def _set_trainable(model, parts: TrainableParts) -> None:
    inner = model.model
    for p in model.parameters():
        p.requires_grad_(False)
    for p in inner.multi_modal_projector.parameters():
        p.requires_grad_(parts.projector)
    for p in inner.vision_tower.parameters():
        p.requires_grad_(parts.vision)
    if parts.llm == "full":
        for p in list(inner.language_model.parameters()) + list(model.lm_head.parameters()):
            p.requires_grad_(True)
        # Embedding rows are a lookup, not a matmul; keep them out so the count is pure matmuls.
        inner.language_model.embed_tokens.weight.requires_grad_(False)


def _modelled(model, parts: TrainableParts, input_ids, split) -> Flops:
    cfg = model.config
    return llava_step_flops(
        VisionTowerShape.from_config(cfg.vision_config),
        LlamaShape.from_config(cfg.text_config),
        parts,
        num_images=BATCH,
        batch=input_ids.shape[0],
        seq_len=input_ids.shape[1],
        image_tokens=num_image_tokens(cfg),
        feature_layer=cfg.vision_feature_layer,
        visionzip_split=split,
    )["total"]


@pytest.mark.parametrize(
    "parts",
    [
        TrainableParts(projector=True),
        TrainableParts(vision=True, projector=True, llm="full"),
        TrainableParts(vision=True, projector=False),
    ],
    ids=["projector", "everything", "vision-only"],
)
@pytest.mark.parametrize("split", [None, (6, 3), (10, 0)], ids=["stock", "6+3", "10+0"])
def test_flop_model_matches_flop_counter(parts, split):
    model = _tiny_eager_llava()
    if split is not None:
        visionzip(model, dominant=split[0], contextual=split[1])
    _set_trainable(model, parts)
    input_ids, pixel_values = _batch(model)
    counted = _counted(model, input_ids, pixel_values)
    modelled = _modelled(model, parts, input_ids, split)
    assert counted.forward > 0 and counted.backward > 0
    assert modelled == counted


@pytest.mark.parametrize("split", [None, (6, 3)], ids=["stock", "6+3"])
def test_flop_model_matches_flop_counter_lora(split):
    from peft import LoraConfig, get_peft_model

    model = _tiny_eager_llava()
    if split is not None:
        visionzip(model, dominant=split[0], contextual=split[1])
    _set_trainable(model, TrainableParts(projector=True))
    model = get_peft_model(
        model,
        LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            target_modules=rf".*language_model.*\.({'|'.join(LORA_TARGETS)})",
        ),
    )
    for p in model.base_model.model.model.multi_modal_projector.parameters():
        p.requires_grad_(True)
    parts = TrainableParts(projector=True, llm="lora", lora_rank=4, lora_targets=LORA_TARGETS)
    input_ids, pixel_values = _batch(model.base_model.model)
    counted = _counted(model, input_ids, pixel_values)
    assert _modelled(model.base_model.model, parts, input_ids, split) == counted


def test_frozen_model_forward_only_and_budget_ratio():
    """No trainable part: no backward. Compressing shrinks the modelled step, mostly in the LLM."""
    vision = VisionTowerShape(
        hidden=1024, intermediate=4096, layers=24, heads=16, image_size=336, patch_size=14
    )
    llm = LlamaShape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32064)
    text = 128
    parts = TrainableParts(projector=True)
    stock = llava_step_flops(vision, llm, parts, num_images=1, batch=1, seq_len=576 + text, image_tokens=576)
    small = llava_step_flops(
        vision,
        llm,
        parts,
        num_images=1,
        batch=1,
        seq_len=64 + text,
        image_tokens=64,
        visionzip_split=(54, 10),
    )
    assert stock["vision"].backward == 0 and small["vision"].backward == 0
    # One fewer tower layer, and an LLM over 192 instead of 704 tokens.
    assert small["vision"].forward < stock["vision"].forward
    ratio = stock["total"].total / small["total"].total
    assert 3.0 < ratio < 704 / 192
    frozen = TrainableParts(projector=False)
    assert (
        llava_step_flops(vision, llm, frozen, num_images=1, batch=1, seq_len=704, image_tokens=576)[
            "total"
        ].backward
        == 0
    )


def test_remove_visionzip_restores_stock_count():
    model = _tiny_eager_llava()
    parts = TrainableParts(projector=True)
    _set_trainable(model, parts)
    remove_visionzip(visionzip(model, dominant=6, contextual=3))
    input_ids, pixel_values = _batch(model)
    assert _counted(model, input_ids, pixel_values) == _modelled(model, parts, input_ids, None)


def test_bad_trainable_parts_rejected():
    with pytest.raises(ValueError, match="lora_rank"):
        TrainableParts(llm="lora")
    with pytest.raises(ValueError, match="not modelled"):
        TrainableParts(projector=False, llm="full")


@pytest.mark.parametrize("split", [None, (6, 3)], ids=["stock", "6+3"])
def test_flop_model_matches_generate_prefill(split):
    """Inference prefill: forward only, LM head on the last position (as ``generate`` does)."""
    model = _tiny_eager_llava().eval()
    if split is not None:
        visionzip(model, dominant=split[0], contextual=split[1])
    input_ids, pixel_values = _batch(model)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=input_ids, pixel_values=pixel_values, logits_to_keep=1)
    cfg = model.config
    modelled = llava_step_flops(
        VisionTowerShape.from_config(cfg.vision_config),
        LlamaShape.from_config(cfg.text_config),
        TrainableParts(projector=False),
        num_images=BATCH,
        batch=BATCH,
        seq_len=input_ids.shape[1],
        image_tokens=num_image_tokens(cfg),
        visionzip_split=split,
        logits_positions=1,
    )["total"]
    assert modelled == Flops(counter.get_total_flops(), 0)


@pytest.mark.parametrize("split", [None, (6, 3)], ids=["stock", "6+3"])
@pytest.mark.parametrize("size", [(112, 224), (300, 100)], ids=["1x2-tiles", "3x1-tiles"])
def test_flop_model_matches_flop_counter_for_llava_next(split, size):
    """Anyres: the tower runs per crop; stock NeXT projects every crop's patches and then unpads."""
    from transformers import LlavaNextForConditionalGeneration

    from visionzip_core.families import family_for
    from visionzip_core.families.llava import tiny_text_config, tiny_vision_config
    from visionzip_core.families.llava_next import crops_per_image

    family = family_for("llava-next")
    config = family.build_config(tiny_vision_config(), tiny_text_config(300), image_token_id=299)
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration._from_config(config, attn_implementation="eager")
    if split is not None:
        visionzip(model, dominant=split[0], contextual=split[1])
    parts = TrainableParts(projector=True)
    _set_trainable(model, parts)
    crops = crops_per_image(config, size)
    k = num_image_tokens(model.config, size)
    text = torch.randint(0, 298, (BATCH, TEXT))
    input_ids = torch.cat([text[:, :3], torch.full((BATCH, k), 299), text[:, 3:]], dim=1)
    pixel_values = torch.randn(BATCH * crops, 3, 112, 112)
    image_sizes = torch.tensor([list(size)] * BATCH)
    with FlopCounterMode(display=False) as forward_counter:
        loss = model(
            input_ids=input_ids, pixel_values=pixel_values, image_sizes=image_sizes, labels=input_ids
        ).loss
    with FlopCounterMode(display=False) as backward_counter:
        loss.backward()
    counted = Flops(forward_counter.get_total_flops(), backward_counter.get_total_flops())
    modelled = llava_step_flops(
        VisionTowerShape.from_config(config.vision_config),
        LlamaShape.from_config(config.text_config),
        parts,
        num_images=BATCH,
        batch=BATCH,
        seq_len=input_ids.shape[1],
        image_tokens=k,
        visionzip_split=split,
        crops_per_image=crops,
        projector_tokens_per_image=crops * 64 if split is None else k,
    )["total"]
    assert counted.forward > 0 and modelled == counted


def test_shapes_and_configs_map_both_ways():
    """One mapping between a shape and its config: every benchmark size's tower and LLM come back
    from the configs they build (a Llama shape without head_dim reads back the implied one)."""
    for size in [*SIZES.values(), TINY_SIZE]:
        assert VisionTowerShape.from_config(size.vision.to_config()) == size.vision
        llm = LlamaShape.from_config(size.llm.to_config())
        assert llm.head_dim == size.llm.hidden // size.llm.heads
        assert replace(llm, head_dim=None) == size.llm
    grouped = LlamaShape(
        hidden=768, intermediate=4096, layers=4, heads=6, kv_heads=2, vocab=16384, head_dim=128
    )
    assert LlamaShape.from_config(grouped.to_config()) == grouped
    assert grouped.to_config(pad_token_id=7).pad_token_id == 7


def test_every_benchmark_size_has_an_analytic_flop_model():
    """The bench scripts take the FLOP-ideal from each family's ``step_flops`` (checked against
    ``FlopCounterMode`` in this file and beside each family's benchmarks), not from a count."""
    from visionzip_core.families import FAMILIES

    sizes = [(f.name, name, s) for f in FAMILIES if f.bench_sizes for name, s in f.bench_sizes.items()]
    assert {family for family, _, _ in sizes} >= {"qwen2.5-vl", "qwen3-vl", "qwen3.5", "llava-onevision"}
    assert [(family, name) for family, name, s in sizes if not s.flop_model] == []


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl", "qwen3.5"])
def test_qwen_flop_models_match_flop_counter_when_compressed(family):
    """At 25 % kept (0.20 + 0.05 of each image's merged tokens) the Qwen families' ``step_flops``
    equals torch's count to the FLOP: a training step with the mergers trained (forward + backward,
    VisionZip's score, key similarity and merge included, the merge passing gradients back to the
    mergers) and ``generate``'s prefill (forward, the LM head on the last position only)."""
    from visionzip_core.bench.budgets import budgets_for, image_plan, set_budget
    from visionzip_core.bench.random_models import build_random_model
    from visionzip_core.families import family_for
    from visionzip_core.families.flops import counted_flops

    fam = family_for(family)
    size = replace(fam.bench_sizes["cpu"].quick(), text_tokens=(30, 30))
    model = build_random_model(size, "cpu", family=family)
    model.set_attn_implementation("eager")
    for name, p in model.named_parameters():
        p.requires_grad_(fam.module_group(name) == "projector")
    budgets = budgets_for(family)
    plan = image_plan(model.config, family, 25)
    set_budget(model, 25, budgets)
    batch = fam.bench_batch(size, model.config, plan)
    seq_len = batch["input_ids"].shape[1]
    counted = counted_flops(lambda: model(**batch).loss.backward())
    ours = fam.step_flops(size, model.config, TrainableParts(), plan, budgets[25], samples=1, seq_len=seq_len)
    assert ours["visionzip"].forward > 0 and ours["total"].total == counted
    prompt = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        prefill = counted_flops(lambda: model(**prompt, logits_to_keep=1))
    frozen = TrainableParts(projector=False)
    ours = fam.step_flops(
        size, model.config, frozen, plan, budgets[25], samples=1, seq_len=seq_len, logits_positions=1
    )
    assert ours["total"].forward == prefill  # bench_prefill.py reads the forward
