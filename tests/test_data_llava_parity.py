"""Token-for-token parity with LLaVA-1.5's training code on LLaVA-format samples.

LLaVA (``llava/train/train.py``): ``preprocess_multimodal`` moves each ``<image>`` to the start of
its turn (``"<image>\\n" + rest``, stripped); ``preprocess_v1`` renders ``conv_vicuna_v1``
(``{system} USER: {q} ASSISTANT: {a}</s>USER: ...``), drops an opening ``gpt`` turn, and
``tokenizer_image_token`` tokenises the text chunk by chunk around ``<image>``: every chunk as a
text of its own (SentencePiece's dummy prefix ``▁`` in front), the chunks' BOS dropped, one BOS
first. Labels: every token after ``ASSISTANT:`` up to and including ``</s>``.
``preprocess_plain``: ``<image>`` + caption + ``"\\n"``, loss on caption + ``"\\n"``.
LLaVA's single image index becomes K image-token ids here.

The expected sequences are built below from those rules with the ``sentencepiece`` library on
the tokenizer's own ``tokenizer.model`` (what LLaVA's slow tokenizer runs), not with the
tokenizer under test: each piece of text is encoded as SentencePiece encodes it, and pieces
are joined where LLaVA joins them. A piece of text can be encoded on its own because
SentencePiece pieces never span a space (a reply starts with one) or a special token.
These expectations were checked against LLaVA's ``preprocess`` itself (llava-torch 1.2.2.post1,
transformers 4.37.2, tokenizers 0.15, slow tokenizer) on the same tokenizer folders. The ids
agree in every case. The trained positions agree in every case with the legacy tokenizer; two
kinds of sample make LLaVA mask the whole sample ("tokenization mismatch (ignored)") where the
project trains the replies, on purpose:

- a reply holding "USER: ... ASSISTANT: " (both tokenizers; see the test below);
- with the non-legacy tokenizer, every conversation with more than one round (multi_turn,
  spaces, image_in_second_turn): LLaVA measures each later round on its own, where it starts
  ``▁USER``, but in the sequence it follows ``</s>`` and starts ``U SER``; its
  ``round_len -= 1`` correction for non-legacy tokenizers moves the count the wrong way.
"""

from __future__ import annotations

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
from transformers import AutoTokenizer

from visionzip_core.data import IGNORE_INDEX, VICUNA_V1_SYSTEM, Encoder
from visionzip_core.data.sources import to_conversation
from visionzip_core.testing.tokenizers import write_sentencepiece_tokenizer

K = 3
IMG = "<image>"
SYS = VICUNA_V1_SYSTEM


class Rules:
    """SentencePiece encodings of text pieces, the way LLaVA's slow Llama tokenizer makes them."""

    def __init__(self, folder, legacy: bool):
        model = (folder / "tokenizer.model").read_bytes()
        self.sp = spm.SentencePieceProcessor(model_proto=model)
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(model)
        proto.normalizer_spec.add_dummy_prefix = False
        self.sp_no_prefix = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.legacy = legacy

    def start(self, text: str) -> list[str]:
        """A text's first piece: SentencePiece adds its dummy prefix ``▁`` (also before a space)."""
        return self.sp.encode(text, out_type=str)

    def cont(self, text: str) -> list[str]:
        """Text that continues a text (a reply after ``ASSISTANT:``, which starts with a space)."""
        return self.sp_no_prefix.encode(text, out_type=str)

    def after_special(self, text: str) -> list[str]:
        """Text right after ``</s>``: the legacy tokenizer encodes it as a new text (``▁USER``),
        the non-legacy one as a continuation (``USER`` without ``▁``)."""
        return self.start(text) if self.legacy else self.cont(text)


def expected(segments) -> tuple[list[str], list[bool]]:
    """Flatten ``[(tokens, trained), ...]`` into token strings and the trained mask."""
    tokens, mask = [], []
    for toks, trained in segments:
        tokens += toks
        mask += [trained] * len(toks)
    return tokens, mask


def vicuna_cases(r: Rules):
    """``{case: (sample, expected tokens, expected trained mask)}`` for template vicuna_v1."""
    imgs = [IMG] * K
    cases = {}

    def add(name, convs, segments, image=True):
        sample = {"id": name, "conversations": [{"from": f, "value": v} for f, v in convs]}
        if image:
            sample["image"] = "a.png"
        cases[name] = (sample, *expected(segments))

    # Single turn. Chunk 0 is the system prompt + " USER: " (ends in a lone "▁"); chunk 1 starts
    # a new text, so "\n" becomes "▁" "<0x0A>"; the reply " A red circle." and "</s>" are trained.
    add(
        "single",
        [("human", "<image>\nWhat is in the picture?"), ("gpt", "A red circle.")],
        [
            (["<s>"] + r.start(f"{SYS} USER: ") + imgs + r.start("\nWhat is in the picture? ASSISTANT:"), 0),
            (r.cont(" A red circle.") + ["</s>"], 1),
        ],
    )
    # Image at the end of the question (mix665k has these): moved to the start of the turn.
    add(
        "image_last",
        [("human", "What colour is the shape?\n<image>"), ("gpt", "Red.")],
        [
            (
                ["<s>"] + r.start(f"{SYS} USER: ") + imgs + r.start("\nWhat colour is the shape? ASSISTANT:"),
                0,
            ),
            (r.cont(" Red.") + ["</s>"], 1),
        ],
    )
    # Multi-turn: each later round follows "</s>" (legacy decides "▁USER" or "USER").
    add(
        "multi_turn",
        [
            ("human", "<image>\nWhat colour?"),
            ("gpt", "Red."),
            ("human", "And the shape?"),
            ("gpt", "A circle."),
            ("human", "Where?"),
            ("gpt", "Top left."),
        ],
        [
            (["<s>"] + r.start(f"{SYS} USER: ") + imgs + r.start("\nWhat colour? ASSISTANT:"), 0),
            (r.cont(" Red.") + ["</s>"], 1),
            (r.after_special("USER: And the shape? ASSISTANT:"), 0),
            (r.cont(" A circle.") + ["</s>"], 1),
            (r.after_special("USER: Where? ASSISTANT:"), 0),
            (r.cont(" Top left.") + ["</s>"], 1),
        ],
    )
    # Text-only: one chunk, tokenised whole (LLaVA's tokenizer(conversation)).
    add(
        "text_only",
        [("human", "Say yes."), ("gpt", "yes.")],
        [(["<s>"] + r.start(f"{SYS} USER: Say yes. ASSISTANT:"), 0), (r.cont(" yes.") + ["</s>"], 1)],
        image=False,
    )
    # Code: newlines, indentation (runs of "▁"), tabs (<0x09>) are trained, every one of them.
    code = "def f(x):\n    return x\n\n\tif x:\n\t\tpass\n"
    add(
        "code_reply",
        [("human", "<image>\nWrite code."), ("gpt", code)],
        [
            (["<s>"] + r.start(f"{SYS} USER: ") + imgs + r.start("\nWrite code. ASSISTANT:"), 0),
            (r.cont(" " + code) + ["</s>"], 1),
        ],
    )
    add(
        "multi_line_reply",
        [("human", "<image>\nList."), ("gpt", "1. red\n2. blue\n\n3. green")],
        [
            (["<s>"] + r.start(f"{SYS} USER: ") + imgs + r.start("\nList. ASSISTANT:"), 0),
            (r.cont(" 1. red\n2. blue\n\n3. green") + ["</s>"], 1),
        ],
    )
    # Unicode: byte fallback pieces (<0xE7> <0x8C> <0xAB> for 猫) are trained like any other.
    add(
        "unicode",
        [("human", "<image>\nWhat is this? 猫?"), ("gpt", "Un chat — 猫, café ☕.")],
        [
            (["<s>"] + r.start(f"{SYS} USER: ") + imgs + r.start("\nWhat is this? 猫? ASSISTANT:"), 0),
            (r.cont(" Un chat — 猫, café ☕.") + ["</s>"], 1),
        ],
    )
    # Leading/trailing spaces: the image turn is stripped; other turns and replies are kept as
    # they are, and a reply's own spaces ("▁" tokens) are trained.
    add(
        "spaces",
        [
            ("human", "  <image>\n  What is it?  "),
            ("gpt", "  A cat.  "),
            ("human", "  More?  "),
            ("gpt", " No. "),
        ],
        [
            (["<s>"] + r.start(f"{SYS} USER: ") + imgs + r.start("\nWhat is it? ASSISTANT:"), 0),
            (r.cont("   A cat.  ") + ["</s>"], 1),
            (r.after_special("USER:   More?   ASSISTANT:"), 0),
            (r.cont("  No. ") + ["</s>"], 1),
        ],
    )
    # Opens with the assistant: LLaVA drops that turn and trains on the rest.
    add(
        "gpt_first",
        [("gpt", "Hello, ask me."), ("human", "<image>\nWhat is it?"), ("gpt", "A cat.")],
        [
            (["<s>"] + r.start(f"{SYS} USER: ") + imgs + r.start("\nWhat is it? ASSISTANT:"), 0),
            (r.cont(" A cat.") + ["</s>"], 1),
        ],
    )
    # The image in a later turn goes to the start of that turn, after "</s>USER: ".
    add(
        "image_in_second_turn",
        [("human", "Hi"), ("gpt", "Hello."), ("human", "Now this: <image>"), ("gpt", "A dog.")],
        [
            (["<s>"] + r.start(f"{SYS} USER: Hi ASSISTANT:"), 0),
            (r.cont(" Hello.") + ["</s>"], 1),
            (r.after_special("USER: ") + imgs + r.start("\nNow this: ASSISTANT:"), 0),
            (r.cont(" A dog.") + ["</s>"], 1),
        ],
    )
    return cases


def plain_cases(r: Rules):
    """Stage 1: ``<s> <image> caption "\\n"``; the instruction text is dropped; loss on caption + "\\n".
    The caption is the chunk after the image, so it starts a text (dummy prefix ``▁``)."""
    imgs = [IMG] * K
    out = {}
    for name, question, caption in [
        ("caption", "<image>\nDescribe.", "a red circle on white"),
        (
            "caption_image_last",
            "Render a clear and concise summary of the photo.\n<image>",
            "the harbour at dawn",
        ),
        ("caption_spaces_unicode", "<image>", " leading space, café 猫\nsecond line "),
    ]:
        sample = {
            "id": name,
            "image": "a.png",
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": caption}],
        }
        out[name] = (sample, *expected([(["<s>"] + imgs, 0), (r.start(caption + "\n"), 1)]))
    return out


@pytest.fixture(scope="module", params=[True, False], ids=["legacy", "non_legacy"])
def setup(request, tmp_path_factory):
    folder = write_sentencepiece_tokenizer(tmp_path_factory.mktemp("vicuna"), legacy=request.param)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_tokens([IMG], special_tokens=True)
    return tok, Rules(folder, legacy=request.param)


def encode(tok, template: str, sample: dict, **kw) -> tuple[list[str], list[bool]]:
    conv = to_conversation(sample, "llava", IMG)
    ids, labels = Encoder(tok, template, IMG, K, 4096, **kw)(conv.turns, len(conv.images))
    return tok.convert_ids_to_tokens(ids), [lab != IGNORE_INDEX for lab in labels]


@pytest.mark.parametrize(
    "case",
    [
        "single",
        "image_last",
        "multi_turn",
        "text_only",
        "code_reply",
        "multi_line_reply",
        "unicode",
        "spaces",
        "gpt_first",
        "image_in_second_turn",
    ],
)
def test_vicuna_v1_matches_llava(setup, case):
    tok, rules = setup
    sample, tokens, mask = vicuna_cases(rules)[case]
    assert encode(tok, "vicuna_v1", sample) == (tokens, [bool(m) for m in mask])


@pytest.mark.parametrize("case", ["caption", "caption_image_last", "caption_spaces_unicode"])
def test_plain_matches_llava(setup, case):
    tok, rules = setup
    sample, tokens, mask = plain_cases(rules)[case]
    assert encode(tok, "plain", sample) == (tokens, [bool(m) for m in mask])


def test_spelled_out_around_the_image_and_in_a_code_reply(setup):
    """The same rules, written as literal pieces, so the helpers above cannot hide a mistake."""
    tok, rules = setup
    sample, _, _ = vicuna_cases(rules)["code_reply"]
    tokens, mask = encode(tok, "vicuna_v1", sample)
    i = tokens.index(IMG)
    # "USER: " ends chunk 0 with a lone "▁"; "\nWrite" starts chunk 1 with the dummy prefix
    assert tokens[i - 3 : i] == ["\u2581USER", ":", "\u2581"]
    assert tokens[i + K : i + K + 3] == ["\u2581", "<0x0A>", "Wri"]
    # reply " def f(x):\n    return x\n\n\tif x:\n\t\tpass\n" + "</s>", all trained
    j = tokens.index("\u2581ASSISTANT")
    assert tokens[j:] == [
        "\u2581ASSISTANT", ":",
        "\u2581d", "ef", "\u2581f", "<0x28>", "x", "<0x29>", ":", "<0x0A>",
        "\u2581", "\u2581", "\u2581", "\u2581re", "tu", "rn", "\u2581", "x", "<0x0A>",
        "<0x0A>", "<0x09>", "i", "f", "\u2581", "x", ":", "<0x0A>",
        "<0x09>", "<0x09>", "p", "a", "ss", "<0x0A>", "</s>",
    ]  # fmt: skip
    assert mask[j:] == [False, False] + [True] * (len(tokens) - j - 2)
    assert not any(mask[:j])


def test_after_end_of_turn_depends_on_legacy(setup):
    """``</s>USER:``: legacy tokenizers start "USER" afresh (``▁USER``), non-legacy ones do not."""
    tok, rules = setup
    sample, _, _ = vicuna_cases(rules)["multi_turn"]
    tokens, _ = encode(tok, "vicuna_v1", sample)
    k = tokens.index("</s>")
    assert tokens[k + 1 : k + 3] == (["\u2581USER", ":"] if rules.legacy else ["U", "SER"])


def test_reply_quoting_a_chat_is_trained_where_llava_masks_it(setup):
    """LLaVA IS WRONG HERE. A reply holding "USER: ... ASSISTANT: " makes LLaVA's round splitting
    miscount, print "tokenization mismatch (ignored)" and mask the whole sample (nothing trained).
    The project trains the reply, as the rule "every token of a reply and its </s>" says."""
    tok, rules = setup
    sample = {
        "id": "quote",
        "image": "a.png",
        "conversations": [
            {"from": "human", "value": "<image>\nShow a chat log."},
            {"from": "gpt", "value": "USER: hi ASSISTANT: hello"},
        ],
    }
    tokens, mask = encode(tok, "vicuna_v1", sample)
    want_tokens, want_mask = expected(
        [
            (
                ["<s>"]
                + rules.start(f"{SYS} USER: ")
                + [IMG] * K
                + rules.start("\nShow a chat log. ASSISTANT:"),
                0,
            ),
            (rules.cont(" USER: hi ASSISTANT: hello") + ["</s>"], 1),
        ]
    )
    assert (tokens, mask) == (want_tokens, [bool(m) for m in want_mask])


def test_image_placement_keep_and_plain_eos_are_options(setup):
    tok, rules = setup
    sample, _, _ = vicuna_cases(rules)["image_last"]
    tokens, _ = encode(tok, "vicuna_v1", sample, image_placement="keep")
    # the placeholder stays after the question; the chunk after it starts a text again
    i = tokens.index(IMG)
    assert tokens[i - 2 : i] == ["?", "<0x0A>"] and tokens[i + K] == "\u2581"
    sample, _, _ = plain_cases(rules)["caption"]
    tokens, mask = encode(tok, "plain", sample, plain_end="eos")
    assert tokens[-2:] == ["\u2581white", "</s>"] and mask[-1] and "<0x0A>" not in tokens


def test_truncation_is_a_prefix_of_the_expanded_sequence(setup):
    """LLaVA cuts text-only samples in the tokenizer and image samples after expanding the image
    (in the model): either way the kept sequence is a prefix of the whole, labels included."""
    tok, rules = setup
    for case in ("text_only", "multi_turn"):
        sample, tokens, mask = vicuna_cases(rules)[case]
        conv = to_conversation(sample, "llava", IMG)
        limit = len(tokens) - 2  # cuts into the last reply
        ids, labels = Encoder(tok, "vicuna_v1", IMG, K, limit)(conv.turns, len(conv.images))
        assert tok.convert_ids_to_tokens(ids) == tokens[:limit]
        assert [lab != IGNORE_INDEX for lab in labels] == [bool(m) for m in mask[:limit]]


def test_folder_without_legacy_key_encodes_as_non_legacy(tmp_path):
    """The project's choice, documented in data/README.md: a tokenizer folder without ``legacy``
    is what transformers 5 makes of it, non-legacy (LLaVA's transformers 4.37 made it legacy).
    Such a folder gets ``"legacy": true`` added by hand to reproduce LLaVA on it."""
    toks = {}
    for name, legacy in (("absent", None), ("false", False), ("true", True)):
        tok = AutoTokenizer.from_pretrained(write_sentencepiece_tokenizer(tmp_path / name, legacy=legacy))
        tok.add_tokens([IMG], special_tokens=True)
        toks[name] = tok
    rules = Rules(tmp_path / "absent", legacy=False)
    sample, _, _ = vicuna_cases(rules)["multi_turn"]
    got = {name: encode(tok, "vicuna_v1", sample) for name, tok in toks.items()}
    assert got["absent"] == got["false"] != got["true"]
