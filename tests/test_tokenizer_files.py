"""A saved tokenizer or processor reloads with the tokenisation it was used with (``legacy`` kept)."""

from __future__ import annotations

import json

import pytest
import warm_python
from transformers import AutoTokenizer, LlamaTokenizer, LlavaProcessor

from visionzip_core.families.llava import clip_image_processor
from visionzip_core.testing.tokenizers import write_sentencepiece_tokenizer
from visionzip_core.tokenizer_files import save_pretrained_faithfully

# Texts whose ids depend on `legacy`: what follows a special token gets the "▁" marker or not.
TEXTS = ["</s>USER: hi", "<image>\nWhat is it?", "A chat. USER: <image>\nWhat? ASSISTANT: A cat.</s>USER:"]


def ids_of(tok):
    return [tok(t).input_ids for t in TEXTS]


@pytest.mark.parametrize("legacy", [True, False, None])
@pytest.mark.parametrize("as_processor", [False, True])
def test_save_load_round_trip_keeps_token_ids(tmp_path, legacy, as_processor):
    tok = AutoTokenizer.from_pretrained(write_sentencepiece_tokenizer(tmp_path / "llm", legacy=legacy))
    tok.add_tokens(["<image>"], special_tokens=True)
    before = ids_of(tok)
    # the two behaviours really differ on these texts, so the comparison below can fail
    if legacy:
        assert tok.convert_ids_to_tokens(before[0])[:3] == ["<s>", "</s>", "\u2581USER"]
    else:
        assert tok.convert_ids_to_tokens(before[0])[2] != "\u2581USER"
    out = tmp_path / "saved"
    if as_processor:  # what the training export writes
        proc = LlavaProcessor(image_processor=clip_image_processor(56), tokenizer=tok, patch_size=14)
        save_pretrained_faithfully(proc, out)
        again = LlavaProcessor.from_pretrained(out).tokenizer
    else:
        save_pretrained_faithfully(tok, out)
        again = AutoTokenizer.from_pretrained(out)
    assert ids_of(again) == before
    assert json.loads((out / "tokenizer_config.json").read_text())["legacy"] is bool(tok.legacy)
    # and a second save of the reloaded tokenizer still agrees (stage 1 -> stage 2 -> stage 2 export)
    save_pretrained_faithfully(again, tmp_path / "twice")
    assert ids_of(AutoTokenizer.from_pretrained(tmp_path / "twice")) == before


@pytest.mark.slow
def test_stage1_export_tokenises_like_its_legacy_input_folder(tiny_pretrain_dirs, tmp_path):
    """Stage 1 from an LLM folder with a legacy SentencePiece tokenizer (tokenizer.model only):
    ``final/`` must reload with the same tokenisation, so stage 2 encodes as stage 1 did."""
    import os
    import shutil
    import sys
    from pathlib import Path

    from visionzip_core.data import Encoder

    repo = Path(__file__).resolve().parents[1]
    clip_dir, tiny_llm = tiny_pretrain_dirs
    llm = tmp_path / "llm"
    shutil.copytree(tiny_llm, llm)
    for f in llm.glob("*token*"):
        f.unlink()
    write_sentencepiece_tokenizer(llm, legacy=True)
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "train/finetune.py",
        "--config",
        "configs/demo.yaml",
        "train.mode=pretrain",
        "model.name_or_path=null",
        f"model.vision_tower={clip_dir}",
        f"model.language_model={llm}",
        "data.template=plain",
        "data.train=[{path: data/demo/pretrain_train.json, image_folder: data/demo/images}]",
        "data.val=[]",
        f"train.output_dir={out}",
        "train.per_device_batch_size=4",
        "train.max_steps=2",
        "train.save_steps=2",
        "data.num_workers=0",
        "wandb.enabled=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled"}
    env.pop("RANK", None)
    proc = warm_python.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    stage1 = AutoTokenizer.from_pretrained(llm)
    stage1.add_tokens(["<image>"], special_tokens=True)
    final = out / "final"
    stage2 = LlavaProcessor.from_pretrained(final).tokenizer
    assert ids_of(stage2) == ids_of(stage1)
    # loaded by its class, or from the tokenizer files alone, it must tokenise the same way too
    alone = tmp_path / "tokenizer-only"
    alone.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(final / f, alone / f)
    for reloaded in (LlamaTokenizer.from_pretrained(final), AutoTokenizer.from_pretrained(alone)):
        assert ids_of(reloaded) == ids_of(stage1)
    # and a later export of the reloaded processor keeps it (stage 2's own final/)
    save_pretrained_faithfully(LlavaProcessor.from_pretrained(final), tmp_path / "stage2-final")
    assert ids_of(LlamaTokenizer.from_pretrained(tmp_path / "stage2-final")) == ids_of(stage1)
    turns = (
        ("user", "<image>\nWhat is it?"),
        ("assistant", "A cat.\nSure."),
        ("user", "Why?"),
        ("assistant", "Red."),
    )
    encoded = [Encoder(t, "vicuna_v1", "<image>", 4, 512)(turns, 1) for t in (stage1, stage2)]
    assert encoded[0] == encoded[1]
