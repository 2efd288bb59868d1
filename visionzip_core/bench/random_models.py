"""Random-weight models of the benchmark sizes (:mod:`visionzip_core.bench.sizes`), built directly
on the target device (``"meta"``: the structure only), and the processor files the Qwen2.5-VL
benchmarks load."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from visionzip_core.bench.sizes import (
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    BenchSize,
    QwenBenchSize,
)
from visionzip_core.families import family_for
from visionzip_core.families.qwen_downloads import qwen_preprocessor_config
from visionzip_core.testing.tokenizers import (
    QWEN2_5_VL_CHAT_TEMPLATE,
    QWEN_SPECIAL_TOKENS,
    build_tiny_qwen_tokenizer,
    build_tiny_tokenizer,
)


def llava_config(size: BenchSize, family_name: str = "llava-1.5"):
    """A ``LlavaConfig`` with LLaVA-1.5's settings and ``size``'s shapes (built by its family), or
    a ``LlavaNextConfig`` with llava-v1.6's (``family_name="llava-next"``)."""
    family = family_for(family_name)
    text = size.llm.to_config(pad_token_id=PAD_TOKEN_ID, bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID)
    return family.build_config(size.vision.to_config(), text, IMAGE_TOKEN_ID)


def build_random_llava(
    size: BenchSize, device: str | torch.device = "cpu", seed: int = 0, family: str = "llava-1.5"
):
    """A LLaVA-1.5 (or LLaVA-NeXT) model with random weights, built directly on ``device``.

    On a GPU the weights are allocated and initialised there (a 7B model builds in seconds);
    ``device="meta"`` builds the structure only, for checks without memory.
    """
    dtype = getattr(torch, size.dtype)
    config = llava_config(size, family)
    torch.manual_seed(seed)
    with torch.device(device):
        model = family_for(config).random_model(config, dtype=dtype)
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    model.generation_config.bos_token_id = BOS_TOKEN_ID
    model.generation_config.eos_token_id = EOS_TOKEN_ID
    return model


def qwen_token_ids() -> dict[str, int]:
    """Special-token ids of the tiny Qwen tokenizer (:func:`visionzip_core.testing.tokenizers.build_tiny_qwen_tokenizer`),
    which the benchmarks' random Qwen models and processors share."""
    _, tokenizer = build_tiny_qwen_tokenizer()
    return {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}


def qwen_config(size: QwenBenchSize, token_ids: dict[str, int] | None = None):
    """A ``qwen2_5_vl`` config with ``size``'s shapes and the tiny Qwen tokenizer's special ids."""
    ids = token_ids or qwen_token_ids()
    text = {
        **size.text,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    data = {
        "model_type": "qwen2_5_vl",
        "text_config": text,
        "vision_config": size.vision,
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "tie_word_embeddings": False,
    }
    return family_for(data["model_type"]).config_from_dict(data)


def build_random_model(size, device: str | torch.device = "cpu", seed: int = 0, family: str = "llava-1.5"):
    """A model of ``family`` with ``size``'s shapes and random weights: :func:`build_random_llava`
    for a CLIP + Llama size, a Qwen2.5-VL for a :class:`QwenBenchSize` (``device="meta"``: the
    structure only)."""
    if not isinstance(size, QwenBenchSize):
        return build_random_llava(size, device, seed=seed, family=family)
    ids = qwen_token_ids()
    config = qwen_config(size, ids)
    torch.manual_seed(seed)
    with torch.device(device):
        model = family_for(config).random_model(config, dtype=getattr(torch, size.dtype))
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.bos_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    return model


def write_qwen_processor_files(folder: str | os.PathLike) -> Path:
    """Write a Qwen2.5-VL processor folder for the benchmarks' random models: the tiny Qwen tokenizer
    (its special ids are :func:`qwen_token_ids`), Qwen2.5-VL-7B-Instruct's image settings (min_pixels
    56 x 56, max_pixels 28 x 28 x 16384, so a 448 px benchmark image keeps its size) and chat template."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    _, tokenizer = build_tiny_qwen_tokenizer()
    tokenizer.model_max_length = 32768
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    (out / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_5_VL_CHAT_TEMPLATE}))
    preprocessor = qwen_preprocessor_config(56 * 56, 28 * 28 * 16384)  # Qwen2.5-VL-7B-Instruct's bounds
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    return out


def random_model_processor(size, model):
    """The processor of a random benchmark model, matched to its token ids: for a
    :class:`QwenBenchSize`, the family's processor class read from :func:`write_qwen_processor_files`
    as from a download; otherwise the family's processor built from parts (its image processor for
    the tower's crops, the tiny byte-level BPE tokenizer), the model's special ids pointed at the
    tokenizer's."""
    family = family_for(model)
    if isinstance(size, QwenBenchSize):
        with tempfile.TemporaryDirectory() as folder:
            return family.load_processor(str(write_qwen_processor_files(folder)))
    tokenizer = build_tiny_tokenizer()
    tokenizer.model_max_length = 8192  # prompts carry up to 576 (LLaVA-NeXT: 2928) image tokens
    image_processor = family.image_processor_for(model.config, size.vision.image_size)
    processor = family.build_processor(
        image_processor, tokenizer, model.config.vision_config, chat_template=tokenizer.chat_template
    )
    # The random model's embedding covers these ids; point its special ids at the tokenizer's.
    model.config.image_token_id = tokenizer.convert_tokens_to_ids(family.image_token)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    return processor
