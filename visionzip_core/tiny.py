"""Tiny, fully local LLaVA-1.5-shaped models for the demo, the tests and CPU benchmarks.

Nothing here touches a model hub: every model is built from a config with random weights
and a byte-level BPE tokenizer trained in memory on a fixed word list, then saved as a
normal HF folder. The code that loads these folders is the same code that loads a real
llava-hf checkpoint, which is the point: tests exercise the user's path.

Shapes (defaults): CLIP tower with 112 px images and 14 px patches, so 8x8 = 64 patches
plus CLS (65 tokens, like 576 + 1 at 336 px); 3 vision layers so the feature layer -2 is
a middle layer; a 2-layer Llama with hidden size 64.
"""

from __future__ import annotations

import os
from pathlib import Path

from visionzip_core.tokenizer_files import save_pretrained_faithfully

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


def tiny_vision_config(image_size: int = 112, patch_size: int = 14, num_layers: int = 3):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )


def tiny_text_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )


def build_image_processor(image_size: int):
    """CLIP preprocessing (resize shortest edge, centre crop, CLIP mean/std) on PIL and numpy."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


def build_tiny_llava(
    out_dir: str | os.PathLike | None = None,
    image_size: int = 112,
    patch_size: int = 14,
    vision_layers: int = 3,
    seed: int = 0,
):
    """Build a random LLaVA-1.5-shaped model and its processor; save both when ``out_dir`` is given.

    Returns ``(model, processor)``. The model uses LLaVA-1.5's settings (feature layer -2, CLS
    dropped), built by the llava-1.5 family.
    """
    return _build_tiny("llava-1.5", out_dir, image_size, patch_size, vision_layers, seed)


def build_tiny_llava_next(
    out_dir: str | os.PathLike | None = None,
    image_size: int = 112,
    patch_size: int = 14,
    vision_layers: int = 3,
    seed: int = 0,
):
    """Build a random LLaVA-NeXT-shaped model (llava-v1.6's settings, its five tilings of the
    crop side) and its processor; save both when ``out_dir`` is given. Returns ``(model, processor)``."""
    return _build_tiny("llava-next", out_dir, image_size, patch_size, vision_layers, seed)


def _build_tiny(family_name: str, out_dir, image_size: int, patch_size: int, vision_layers: int, seed: int):
    import torch

    from visionzip_core.families import family_for

    family = family_for(family_name)
    tokenizer = build_tiny_tokenizer()
    vcfg = tiny_vision_config(image_size, patch_size, vision_layers)
    text = tiny_text_config(len(tokenizer))
    text.pad_token_id, text.bos_token_id, text.eos_token_id = (
        tokenizer.pad_token_id,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
    )
    config = family.build_config(vcfg, text, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    torch.manual_seed(seed)
    model = family.random_model(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    if family.count_depends_on_size:  # a tiling processor (LLaVA-NeXT)
        image_processor = family.build_image_processor(image_size, config.image_grid_pinpoints)
    else:
        image_processor = build_image_processor(image_size)
    processor = family.build_processor(image_processor, tokenizer, vcfg, chat_template=TINY_CHAT_TEMPLATE)
    if out_dir is not None:
        save_tiny(model, processor, out_dir)
    return model, processor


def save_tiny(model, processor, out_dir: str | os.PathLike) -> Path:
    """Write ``model`` and ``processor`` as one llava-hf folder, as every built-in is written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    save_pretrained_faithfully(processor, out)
    return out


def build_tiny_pretrain_parts(
    out_dir: str | os.PathLike, image_size: int = 112, patch_size: int = 14, seed: int = 0
) -> tuple[Path, Path]:
    """Save a tiny CLIP vision checkpoint and a tiny causal LM as two separate HF folders.

    These are the inputs of stage-1 pretraining (``clip/`` and ``llm/`` under ``out_dir``),
    shaped like ``openai/clip-vit-large-patch14-336`` and ``lmsys/vicuna-7b-v1.5``.
    """
    import torch
    from transformers import CLIPVisionModel, LlamaForCausalLM

    out = Path(out_dir)
    clip_dir, llm_dir = out / "clip", out / "llm"
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    clip = CLIPVisionModel(tiny_vision_config(image_size, patch_size))
    clip.save_pretrained(clip_dir)
    build_image_processor(image_size).save_pretrained(clip_dir)
    text_cfg = tiny_text_config(len(tokenizer))
    text_cfg.pad_token_id = tokenizer.pad_token_id
    text_cfg.bos_token_id = tokenizer.bos_token_id
    text_cfg.eos_token_id = tokenizer.eos_token_id
    llm = LlamaForCausalLM(text_cfg)
    llm.save_pretrained(llm_dir)
    save_pretrained_faithfully(tokenizer, llm_dir)
    return clip_dir, llm_dir
