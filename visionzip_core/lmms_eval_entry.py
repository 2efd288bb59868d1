"""The ``lmms_eval.models`` entry point (``pyproject.toml``): tells lmms-eval that ``--model visionzip``
is :class:`visionzip_core.lmms_eval_model.VisionZipLMM`, by name, without importing it.

lmms-eval loads its entry points while its ``lmms_eval.models`` package initializes. Kept apart from
the model module, which imports lmms-eval itself: were the entry point there, importing that module
first would start lmms-eval's registry while the module is half-built, and ``visionzip`` would be
missing from it.
"""

from __future__ import annotations

# lmms-eval is the optional [eval] extra; this module is only loaded by lmms-eval itself.
try:
    from lmms_eval.models.registry_v2 import ModelManifest
except ImportError:  # pragma: no cover - exercised where the extra is missing
    ModelManifest = None

MODEL_ID = "visionzip"
MODEL_CLASS = "visionzip_core.lmms_eval_model.VisionZipLMM"


def lmms_eval_models() -> list:
    """lmms-eval's manifest for ``--model visionzip``."""
    if ModelManifest is None:
        raise ImportError("lmms-eval is not installed: bash scripts/setup.sh --eval (the [eval] extra)")
    return [ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS)]
