"""The model a training config names, resolved once: family, folders, config, derived sizes.

:func:`resolve_model_spec` reads each model folder's ``config.json`` once (with the config's
``model.trust_remote_code``), and the trainer, the export, the resume record, the data pipeline's
family inputs and the batch planner take the resulting :class:`ModelSpec` instead of going back
from the settings to the folder, its config and its family each time. No weights are read.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visionzip_core.families import ModelFamily, family_for, stage1_family
from visionzip_core.model_names import resolve_model_path


@dataclass(frozen=True)
class ModelSpec:
    """What a training run knows of its model before any weight loads.

    Attributes:
        family: the :class:`~visionzip_core.families.ModelFamily` that builds and adapts it.
        assembled: True for stage 1 (``train.mode=pretrain``): the model is assembled from a vision
            folder and an LLM folder; False: it loads from ``path``.
        trust_remote_code: ``model.trust_remote_code``, passed to every load.
        path: the model folder (``model.name_or_path``), None when assembled.
        vision_path: stage 1's vision-tower folder (``model.vision_tower``), else None.
        llm_path: stage 1's LLM folder (``model.language_model``), else None.
        config: the model's config; stage 1: the vision folder's (the tower's fields).
        llm_config: stage 1's LLM config, else None.
        feature_layer: the vision layer the projector reads (VisionZip's capture layer).
        llm_hidden_size: the LLM's hidden size (sizes ZeRO's buffers).
        tower_tokens: tokens per image (or crop) the tower yields, CLS included.
    """

    family: ModelFamily
    assembled: bool
    trust_remote_code: bool
    path: str | None
    vision_path: str | None
    llm_path: str | None
    config: Any
    llm_config: Any | None
    feature_layer: int
    llm_hidden_size: int
    tower_tokens: int

    @property
    def tower_source(self) -> str:
        """The folder that holds the vision tower, for messages."""
        return self.vision_path if self.assembled else self.path

    def model_config(self) -> Any:
        """A private copy of the model config (None when assembled): ``from_pretrained`` and
        VisionZip write into the config they are given, and the spec's must stay as read."""
        return None if self.assembled else copy.deepcopy(self.config)


def model_path(name: str, key: str) -> str:
    """Local folder for ``name`` (``builtin:*`` test models are built on first use); clear error if missing."""
    path = Path(resolve_model_path(name))
    if not path.is_dir():
        raise FileNotFoundError(
            f"{key}: no such model folder {path} (edit the config or override {key}=/path)"
        )
    return str(path)


def read_config(path: str, trust_remote_code: bool) -> Any:
    """``config.json`` of the folder ``path`` as transformers reads it."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)


def resolve_model_spec(settings) -> ModelSpec:
    """The :class:`ModelSpec` of ``settings.model`` in ``settings.train.mode``: one config read per folder."""
    m, trust = settings.model, settings.model.trust_remote_code
    if settings.train.mode == "pretrain":
        family = stage1_family()
        vision_path = model_path(m.vision_tower, "model.vision_tower")
        llm_path = model_path(m.language_model, "model.language_model")
        vision_config, llm_config = read_config(vision_path, trust), read_config(llm_path, trust)
        return ModelSpec(
            family=family,
            assembled=True,
            trust_remote_code=trust,
            path=None,
            vision_path=vision_path,
            llm_path=llm_path,
            config=vision_config,
            llm_config=llm_config,
            feature_layer=family.feature_layer(vision_config),
            llm_hidden_size=llm_config.hidden_size,
            tower_tokens=family.tower_tokens(vision_config),
        )
    path = model_path(m.name_or_path, "model.name_or_path")
    config = read_config(path, trust)
    family = family_for(config)
    return ModelSpec(
        family=family,
        assembled=False,
        trust_remote_code=trust,
        path=path,
        vision_path=None,
        llm_path=None,
        config=config,
        llm_config=None,
        feature_layer=family.feature_layer(config),
        llm_hidden_size=family.llm_hidden_size(config),
        tower_tokens=family.tower_tokens(config),
    )
