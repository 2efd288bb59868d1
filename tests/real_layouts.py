"""Tiny models written to disk the way the real downloads are laid out, not as transformers 5 saves.

- :func:`write_full_clip_folder`: ``openai/clip-vit-large-patch14-336``: a whole ``CLIPModel``
  (text + vision towers) in ``pytorch_model.bin``, ``model_type: clip``, CLIP's BPE tokenizer files
  and its image processor.
- :func:`write_vicuna_folder`: ``lmsys/vicuna-7b-v1.5``: two ``pytorch_model-0000N-of-00002.bin``
  shards and their index, ``config.json`` as transformers 4.31 wrote it, ``generation_config.json``,
  ``special_tokens_map.json`` and a SentencePiece ``tokenizer.model`` (no ``tokenizer.json``).
- :func:`write_llava_hf_4x_folder`: ``llava-hf/llava-1.5-7b-hf`` as transformers 4.x saved it: the
  old key layout (``language_model.model.*``, ``language_model.lm_head.*``,
  ``vision_tower.vision_model.*``, top-level ``multi_modal_projector.*``), a 4.x ``config.json``
  (``image_token_index``, sub-configs holding only their non-default fields, a padded vocabulary)
  and the 4.x processor files (``tokenizer.model`` + ``tokenizer.json`` with ``<image>`` and
  ``<pad>`` added, ``preprocessor_config.json``, ``processor_config.json``, ``chat_template.json``).

- :func:`write_llava_hf_4x_folder` with ``family="llava-next"``: ``llava-hf/llava-v1.6-vicuna-7b-hf``
  as transformers 4.x saved it: the same old layout plus a top-level ``image_newline``, a
  ``llava_next`` config with ``image_grid_pinpoints``, and ``LlavaNextImageProcessor`` files.

Sizes are tiny; the formats, file names and key layouts are the real ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

VICUNA_VOCAB = 1000  # the SentencePiece model's size; <image> and <pad> follow, as 32000/32001 do
LLAVA_VOCAB = 1008  # padded to a multiple of 8 beyond them, as llava-hf pads 32002 to 32064

# The chat template llava-hf/llava-1.5-7b-hf ships in chat_template.json (USER/ASSISTANT turns).
LLAVA_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] "
    "!= 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


CLIP_VOCAB = 2 * 256 + 5  # bytes, bytes + "</w>", 3 merges, <|startoftext|>, <|endoftext|>


def _byte_symbols() -> list[str]:
    """The byte-level BPE alphabet (GPT-2/CLIP): printable bytes as themselves, the rest shifted past 255."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    shifted, symbols = 0, {}
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + shifted)
            shifted += 1
    return [symbols[b] for b in range(256)]


def _clip_bpe_files(out: Path) -> None:
    """CLIP's tokenizer files (vocab.json with ``</w>`` word ends, merges.txt), tiny but loadable."""
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols]
    merges = ["t h", "th e</w>", "i n"]
    vocab += ["th", "the</w>", "in", "<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {**special, "model_max_length": 77, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True}
        )
    )


def write_full_clip_folder(out: Path) -> Path:
    from transformers import CLIPConfig, CLIPModel

    from visionzip_core.families.llava import clip_image_processor, tiny_vision_config

    out.mkdir(parents=True, exist_ok=True)
    config = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "vocab_size": CLIP_VOCAB,
            "max_position_embeddings": 16,
            "bos_token_id": CLIP_VOCAB - 2,
            "eos_token_id": CLIP_VOCAB - 1,
            "pad_token_id": 1,
        },
        vision_config=tiny_vision_config().to_dict(),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config)
    config.save_pretrained(out)
    torch.save(model.state_dict(), out / "pytorch_model.bin")
    clip_image_processor(config.vision_config.image_size).save_pretrained(out)
    _clip_bpe_files(out)
    return out


def _vicuna_config_431(config) -> dict:
    """``config.json`` in the form lmsys/vicuna-7b-v1.5 has (written by transformers 4.31)."""
    return {
        "_name_or_path": "vicuna-7b-v1.5",
        "architectures": ["LlamaForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": config.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings,
        "model_type": "llama",
        "num_attention_heads": config.num_attention_heads,
        "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": config.num_key_value_heads,
        "pad_token_id": 0,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": "4.31.0",
        "use_cache": True,
        "vocab_size": config.vocab_size,
    }


def _save_sharded_bin(state: dict, out: Path, shards: int = 2) -> None:
    names = list(state)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = names[i * per : (i + 1) * per]
        torch.save({k: state[k].contiguous() for k in part}, out / file)
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


def write_vicuna_folder(out: Path) -> Path:
    from transformers import LlamaForCausalLM

    from visionzip_core.families.llava import tiny_text_config
    from visionzip_core.testing.tokenizers import write_sentencepiece_tokenizer

    write_sentencepiece_tokenizer(out, legacy=False)
    config = tiny_text_config(VICUNA_VOCAB)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 0
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    state = {k: v.to(torch.float16) for k, v in model.state_dict().items()}  # vicuna ships fp16
    (out / "config.json").write_text(json.dumps(_vicuna_config_431(config), indent=2))
    generation = {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "temperature": 0.9,
        "max_length": 4096,
        "top_p": 0.6,
        "transformers_version": "4.31.0",
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    special = {
        "bos_token": {
            "content": "<s>",
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
        },
        "eos_token": {
            "content": "</s>",
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
        },
        "unk_token": {
            "content": "<unk>",
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
        },
        "pad_token": "<unk>",
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    _save_sharded_bin(state, out)
    return out


def to_4x_key(name: str) -> str:
    """A transformers 5 ``LlavaForConditionalGeneration`` (or LLaVA-NeXT) key in transformers 4.x's layout."""
    for new, old in (
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.image_newline", "image_newline"),
    ):
        if name.startswith(new):
            return old + name[len(new) :]
    raise ValueError(f"unexpected key {name}")


def _diff(config) -> dict:
    """A sub-config as 4.x wrote it: only the fields that differ from the class defaults."""
    diff = config.to_diff_dict()
    diff.pop("transformers_version", None)
    return diff


def write_llava_hf_4x_folder(out: Path, seed: int = 0, family: str = "llava") -> Path:
    """A tiny llava-1.5 (or, with ``family="llava-next"``, llava-v1.6) in transformers 4.x's layout.
    Returns the folder."""
    from safetensors.torch import save_file
    from transformers import (
        LlamaTokenizerFast,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )

    next_ = family == "llava-next"
    config_class, model_class = (
        (LlavaNextConfig, LlavaNextForConditionalGeneration)
        if next_
        else (LlavaConfig, LlavaForConditionalGeneration)
    )
    architecture, processor_class = (
        ("LlavaNextForConditionalGeneration", "LlavaNextProcessor")
        if next_
        else ("LlavaForConditionalGeneration", "LlavaProcessor")
    )

    from visionzip_core.families.llava import clip_image_processor, tiny_text_config, tiny_vision_config
    from visionzip_core.testing.tokenizers import write_sentencepiece_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    write_sentencepiece_tokenizer(out, legacy=False)
    tokenizer = LlamaTokenizerFast.from_pretrained(out)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    image_id, pad_id = tokenizer.convert_tokens_to_ids(["<image>", "<pad>"])
    assert (image_id, pad_id) == (VICUNA_VOCAB, VICUNA_VOCAB + 1)

    vision, text = tiny_vision_config(), tiny_text_config(LLAVA_VOCAB)
    text.bos_token_id, text.eos_token_id, text.pad_token_id = 1, 2, pad_id
    side = vision.image_size
    pinpoints = [[side, 2 * side], [2 * side, side], [2 * side, 2 * side], [3 * side, side], [side, 3 * side]]
    extra = {"image_grid_pinpoints": pinpoints} if next_ else {}
    config = config_class(
        vision_config=vision,
        text_config=text,
        image_token_id=image_id,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
        **extra,
    )
    torch.manual_seed(seed)
    model = model_class(config)
    save_file(
        {to_4x_key(k): v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors"
    )

    patches = (vision.image_size // vision.patch_size) ** 2
    config_4x = {
        "architectures": [architecture],
        "ignore_index": -100,
        "image_token_index": image_id,
        "model_type": "llava_next" if next_ else "llava",
        **extra,
        "pad_token_id": pad_id,
        "projector_hidden_act": "gelu",
        "text_config": {**_diff(text), "model_type": "llama", "architectures": ["LlamaForCausalLM"]},
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.44.0",
        "vision_config": {**_diff(vision), "model_type": "clip_vision_model"},
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "image_seq_length": patches,
        "vocab_size": LLAVA_VOCAB,
    }
    (out / "config.json").write_text(json.dumps(config_4x, indent=2))
    generation = {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": pad_id,
        "transformers_version": "4.44.0",
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))

    tokenizer.save_pretrained(out)  # tokenizer.json + tokenizer_config.json with the added tokens
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    tok_config.update(legacy=False, processor_class=processor_class, tokenizer_class="LlamaTokenizer")
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    if next_:
        from transformers import LlavaNextImageProcessor

        image_processor = LlavaNextImageProcessor(
            size={"shortest_edge": side},
            crop_size={"height": side, "width": side},
            image_grid_pinpoints=pinpoints,
        ).to_dict()
        image_processor.update(
            image_processor_type="LlavaNextImageProcessor", processor_class=processor_class
        )
    else:
        image_processor = clip_image_processor(vision.image_size).to_dict()
        image_processor.update(image_processor_type="CLIPImageProcessor", processor_class=processor_class)
    (out / "preprocessor_config.json").write_text(json.dumps(image_processor, indent=2))
    processor = {
        "image_token": "<image>",
        "num_additional_image_tokens": 1,
        "patch_size": vision.patch_size,
        "processor_class": processor_class,
        "vision_feature_select_strategy": "default",
    }
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": LLAVA_HF_CHAT_TEMPLATE}, indent=2))
    return out
