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

from visionzip_core.testing.tokenizers import (
    IMAGE_TOKEN,
    QWEN2_5_VL_CHAT_TEMPLATE,
    QWEN_SPECIAL_TOKENS,
    TINY_CHAT_TEMPLATE,
    build_tiny_qwen_tokenizer,
    build_tiny_tokenizer,
)
from visionzip_core.tokenizer_files import save_pretrained_faithfully


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


# -- Qwen2.5-VL ---------------------------------------------------------------------------------------

# min/max pixels of the tiny preprocessor_config.json (the real one: 56*56 and 28*28*16384): 4 to 64
# merged tokens per image, so a 112 px image (4x4 merged tokens) is kept at its size.
TINY_QWEN_MIN_PIXELS = 4 * 28 * 28
TINY_QWEN_MAX_PIXELS = 64 * 28 * 28


def tiny_qwen2_5_vl_config(vocab_size: int, token_ids: dict[str, int], vision_depth: int = 4):
    """A tiny ``Qwen2_5_VLConfig`` (transformers 5 objects) with Qwen2.5-VL's structure.

    Text: 2 layers, hidden 64, 4 heads (2 KV heads), head_dim 16, so mrope_section [2, 3, 3] sums
    to head_dim / 2. Vision: ``vision_depth`` blocks of width 32 with 2 heads, full attention in
    blocks 1 and 3 and windowed attention elsewhere; window_size 56 px = 2x2 merged tokens, so a
    112 px image (4x4 merged tokens) is split into 4 windows."""
    from transformers import Qwen2_5_VLConfig

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
    return text, vision, ids, Qwen2_5_VLConfig


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


def build_tiny_qwen2_vl(out_dir: str | os.PathLike, seed: int = 0, vision_depth: int = 4) -> Path:
    """As :func:`build_tiny_qwen2_5_vl`, a ``Qwen/Qwen2-VL-7B-Instruct``-like folder (model_type
    ``qwen2_vl``, ``Qwen2VLProcessor``)."""
    return build_tiny_qwen2_5_vl(out_dir, seed, vision_depth, variant="qwen2_vl")


def build_tiny_qwen2_5_vl(
    out_dir: str | os.PathLike, seed: int = 0, vision_depth: int = 4, variant: str = "qwen2_5_vl"
) -> Path:
    """Write a tiny random Qwen2.5-VL folder laid out like the ``Qwen/Qwen2.5-VL-7B-Instruct`` download.

    Files: ``config.json`` in the 4.x layout (text keys flat, ``rope_scaling`` of type ``mrope``,
    nested ``vision_config``), ``generation_config.json``, two ``model-0000N-of-00002.safetensors``
    shards in the 4.x key layout (``visual.*``, ``model.*``, ``lm_head.*``) plus
    ``model.safetensors.index.json``, ``tokenizer.json``, ``tokenizer_config.json``, ``vocab.json``,
    ``merges.txt``, ``preprocessor_config.json`` (min/max pixels scaled down, see
    ``TINY_QWEN_MIN_PIXELS``) and ``chat_template.json``. Deterministic for a seed; returns the folder.
    """
    import json

    import torch
    from safetensors.torch import save_file

    from visionzip_core.families import family_for

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw, tokenizer = build_tiny_qwen_tokenizer()
    token_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    vocab_size = -(-len(tokenizer) // 64) * 64  # padded past the specials, as 151665 -> 152064
    text, vision, ids, config_class = tiny_qwen2_5_vl_config(vocab_size, token_ids, vision_depth)

    architecture, processor_class = "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"
    if variant == "qwen2_vl":
        from transformers import Qwen2VLConfig as config_class

        architecture, processor_class = "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"
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
    model = family_for(variant).random_model(config).eval()

    state = {_qwen_4x_key(k): v.detach().contiguous() for k, v in model.state_dict().items()}
    names = sorted(state, key=lambda k: (not k.startswith("visual."), k))  # vision first, as the real shards
    half = len(names) // 2
    shards = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, out / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in keys})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    generation = {
        "bos_token_id": token_ids["<|endoftext|>"],
        "pad_token_id": token_ids["<|endoftext|>"],
        "eos_token_id": [token_ids["<|im_end|>"], token_ids["<|endoftext|>"]],
        "do_sample": False,
        "transformers_version": "4.49.0",
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))

    tokenizer.save_pretrained(out)
    raw.model.save(str(out))  # vocab.json + merges.txt, as the real download also ships them
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    tok_config.pop("chat_template", None)  # the download keeps it in chat_template.json
    tok_config.update(tokenizer_class="Qwen2Tokenizer", processor_class=processor_class)
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    (out / "chat_template.jinja").unlink(missing_ok=True)
    (out / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_5_VL_CHAT_TEMPLATE}, indent=2))
    preprocessor = qwen_preprocessor_config(TINY_QWEN_MIN_PIXELS, TINY_QWEN_MAX_PIXELS, processor_class)
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    return out
