"""What a model folder must hold before anything loads from it: one line per problem.

Users bring folders from many places (llava-hf saved by transformers 4.x or 5.x, a whole CLIPModel
in ``.bin``, Vicuna with only ``tokenizer.model``). Without these checks a folder that lacks a
piece fails deep inside transformers, often after other weights have loaded, with a traceback
that names neither the folder nor the setting. Only small files are read (``config.json``, index
files, directory entries); weights are never opened here.

Roles:
  ``model``   a whole checkpoint of a supported family (``model.name_or_path``, ``generate.py --model``);
  ``vision``  the stage-1 vision tower (``model.vision_tower``): a CLIP folder;
  ``llm``     the stage-1 language model (``model.language_model``): a causal LM with a tokenizer.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from visionzip_core.families import UnsupportedModel, family_for, supported

#: The role of a whole model folder, of any supported family.
MODEL = "model"
ROLES = (MODEL, "vision", "llm")

# Single-file and sharded weights that transformers' from_pretrained reads (safetensors first).
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
VISION_MODEL_TYPES = ("clip", "clip_vision_model")


def check_model_folder(path: str | Path, role: str, key: str, config=None) -> list[str]:
    """Problems with ``path`` for ``role``, each line naming ``key`` (the setting that chose it).

    ``config``: the folder's config, when the caller already read it (model_type is then checked).
    An empty list means the folder has every piece the role loads.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    folder = Path(path)
    if not folder.is_dir():
        return [f"{key}: no such model folder {folder}"]
    if not (folder / "config.json").is_file():
        return [f"{key}: {folder} has no config.json (not a transformers model folder)"]
    problems = _weights(folder, key)
    if role in (MODEL, "llm"):
        problems += _tokenizer(folder, key)
    if role in (MODEL, "vision") and not _has_image_processor(folder):
        problems.append(f"{key}: {folder} has no preprocessor_config.json (the image processor)")
    if config is not None:
        problems += _model_type(config, role, folder, key)
    return problems


def _weights(folder: Path, key: str) -> list[str]:
    for name in WEIGHT_INDEXES:
        index = folder / name
        if index.is_file():
            try:
                shards = set(json.loads(index.read_text())["weight_map"].values())
            except (ValueError, KeyError, TypeError) as err:
                return [f"{key}: {index} is not a weight index ({type(err).__name__}: {err})"]
            missing = sorted(s for s in shards if not (folder / s).is_file())
            if missing:
                return [f"{key}: {index} names {len(missing)} missing shard(s): {', '.join(missing[:3])}"]
            return []
    if any((folder / name).is_file() for name in WEIGHT_FILES):
        return []
    return [
        f"{key}: {folder} has no weights (model.safetensors, pytorch_model.bin or a sharded index; "
        "an interrupted download?)"
    ]


def _has_image_processor(folder: Path) -> bool:
    """Downloads and transformers 4.x keep it in preprocessor_config.json; transformers 5 writes it
    inside processor_config.json."""
    if (folder / "preprocessor_config.json").is_file():
        return True
    try:
        return "image_processor" in json.loads((folder / "processor_config.json").read_text())
    except (OSError, ValueError):
        return False


def _tokenizer(folder: Path, key: str) -> list[str]:
    if (folder / "tokenizer.json").is_file():
        return []
    if (folder / "tokenizer.model").is_file():
        if importlib.util.find_spec("sentencepiece") is None:
            return [
                f"{key}: {folder} has only a SentencePiece tokenizer.model, and the sentencepiece "
                "package is not installed (pip install sentencepiece protobuf)"
            ]
        return []
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return []
    return [f"{key}: {folder} has no tokenizer (tokenizer.json, tokenizer.model, or vocab.json + merges.txt)"]


def _model_type(config, role: str, folder: Path, key: str) -> list[str]:
    model_type = getattr(config, "model_type", None)
    if role == "vision" and model_type not in VISION_MODEL_TYPES:
        return [f"{key}: {folder} is a '{model_type}' model, not a CLIP vision tower (model_type clip)"]
    if role == "llm":
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or hasattr(config, "vision_config"):
            return [f"{key}: {folder} is a '{model_type}' model, not a causal language model (e.g. llama)"]
    if role == MODEL:
        try:
            family_for(config)
        except UnsupportedModel:
            return [
                f"{key}: {folder} is a '{model_type}' model, not a model of a supported family "
                f"({supported()})"
            ]
    return []
