"""A saved tokenizer or processor reloads with the tokenisation it was used with (``legacy`` kept)."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer, LlavaProcessor

from visionzip_core.tiny import build_image_processor, write_sentencepiece_tokenizer
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
        proc = LlavaProcessor(image_processor=build_image_processor(56), tokenizer=tok, patch_size=14)
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
