"""Templates, label masks, <image> expansion and truncation (tiny tokenizer, no model)."""

from __future__ import annotations

import pytest

from visionzip_core.data import IGNORE_INDEX, VICUNA_V1_SYSTEM, Encoder
from visionzip_core.data.validation import SampleError
from visionzip_core.testing.tokenizers import build_tiny_tokenizer

K = 5


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def spans(ids, labels, tok):
    """Decoded (trained, masked) runs in order, image ids shown as [IMG]."""
    out, run, cur = [], [], None
    image_id = tok.convert_tokens_to_ids("<image>")
    for i, lab in zip(ids, labels):
        trained = lab != IGNORE_INDEX
        if cur is not None and trained != cur:
            out.append((cur, run))
            run = []
        cur = trained
        run.append(i)
    out.append((cur, run))

    def text(r):
        parts, buf = [], []
        for x in r:
            if x == image_id:
                parts.append(tok.decode(buf) + "[IMG]")
                buf = []
            else:
                buf.append(x)
        return "".join(parts) + tok.decode(buf)

    return [(t, text(r)) for t, r in out]


TWO_TURNS = (
    ("user", "<image>\nWhat colour is the shape?"),
    ("assistant", "red."),
    ("user", "What shape?"),
    ("assistant", "circle."),
)


def test_vicuna_v1_exact_spans(tok):
    enc = Encoder(tok, "vicuna_v1", "<image>", K, 512)
    ids, labels = enc(TWO_TURNS, n_images=1)
    assert spans(ids, labels, tok) == [
        (False, f"<s>{VICUNA_V1_SYSTEM} USER: " + "[IMG]" * K + "\nWhat colour is the shape? ASSISTANT:"),
        (True, " red.</s>"),
        (False, "USER: What shape? ASSISTANT:"),
        (True, " circle.</s>"),
    ]
    # labels are the ids themselves where trained
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels))


def test_vicuna_v1_system_override_and_sample_system(tok):
    enc = Encoder(tok, "vicuna_v1", "<image>", K, 512, system_prompt="Be short.")
    ids, labels = enc(TWO_TURNS[:2], n_images=1)
    assert spans(ids, labels, tok)[0][1].startswith("<s>Be short. USER: ")
    own = (("system", "Sample system."),) + TWO_TURNS[:2]
    ids, labels = enc(own, n_images=1)
    assert spans(ids, labels, tok)[0][1].startswith("<s>Sample system. USER: ")


def test_plain_exact_spans_drop_user_text(tok):
    enc = Encoder(tok, "plain", "<image>", K, 512)
    ids, labels = enc(
        (("user", "<image>\nDescribe the picture."), ("assistant", "a red circle.")), n_images=1
    )
    # LLaVA's stage 1: caption + the plain separator "\n", no eos; plain_end="eos" ends with eos
    assert spans(ids, labels, tok) == [(False, "<s>" + "[IMG]" * K), (True, "a red circle.\n")]
    enc = Encoder(tok, "plain", "<image>", K, 512, plain_end="eos")
    ids, labels = enc((("user", "<image>"), ("assistant", "a red circle.")), n_images=1)
    assert spans(ids, labels, tok) == [(False, "<s>" + "[IMG]" * K), (True, "a red circle.</s>")]


def test_chat_template_exact_spans_and_parity_with_generation_mask(tok):
    enc = Encoder(tok, "chat_template", "<image>", 1, 512)
    ids, labels = enc(TWO_TURNS, n_images=1)
    assert spans(ids, labels, tok) == [
        (False, "USER: [IMG]\nWhat colour is the shape? ASSISTANT:"),
        (True, " red.</s>"),
        (False, "USER: What shape? ASSISTANT:"),
        (True, " circle.</s>"),
    ]
    msgs = [{"role": r, "content": t} for r, t in TWO_TURNS]
    ref = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == ref["input_ids"]  # K=1: identical to the tokenizer's own rendering
    assert [lab != IGNORE_INDEX for lab in labels] == [bool(m) for m in ref["assistant_masks"]]


def test_chat_template_trains_whitespace_inside_replies(tok):
    reply = "line one\n\n  line two\n\tend"
    turns = (("user", "<image>\nWrite."), ("assistant", reply))
    ids, labels = Encoder(tok, "chat_template", "<image>", 1, 512)(turns, n_images=1)
    trained = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert tok.decode(trained) == " " + reply + "</s>"
    # whitespace-only tokens (line breaks, indentation, the tab) are among the trained ones
    pieces = [tok.decode([i]) for i in trained]
    assert any(p.strip() == "" and "\n" in p for p in pieces) and any("\t" in p for p in pieces)
    msgs = [{"role": r, "content": t} for r, t in turns]
    ref = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == ref["input_ids"]
    assert [lab != IGNORE_INDEX for lab in labels] == [bool(m) for m in ref["assistant_masks"]]


def test_chat_template_missing_is_a_clear_error(tok):
    bare = build_tiny_tokenizer()
    bare.chat_template = None
    enc = Encoder(bare, "chat_template", "<image>", K, 512)
    with pytest.raises(ValueError, match="has no chat template"):
        enc(TWO_TURNS, n_images=1)


@pytest.mark.parametrize("template", ["plain", "vicuna_v1", "chat_template"])
def test_each_placeholder_becomes_exactly_k_contiguous_ids(tok, template):
    enc = Encoder(tok, template, "<image>", 7, 1024)
    turns = (("user", "<image><image>\nCompare."), ("assistant", "same."))
    ids, labels = enc(turns, n_images=2)
    image_id = tok.convert_tokens_to_ids("<image>")
    positions = [i for i, x in enumerate(ids) if x == image_id]
    assert len(positions) == 14
    assert all(labels[p] == IGNORE_INDEX for p in positions)


def test_text_only_sample(tok):
    enc = Encoder(tok, "vicuna_v1", "<image>", K, 512)
    ids, labels = enc((("user", "Say yes."), ("assistant", "yes.")), n_images=0)
    assert tok.convert_tokens_to_ids("<image>") not in ids
    assert spans(ids, labels, tok)[-1] == (True, " yes.</s>")


def test_placeholder_mismatch_raises(tok):
    enc = Encoder(tok, "vicuna_v1", "<image>", K, 512)
    with pytest.raises(SampleError) as err:
        enc(TWO_TURNS, n_images=2)
    assert err.value.kind == "placeholder_mismatch"


def test_truncation_keeps_image_runs_whole(tok):
    turns = (("user", "<image>\nDescribe."), ("assistant", "a red circle at the top left. " * 20))
    full, _ = Encoder(tok, "plain", "<image>", 40, 4096)(turns, n_images=1)
    # text is cut, image run kept whole
    ids, labels = Encoder(tok, "plain", "<image>", 40, 50)(turns, n_images=1)
    assert len(ids) == 50 and ids == full[:50]
    assert ids.count(tok.convert_tokens_to_ids("<image>")) == 40
    assert any(lab != IGNORE_INDEX for lab in labels)
    # a limit that falls inside the image run: the sample is too long, never cut mid-image
    for limit in (10, 40):
        with pytest.raises(SampleError) as err:
            Encoder(tok, "plain", "<image>", 40, limit)(turns, n_images=1)
        assert err.value.kind == "too_long"


def test_truncation_that_leaves_no_reply_is_too_long(tok):
    long_question = "what is the colour of the shape " * 40
    turns = (("user", long_question), ("assistant", "red."))
    with pytest.raises(SampleError, match="no assistant reply") as err:
        Encoder(tok, "vicuna_v1", "<image>", K, 64)(turns, n_images=0)
    assert err.value.kind == "too_long"


def test_tokenizer_without_image_token_is_rejected(tok):
    with pytest.raises(ValueError, match="no '<img>' token"):
        Encoder(tok, "vicuna_v1", "<img>", K, 512)
