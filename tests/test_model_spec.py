"""The training model is resolved once: one config read per model folder, with the config's
``model.trust_remote_code`` on every read.

    pytest tests/test_model_spec.py
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from visionzip_core.training.config_loading import load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def config_reads(monkeypatch):
    """Every ``AutoConfig.from_pretrained`` call in this test, as ``(folder, trust_remote_code)``
    (transformers' own calls from inside its processor and model loaders included)."""
    from transformers import AutoConfig

    real = AutoConfig.from_pretrained.__func__
    reads: list[tuple[str, object]] = []

    def counting(cls, path, *args, **kwargs):
        reads.append((str(Path(path).resolve()), kwargs.get("trust_remote_code")))
        return real(cls, path, *args, **kwargs)

    monkeypatch.setattr(AutoConfig, "from_pretrained", classmethod(counting))
    return reads


def _everything_a_run_derives(settings):
    """What the recipe builds from the model before training and at export: the spec, the processor
    and counts, the dataset inputs, the resume record, ZeRO's hidden size, the model itself."""
    from visionzip_core.training.deepspeed_config import fill_deepspeed_config
    from visionzip_core.training.model_spec import resolve_model_spec
    from visionzip_core.training.modeling import build_model, build_processor, dataset_inputs
    from visionzip_core.training.resume import run_record

    spec = resolve_model_spec(settings)
    processor, count = build_processor(settings, spec)
    dataset_inputs(settings, spec, processor)
    run_record(settings, feature_layer=spec.feature_layer, world_size=1, precision="fp32", zero_stage=2)
    fill_deepspeed_config(settings, 1, "fp32", spec.llm_hidden_size)
    build_model(settings, spec, torch.float32, processor)
    return spec, count


@pytest.mark.parametrize("mode", ["finetune", "pretrain"])
def test_each_model_folder_is_read_once_with_the_configs_trust_remote_code(
    mode, tiny_llava_dir, tiny_pretrain_dirs, config_reads
):
    if mode == "pretrain":
        vision, llm = tiny_pretrain_dirs
        folders = [vision, llm]
        model = [
            "model.name_or_path=null",
            f"model.vision_tower={vision}",
            f"model.language_model={llm}",
            "data.template=plain",
        ]
    else:
        folders = [tiny_llava_dir]
        model = [f"model.name_or_path={tiny_llava_dir}"]
    settings = load_config(
        REPO / "configs/demo.yaml", [*model, f"train.mode={mode}", "model.trust_remote_code=true"]
    )
    config_reads.clear()  # the loader's own checks are not the run's model
    spec, count = _everything_a_run_derives(settings)
    per_folder = Counter(path for path, _ in config_reads)
    assert per_folder == Counter({str(Path(f).resolve()): 1 for f in folders})
    assert [trust for _, trust in config_reads] == [True] * len(folders)
    assert spec.trust_remote_code and spec.feature_layer == -2 and count() > 0


def test_the_spec_is_frozen_and_keeps_its_config_as_read(tiny_llava_dir):
    """Building the model (VisionZip records its settings on the config it is given) leaves the
    spec's config as read: each load gets its own copy."""
    import dataclasses

    from visionzip_core.training.model_spec import resolve_model_spec
    from visionzip_core.training.modeling import build_model, build_processor

    settings = load_config(REPO / "configs/demo.yaml", [f"model.name_or_path={tiny_llava_dir}"])
    spec = resolve_model_spec(settings)
    before = spec.config.to_dict()
    processor, _ = build_processor(settings, spec)
    model = build_model(settings, spec, torch.float32, processor)
    assert "visionzip" in model.config.to_dict() and spec.config.to_dict() == before
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.feature_layer = 0
