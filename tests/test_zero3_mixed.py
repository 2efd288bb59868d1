"""Two processes under ZeRO-3 (and ZeRO-2 for Qwen3-VL and Qwen3.5) on data mixing text-only, image
and video samples, with a mixed validation set, through the real entry point, per Qwen family (the LLaVA families' mixed ZeRO-3
runs are in test_train_reliability.py and test_llava_next_train.py).

ZeRO-3 gathers parameters with one collective per module call: when ranks draw different batch
kinds in one step their forwards must call the same modules in the same order, or gloo reports
"Received data size doesn't match expected size" (see also tests/test_call_order.py).

Run: ``PYTHONPATH=$PWD .venv/bin/python -m pytest -m slow tests/test_zero3_mixed.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_train_e2e import metrics, train

pytestmark = pytest.mark.slow


def _picture(path: Path, h: int, w: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def _ask(part, question: str, answer: str) -> list[dict]:
    return [
        {"role": "user", "content": [*([part] if part else []), {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


@pytest.fixture(scope="module")
def mixed_messages(tmp_path_factory) -> Path:
    """Train: text-only, image, video, and image-plus-video samples; val: one of each kind."""
    out = tmp_path_factory.mktemp("mixed-messages")
    images = out / "images"
    images.mkdir()
    for i, (h, w) in enumerate([(97, 143), (60, 120), (112, 112)]):
        _picture(images / f"im{i}.png", h, w, i)
    for k in range(4):
        _picture(images / f"fr{k}.png", 56, 84, 10 + k)
    video = {"type": "video", "video": [f"fr{k}.png" for k in range(4)]}
    kinds = {
        "text": lambda n: {"messages": _ask(None, f"Say {n}", "Hi.")},
        "image": lambda n: {
            "messages": _ask({"type": "image", "image": f"im{n % 3}.png"}, "What?", "A cat.")
        },
        "video": lambda n: {"messages": _ask(video, "What moves?", "A dog.")},
        "both": lambda n: {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": f"im{n % 3}.png"},
                        video,
                        {"type": "text", "text": "Same?"},
                    ],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "No."}]},
            ]
        },
    }
    # Interleaved so that, with one sample per rank and step, the two ranks draw different kinds.
    order = ["text", "image", "video", "text", "both", "image", "image", "video"]
    train_rows = [{"id": f"t{n}", **kinds[k](n)} for n, k in enumerate(order)]
    val_rows = [{"id": f"v{n}", **kinds[k](n)} for n, k in enumerate(["image", "text", "video", "both"])]
    for name, rows in (("train", train_rows), ("val", val_rows)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


# ZeRO-3 on every Qwen family; ZeRO-2 (whose gradient buckets need every rank to produce the same
# gradients whatever its batch holds) on the two newest.
@pytest.mark.parametrize(
    "variant,zero",
    [("qwen2_5_vl", 3), ("qwen2_vl", 3), ("qwen3_vl", 3), ("qwen3_5", 3), ("qwen3_vl", 2), ("qwen3_5", 2)],
)
def test_two_processes_on_mixed_kinds_with_a_mixed_validation_set(
    variant, zero, family_dirs, mixed_messages, tmp_path
):
    names = {"qwen2_5_vl": "qwen2.5-vl", "qwen2_vl": "qwen2-vl", "qwen3_vl": "qwen3-vl", "qwen3_5": "qwen3.5"}
    model_dir = family_dirs[names[variant]]  # 2-3 vision blocks (Qwen3-VL: two DeepStack levels)
    data, out = mixed_messages, tmp_path / "run"
    proc = train(
        [
            f"model.name_or_path={model_dir}",
            f"train.output_dir={out}",
            "train.mode=finetune",
            f"data.train=[{{path: {data}/train.jsonl, image_folder: {data}/images}}]",
            f"data.val=[{{path: {data}/val.jsonl, image_folder: {data}/images}}]",
            "data.template=chat_template",
            "data.image_placement=keep",
            "data.image_aspect_ratio=native",
            "data.model_max_length=512",
            "data.group_by_length=false",
            "visionzip.dominant_ratio=0.25",
            "visionzip.contextual_ratio=0.25",
            "train.per_device_batch_size=1",
            "train.max_steps=3",
            "train.save_steps=100",
            "train.eval_steps=3",
            "train.logging_steps=1",
            "data.num_workers=0",
            "wandb.enabled=false",
            f"deepspeed.config=configs/deepspeed/zero{zero}.json",
            "debug.log_samples=true",
            "eval.generate_accuracy=false",  # scoring a Qwen export (video too): test_command_matrix.py
        ],
        launcher="ranks2",
    )
    assert "Received data size" not in proc.stderr
    records = metrics(out)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert any("val_loss" in r for r in records), records[-2:]
    # The case the test exists for: in some step the two ranks held different kinds.
    ranks = [
        [
            json.loads(line)["samples"]
            for line in (out / f"debug/samples-rank{r}.jsonl").read_text().splitlines()
        ]
        for r in (0, 1)
    ]
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]

    def kind(samples):
        return tuple(
            sorted({("video" in json.dumps(rows[s])) * 2 + ("image" in json.dumps(rows[s])) for s in samples})
        )

    assert any(kind(a) != kind(b) for a, b in zip(*ranks)), ranks
    assert (out / "final/model.safetensors").is_file() or list((out / "final").glob("*.safetensors"))
