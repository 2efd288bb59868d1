"""Export the trained model from the DeepSpeed engine into ``output_dir/final/``.

``final/`` is an ordinary llava-hf folder (safetensors weights, a config that records the
VisionZip settings, processor and tokenizer): it loads with ``from_pretrained`` and with
:func:`visionzip_core.load_visionzip_model`. Also:

  - ``projector`` / ``pretrain``: ``final/projector.safetensors``, the projector weights alone;
  - ``lora``: ``final/adapter/`` (peft adapter, projector included); ``final/`` holds the merged
    model when ``export.merge_lora`` is on, otherwise only the adapter and the processor.

Under ZeRO-3 no rank holds whole weights: they are gathered onto rank 0 first (a collective:
ALL RANKS must call :func:`export_final`), loaded into a CPU copy of the model, and saved there.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from visionzip_core.families import family_for
from visionzip_core.tokenizer_files import save_pretrained_faithfully
from visionzip_core.training import distributed as dist
from visionzip_core.training.modeling import build_model
from visionzip_core.training.schema import Settings


def full_model_on_rank0(engine, settings: Settings, stage: int, dtype: torch.dtype, processor):
    """The trained model with whole weights on rank 0 (``None`` elsewhere). ALL RANKS must call this."""
    if stage < 3 and settings.model.quantization != "none":
        return unquantized_copy(engine.module, settings, dtype, processor) if dist.is_main() else None
    if stage < 3:
        return engine.module if dist.is_main() else None
    state = engine._zero3_consolidated_16bit_state_dict()  # collective; whole tensors on rank 0 only
    if not dist.is_main():
        return None
    copy = build_model(settings, dtype, processor, for_export=True)
    missing, unexpected = copy.load_state_dict(state, strict=False)
    # A tied lm_head may be absent from the gathered dict (it is the embedding); real weights may not.
    tied = bool(getattr(copy.config, "tie_word_embeddings", False))
    missing = [k for k in missing if not (tied and "lm_head" in k)]
    if missing or unexpected:
        raise RuntimeError(f"export: gathered weights do not match the model: {missing[:5]} {unexpected[:5]}")
    return copy


def unquantized_copy(trained, settings: Settings, dtype: torch.dtype, processor):
    """The model in ``dtype`` (no bitsandbytes layers), carrying what ``trained`` trained.

    With ``model.quantization`` only the projector and the LoRA weights train; the base weights
    are reloaded in full precision, so that ``final/`` (merged or not) is an ordinary model in the
    base's dtype rather than a quantized one, which would need bitsandbytes to load.
    """
    plain = settings.model_copy(update={"model": settings.model.model_copy(update={"quantization": "none"})})
    copy = build_model(plain, dtype, processor, for_export=True)
    state = {n: p.detach().to(dtype) for n, p in trained.named_parameters() if p.requires_grad}
    missing = set(state) - {n for n, _ in copy.named_parameters()}
    if missing:
        raise RuntimeError(
            f"export: trained weights missing from the unquantized model: {sorted(missing)[:5]}"
        )
    copy.load_state_dict(state, strict=False)
    return copy


def _projector_state(folder: Path, model) -> dict[str, torch.Tensor]:
    """The projector tensors of a saved model, under the same names as in its safetensors files."""
    from safetensors.torch import load_file

    family = family_for(model)
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update({k: v for k, v in load_file(str(shard)).items() if family.module_group(k) == "projector"})
    return out


def export_final(engine, settings: Settings, processor, stage: int, dtype: torch.dtype) -> dict[str, Path]:
    """Write ``final/``; returns the written paths by kind (rank 0; empty elsewhere). ALL RANKS must call this."""
    model = full_model_on_rank0(engine, settings, stage, dtype, processor)
    if not dist.is_main():
        dist.barrier()
        return {}
    final = Path(settings.train.output_dir) / "final"
    tmp = final.with_name("final.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    written: dict[str, Path] = {}
    mode = settings.train.mode
    if mode == "lora":
        adapter = tmp / "adapter"
        model.save_pretrained(adapter)
        written["adapter"] = adapter
        if settings.export.merge_lora:
            merged = model.merge_and_unload()
            merged.config.use_cache = True
            merged.save_pretrained(tmp)
            written["model"] = tmp
    else:
        model.config.use_cache = True
        model.save_pretrained(tmp)
        written["model"] = tmp
        if mode in ("projector", "pretrain"):
            projector = _projector_state(tmp, model)
            save_file(projector, str(tmp / "projector.safetensors"), metadata={"format": "pt"})
            written["projector"] = tmp / "projector.safetensors"
    save_pretrained_faithfully(processor, tmp)  # keeps `legacy`: stage 2 tokenises as stage 1 did
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    written = {k: final / p.relative_to(tmp) for k, p in written.items()}
    dist.barrier()
    return written
