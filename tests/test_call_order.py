"""Every batch kind calls the parameter-owning modules in one order, per family (ZeRO-3 readiness).

ZeRO-3 gathers parameters with a collective per module call, so ranks drawing different batch
kinds in the same step must call the same modules in the same order: text-only, images, videos,
images and videos together, mixed rows, and a validation batch (eval mode, no grad). Checked as a
training run builds the model: VisionZip on or off, the vision path kept in the graph.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from visionzip_core.adapt import visionzip
from visionzip_core.families import family_for
from visionzip_core.testing.call_order import call_order, first_difference
from visionzip_core.testing.sync_counts import FAMILIES, SETTINGS, load_tiny


def _image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _qwen_text(processor, parts: list[str]) -> str:
    content = [{"type": p} for p in parts] + [{"type": "text", "text": "What is it? A cat."}]
    return processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False)


def _with_labels(batch) -> dict:
    batch = dict(batch)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def batch_kinds(family_name: str, processor) -> dict[str, dict]:
    """Each kind of micro-batch a rank can draw, as model inputs (with labels)."""
    processor.tokenizer.padding_side = "right"
    images = [_image(112, 168, 0), _image(84, 56, 1)]
    if family_name.startswith("qwen"):
        frames = [_image(56, 84, 10 + k) for k in range(4)]

        def run(parts_per_row, **media):
            texts = [_qwen_text(processor, parts) for parts in parts_per_row]
            return _with_labels(processor(text=texts, padding=True, return_tensors="pt", **media))

        return {
            "text-only": run([[], []]),
            "images": run([["image"], ["image"]], images=images),
            "video": run([["video"]], videos=[frames]),
            "images and video": run([["image"], ["video"]], images=images[:1], videos=[frames]),
            "image and text-only rows": run([["image"], []], images=images[:1]),
        }

    def run(prompts, imgs=None):
        return _with_labels(processor(text=prompts, images=imgs, padding=True, return_tensors="pt"))

    return {
        "text-only": run(["USER: hi ASSISTANT: a cat", "USER: and? ASSISTANT: a dog"]),
        "images": run(["USER: <image>\nWhat? ASSISTANT: a cat"] * 2, images),
        "image and text-only rows": run(
            ["USER: <image>\nWhat? ASSISTANT: a cat", "USER: hi ASSISTANT: no"], images[:1]
        ),
    }


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    model, processor = load_tiny(request.param, tmp_path_factory.mktemp("order"))
    return request.param, model, processor


@pytest.mark.parametrize("compressed", [True, False], ids=["visionzip", "stock"])
def test_every_batch_kind_calls_the_modules_in_one_order(tiny, compressed):
    family_name, model, processor = tiny
    family = family_for(family_name)
    family.remove(model)  # the module's model is shared: start from the stock instance
    if compressed:
        visionzip(model, **SETTINGS[family_name])
        from visionzip_core.adapt import visionzip_processor

        processor = visionzip_processor(processor, model.config)
    else:
        family.adapt_processor(processor, None, model.config)
    family.keep_vision_in_graph(model)
    kinds = batch_kinds(family_name, processor)
    orders = {}
    model.train()
    for kind, batch in kinds.items():
        orders[kind] = call_order(model, model, **batch)
    model.eval()
    with torch.no_grad():
        orders["validation"] = call_order(model, model, **kinds["images"])
    first = orders["text-only"]
    # The order covers the tower, the projector and the language model: a real comparison.
    assert any("layers" in name for name in first) and len(set(first)) > 10
    assert first_difference(orders) is None, first_difference(orders)
    family.remove(model)


def test_a_different_order_is_named():
    orders = {"a": ["embed", "tower", "llm"], "b": ["tower", "embed", "llm"], "c": ["embed", "tower"]}
    assert first_difference(orders) == "b calls tower at call 0 where a calls embed (3 against 3 calls)"
    assert first_difference({"a": orders["a"], "c": orders["c"]}) == (
        "c calls <end> at call 2 where a calls llm (2 against 3 calls)"
    )
    assert first_difference({"a": orders["a"], "b": list(orders["a"])}) is None
