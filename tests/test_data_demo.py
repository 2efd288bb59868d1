"""The bundled demo data through the whole pipeline into the tiny LLaVA (no shape errors, loss finite)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import warm_python

from visionzip_core import num_image_tokens
from visionzip_core.data import DataCollator, DataSettings, LengthGroupedSampler, build_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tiny_llava_dir):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    return AutoProcessor.from_pretrained(tiny_llava_dir), LlavaForConditionalGeneration.from_pretrained(
        tiny_llava_dir
    )


@pytest.mark.parametrize(
    "template,kind", [("plain", "pretrain"), ("vicuna_v1", "instruct"), ("chat_template", "instruct")]
)
def test_demo_data_feeds_the_tiny_model(tmp_path, tiny, template, kind):
    processor, model = tiny
    settings = DataSettings(
        train=[{"path": f"data/demo/{kind}_train.json", "image_folder": "data/demo/images"}],
        val=[{"path": f"data/demo/{kind}_val.json", "image_folder": "data/demo/images"}],
        template=template,
        model_max_length=512,
        cache_dir=str(tmp_path / "cache"),
    )
    k = num_image_tokens(model.config)
    ds = build_dataset(settings, "train", processor.tokenizer, processor.image_processor, k, base_dir=REPO)
    val = build_dataset(settings, "val", processor.tokenizer, processor.image_processor, k, base_dir=REPO)
    assert ds.skip_report["skipped"] == 0 and len(val) > 0
    if kind == "instruct":
        assert any(n < 0 for n in ds.lengths)  # text-only samples are there
    sampler = LengthGroupedSampler(ds.lengths, batch_size=4, seed=0)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=4, sampler=sampler, collate_fn=DataCollator(processor.tokenizer.pad_token_id)
    )
    batch = next(iter(loader))
    with torch.no_grad():
        out = model(**batch)
    assert torch.isfinite(out.loss)


def test_generator_is_deterministic(tmp_path):
    for out in ("a", "b"):
        warm_python.run(
            [
                sys.executable,
                str(REPO / "data/make_demo_data.py"),
                "--out",
                str(tmp_path / out),
                "--train",
                "6",
                "--val",
                "2",
            ],
            check=True,
            capture_output=True,
        )
    for name in ("instruct_train.json", "pretrain_val.json", "images/train_0005.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    rows = json.loads((tmp_path / "a" / "instruct_train.json").read_text())
    assert rows[0]["conversations"][0]["value"].startswith("<image>\n")
    # the committed demo set is what the generator writes (same stream, so the same first samples)
    committed = json.loads((REPO / "data/demo/instruct_train.json").read_text())
    assert committed[:6] == rows[:6]
    assert (REPO / "data/demo/images/train_0005.png").read_bytes() == (
        tmp_path / "a/images/train_0005.png"
    ).read_bytes()
