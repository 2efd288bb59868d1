"""Data pipeline: LLaVA / HF-messages samples -> token ids with K image tokens per image -> batches.

Modules: ``settings`` (the YAML ``data:`` section), ``sources`` (reading files, normalising samples),
``templates`` (plain, vicuna_v1, chat_template), ``images`` (decode, RGB, pad/resize),
``encode`` (tokenise, expand ``<image>``, labels, truncation), ``validation`` (bad-sample policy),
``dataset`` (preflight, mixing, lazy items), ``collate``, ``sampler``.
"""

from visionzip_core.data.collate import DataCollator
from visionzip_core.data.dataset import VisionLanguageDataset, build_dataset
from visionzip_core.data.encode import IGNORE_INDEX, Encoder
from visionzip_core.data.sampler import LengthGroupedSampler
from visionzip_core.data.settings import VICUNA_V1_SYSTEM, DatasetSource, DataSettings
from visionzip_core.data.validation import BAD_SAMPLE_KINDS, BadDataError

__all__ = [
    "BAD_SAMPLE_KINDS",
    "IGNORE_INDEX",
    "VICUNA_V1_SYSTEM",
    "BadDataError",
    "DataCollator",
    "DataSettings",
    "DatasetSource",
    "Encoder",
    "LengthGroupedSampler",
    "VisionLanguageDataset",
    "build_dataset",
]
