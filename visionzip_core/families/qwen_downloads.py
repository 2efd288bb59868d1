"""How Qwen2-VL and Qwen2.5-VL downloads are laid out (transformers 4.x ``config.json`` keys and
weight names, ``preprocessor_config.json``), and tiny random folders written that way for tests.

The tiny folders are what ``Qwen2_5VL.write_tiny`` / ``Qwen2VL.write_tiny`` write: the loading code
then reads them exactly as it reads a real download.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

# Qwen2's special tokens whose ids the config and generation config carry.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# min/max pixels of the tiny preprocessor_config.json (the real one: 56*56 and 28*28*16384): 4 to 64
# merged tokens per image, so a 112 px image (4x4 merged tokens) is kept at its size.
TINY_QWEN_MIN_PIXELS = 4 * 28 * 28
TINY_QWEN_MAX_PIXELS = 64 * 28 * 28


def tiny_qwen2_5_vl_config(vocab_size: int, token_ids: dict[str, int], vision_depth: int = 4):
    """The ``config.json`` entries ``(text, vision, ids)`` of a tiny Qwen2.5-VL with its structure.

    Text: 2 layers, hidden 64, 4 heads (2 KV heads), head_dim 16, so mrope_section [2, 3, 3] sums
    to head_dim / 2. Vision: ``vision_depth`` blocks of width 32 with 2 heads, full attention in
    blocks 1 and 3 and windowed attention elsewhere; window_size 56 px = 2x2 merged tokens, so a
    112 px image (4x4 merged tokens) is split into 4 windows."""
    text = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "rope_theta": 1000000.0,
        "hidden_act": "silu",
        "max_window_layers": 2,
        "use_sliding_window": False,
        "sliding_window": 2048,
        "attention_dropout": 0.0,
        "bos_token_id": token_ids["<|endoftext|>"],
        "eos_token_id": token_ids["<|im_end|>"],
    }
    vision = {
        "depth": vision_depth,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "hidden_act": "silu",
        "in_chans": 3,
        "in_channels": 3,
        "out_hidden_size": text["hidden_size"],
        "patch_size": 14,
        "spatial_patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 56,
        "fullatt_block_indexes": [i for i in (1, 3) if i < vision_depth],
        "tokens_per_second": 2,
    }
    ids = {
        "image_token_id": token_ids["<|image_pad|>"],
        "video_token_id": token_ids["<|video_pad|>"],
        "vision_start_token_id": token_ids["<|vision_start|>"],
        "vision_end_token_id": token_ids["<|vision_end|>"],
        "vision_token_id": token_ids["<|vision_pad|>"],
    }
    return text, vision, ids


def _qwen_4x_key(name: str) -> str:
    """A transformers 5 ``Qwen2_5_VLForConditionalGeneration`` key in the 4.49-4.5x download layout."""
    for new, old in (
        ("model.visual.", "visual."),
        ("model.language_model.", "model."),
        ("lm_head.", "lm_head."),
    ):
        if name.startswith(new):
            return old + name[len(new) :]
    raise ValueError(f"unexpected Qwen2.5-VL key {name}")


def qwen_preprocessor_config(
    min_pixels: int, max_pixels: int, processor_class: str = "Qwen2_5_VLProcessor"
) -> dict:
    """A Qwen2-VL/2.5-VL download's ``preprocessor_config.json``: 14 px patches, 2 frames per temporal
    patch, 2x2 merge, CLIP normalisation, and the given pixel bounds."""
    return {
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": processor_class,
    }


def qwen2_vl_4x_vision(vision: dict) -> dict:
    """Qwen2-VL's 4.x ``vision_config`` of the same width as a tiny Qwen2.5-VL one (LayerNorm blocks
    with a QuickGELU MLP, full attention everywhere, ``embed_dim``/``hidden_size`` naming)."""
    return {
        "depth": vision["depth"],
        "embed_dim": vision["hidden_size"],
        "hidden_size": vision["out_hidden_size"],
        "mlp_ratio": 2,
        "num_heads": vision["num_heads"],
        "hidden_act": "quick_gelu",
        "in_chans": 3,
        "patch_size": 14,
        "spatial_patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }


def write_shards(
    out: Path,
    state: dict[str, torch.Tensor],
    vision_prefix: str,
    pattern: str = "model-{:05d}-of-{:05d}.safetensors",
) -> None:
    """``state`` as two safetensors shards (vision keys first, as the real shards) named by
    ``pattern``, plus ``model.safetensors.index.json``."""
    names = sorted(state, key=lambda k: (not k.startswith(vision_prefix), k))
    half = len(names) // 2
    shards = {pattern.format(1, 2): names[:half], pattern.format(2, 2): names[half:]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, out / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in keys})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_tokenizer_files(
    out: Path,
    tokenizer: Any,
    processor_class: str,
    chat_template: str,
    template_file: str = "chat_template.json",
) -> None:
    """The tokenizer files a Qwen download ships: ``tokenizer.json``, ``tokenizer_config.json`` (no
    template inside), ``vocab.json`` + ``merges.txt``, and the chat template in ``template_file``
    (``chat_template.json`` for the Qwen2/2.5/3-VL downloads, ``chat_template.jinja`` for Qwen3.5)."""
    tokenizer.save_pretrained(out)
    tokenizer.backend_tokenizer.model.save(str(out))  # vocab.json + merges.txt, as the download ships them
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    tok_config.pop("chat_template", None)
    tok_config.update(tokenizer_class="Qwen2Tokenizer", processor_class=processor_class)
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    (out / "chat_template.jinja").unlink(missing_ok=True)
    if template_file.endswith(".json"):
        (out / template_file).write_text(json.dumps({"chat_template": chat_template}, indent=2))
    else:
        (out / template_file).write_text(chat_template)


def write_tiny_folder(
    family: Any, tokenizer: Any, out_dir: str | os.PathLike, seed: int = 0, vision_depth: int = 4
) -> Path:
    """Write a tiny random model of ``family`` (Qwen2.5-VL or Qwen2-VL) laid out like the
    ``Qwen/Qwen2.5-VL-7B-Instruct`` (``Qwen/Qwen2-VL-7B-Instruct``) download, speaking ``tokenizer``
    (a ``Qwen2Tokenizer`` with Qwen2's special tokens and the chat template).

    Files: ``config.json`` in the 4.x layout (text keys flat, ``rope_scaling`` of type ``mrope``,
    nested ``vision_config``), ``generation_config.json``, two ``model-0000N-of-00002.safetensors``
    shards in the 4.x key layout (``visual.*``, ``model.*``, ``lm_head.*``) plus
    ``model.safetensors.index.json``, ``tokenizer.json``, ``tokenizer_config.json``, ``vocab.json``,
    ``merges.txt``, ``preprocessor_config.json`` (min/max pixels scaled down, see
    ``TINY_QWEN_MIN_PIXELS``) and ``chat_template.json``. Deterministic for a seed; returns the folder.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chat_template = tokenizer.chat_template
    token_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = -(-len(tokenizer) // 64) * 64  # padded past the specials, as 151665 -> 152064
    text, vision, ids = tiny_qwen2_5_vl_config(vocab_size, token_ids, vision_depth)

    variant, architecture = family.model_types[0], family.model_classes[0]
    processor_class, config_class = family.processor_classes[0], family.model_class.config_class
    if variant == "qwen2_vl":
        vision = qwen2_vl_4x_vision(vision)
    config_4x = {
        "architectures": [architecture],
        "model_type": variant,
        **text,
        **ids,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.49.0",
        "use_cache": True,
        "vision_config": vision,
    }
    (out / "config.json").write_text(json.dumps(config_4x, indent=2))
    config = config_class.from_pretrained(out)  # transformers 5's reading of the 4.x file
    torch.manual_seed(seed)
    model = family.random_model(config).eval()

    state = {_qwen_4x_key(k): v.detach().contiguous() for k, v in model.state_dict().items()}
    write_shards(out, state, vision_prefix="visual.")
    generation = {
        "bos_token_id": token_ids["<|endoftext|>"],
        "pad_token_id": token_ids["<|endoftext|>"],
        "eos_token_id": [token_ids["<|im_end|>"], token_ids["<|endoftext|>"]],
        "do_sample": False,
        "transformers_version": "4.49.0",
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))

    write_tokenizer_files(out, tokenizer, processor_class, chat_template)
    preprocessor = qwen_preprocessor_config(TINY_QWEN_MIN_PIXELS, TINY_QWEN_MAX_PIXELS, processor_class)
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    return out
