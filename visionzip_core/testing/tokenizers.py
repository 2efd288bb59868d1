"""Tokenizers for the tiny test models, trained in memory on a fixed word list (no hub):

- :func:`build_tiny_tokenizer`: a byte-level BPE with ``<image>`` and a vicuna-style chat template
  (the LLaVA folders' tokenizer);
- :func:`build_sentencepiece_model` / :func:`write_sentencepiece_tokenizer`: a Llama/Vicuna-style
  SentencePiece ``tokenizer.model`` and its folder, as ``lmsys/vicuna-7b-v1.5`` ships it;
- :func:`build_tiny_qwen_tokenizer`: a Qwen2-style byte-level BPE with Qwen2's special tokens and
  Qwen2.5-VL's chat template.

Each is deterministic, so every folder built from it has the same ids.
"""

from __future__ import annotations

import os
from pathlib import Path

# Words the tokenizer learns whole; everything else still encodes byte by byte.
_CORPUS_WORDS = (
    "a an the is are of in on at to and or with what which where how many colour color shape "
    "red green blue yellow purple orange black white gray pink brown cyan "
    "circle square triangle star cross ring diamond rectangle ellipse "
    "top bottom left right center middle upper lower corner picture image photo shows there "
    "small large big tiny word text written says reads one two three four five "
    "describe briefly question answer user assistant system please this that it yes no "
    "background object objects located position you can see"
).split()

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"

# A vicuna-style chat template so that the "tokenizer's own chat template" path is real.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }} "
    "{% elif message['role'] == 'user' %}USER: {{ message['content'] }} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: {% generation %}{{ message['content'] }}</s>{% endgeneration %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tiny_tokenizer(vocab_size: int = 1024):
    """Train a deterministic byte-level BPE tokenizer in memory and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN]
    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [" ".join(_CORPUS_WORDS)] * 4 + [w.capitalize() for w in _CORPUS_WORDS]
    lines += ["USER: <image>\nWhat is in the picture? ASSISTANT: a red circle.</s>"]
    tok.train_from_iterator(lines, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=512,
        padding_side="right",
    )
    fast.add_bos_token = True
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def build_sentencepiece_model(vocab_size: int = 1000) -> bytes:
    """A Llama/Vicuna-style SentencePiece model (``tokenizer.model`` bytes), trained in memory.

    Same kind as Vicuna's: BPE with byte fallback and a dummy prefix, ``<unk>/<s>/</s>`` = 0/1/2,
    no pad piece, identity normalisation, whitespace kept, digits split. The corpus holds no line
    breaks or tabs, so (as in Llama's vocabulary) those encode through byte fallback (``<0x0A>``).
    Deterministic: one thread, fixed corpus.
    """
    import io

    import sentencepiece as spm

    lines = [" ".join(_CORPUS_WORDS)] * 4 + [w.capitalize() for w in _CORPUS_WORDS]
    lines += ["USER: What is in the picture? ASSISTANT: a red circle.", "A chat between a curious user"]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        split_digits=True,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    return buf.getvalue()


def write_sentencepiece_tokenizer(
    out_dir: str | os.PathLike, legacy: bool | None = False, vocab_size: int = 1000
):
    """Write a tokenizer folder laid out like ``lmsys/vicuna-7b-v1.5``'s: ``tokenizer.model`` and
    ``tokenizer_config.json`` only (no ``tokenizer.json``, no ``<image>``, no pad token).

    ``legacy=None`` leaves the key out, as older Llama folders do. Returns the folder.
    """
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(build_sentencepiece_model(vocab_size))
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": UNK_TOKEN,
        "pad_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
    }
    if legacy is not None:
        config["legacy"] = legacy
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out


# Qwen2's special tokens, appended after the BPE vocabulary in the real order (151643...).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The chat template Qwen/Qwen2.5-VL-7B-Instruct ships in chat_template.json: a default system turn,
# <|vision_start|><|image_pad|><|vision_end|> per image and <|video_pad|> per video, ChatML turns.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_qwen_tokenizer(vocab_size: int = 1024):
    """A Qwen2-style byte-level BPE tokenizer (no unk, no bos) trained in memory, specials appended.

    Returns ``(tokenizers.Tokenizer, transformers Qwen2Tokenizer)``; deterministic."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    tok = Tokenizer(models.BPE())
    # Qwen2's pre-tokenizer: its split regex, then byte-level mapping without its own regex.
    qwen_split = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
        r"|\s+(?!\S)|\s+"
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(qwen_split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    lines = [" ".join(_CORPUS_WORDS)] * 4 + [w.capitalize() for w in _CORPUS_WORDS]
    lines += ["system\nYou are a helpful assistant.", "user\nWhat is in the picture?", "assistant\n"]
    tok.train_from_iterator(lines, trainer=trainer)
    tok.add_special_tokens(list(QWEN_SPECIAL_TOKENS))
    fast = Qwen2Tokenizer(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=4096,
        errors="replace",
        split_special_tokens=False,
    )
    fast.chat_template = QWEN2_5_VL_CHAT_TEMPLATE
    return tok, fast


# The tokenizer a family's tiny models speak, by ``ModelFamily.tiny_tokenizer``.
TINY_TOKENIZERS = {
    "llama-bpe": build_tiny_tokenizer,
    "qwen2-bpe": lambda: build_tiny_qwen_tokenizer()[1],
}


def tiny_tokenizer(kind: str):
    """A fresh tokenizer of ``kind`` (a key of :data:`TINY_TOKENIZERS`)."""
    if kind not in TINY_TOKENIZERS:
        raise ValueError(f"no tiny tokenizer {kind!r}; known: {sorted(TINY_TOKENIZERS)}")
    return TINY_TOKENIZERS[kind]()
