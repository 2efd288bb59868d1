"""The training config's names in one place, for callers that import them from here: the schema
(:mod:`~visionzip_core.training.schema`), the loader (:mod:`~visionzip_core.training.config_loading`)
and the rules between sections (:mod:`~visionzip_core.training.config_rules`). Library code
imports from those modules directly.
"""

from visionzip_core.training.config_loading import apply_overrides, load_config
from visionzip_core.training.config_rules import PACKED_LAYOUT, packing_problem
from visionzip_core.training.repo_paths import resolve_repo_path
from visionzip_core.training.schema import (
    ConfigError,
    DeepSpeedSettings,
    EvalSettings,
    ExportSettings,
    LoraSettings,
    ModelSettings,
    OptimSettings,
    Settings,
    TrainSettings,
    VisionZipSettings,
    WandbSettings,
    config_keys_help,
)

__all__ = [
    "PACKED_LAYOUT",
    "ConfigError",
    "DeepSpeedSettings",
    "EvalSettings",
    "ExportSettings",
    "LoraSettings",
    "ModelSettings",
    "OptimSettings",
    "Settings",
    "TrainSettings",
    "VisionZipSettings",
    "WandbSettings",
    "apply_overrides",
    "config_keys_help",
    "load_config",
    "packing_problem",
    "resolve_repo_path",
]
