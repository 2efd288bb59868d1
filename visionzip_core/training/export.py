"""Export the trained model from the DeepSpeed engine into ``output_dir/final/``.

``final/`` is an ordinary llava-hf folder (safetensors weights, a config that records the
VisionZip settings, processor and tokenizer): it loads with ``from_pretrained`` and with
:func:`visionzip_core.load_visionzip_model`. Also:

  - ``projector`` / ``pretrain``: ``final/projector.safetensors``, the projector weights alone;
  - ``lora``: ``final/adapter/`` (peft adapter, projector included); ``final/`` holds the merged
    model when ``export.merge_lora`` is on, otherwise only the adapter and the processor.

Under ZeRO-3 no rank holds whole weights: they are gathered onto rank 0 first (a collective:
ALL RANKS must call :func:`export_final`) and written from there as they are, through a model
built on the meta device that takes them as its own (the same key layout and config files as an
unpartitioned save), so the base model is never rebuilt in memory or read from disk again. In
``lora`` mode the meta-device model is wrapped in the trained adapter's own peft config first, so
peft writes the adapter (and merges it) from the gathered tensors alone.
"""

from __future__ import annotations

import shutil
from copy import deepcopy
from pathlib import Path

import torch
from safetensors.torch import save_file

from visionzip_core.families import family_for
from visionzip_core.tokenizer_files import save_pretrained_faithfully
from visionzip_core.training import distributed as dist
from visionzip_core.training.library_warnings import peft_wrapping
from visionzip_core.training.model_spec import ModelSpec
from visionzip_core.training.modeling import build_model
from visionzip_core.training.schema import Settings


def full_model_on_rank0(
    engine, settings: Settings, spec: ModelSpec, stage: int, dtype: torch.dtype, processor
):
    """The trained model with whole weights on rank 0 (``None`` elsewhere). ALL RANKS must call this."""
    if stage < 3 and settings.model.quantization != "none":
        return unquantized_copy(engine.module, settings, spec, dtype, processor) if dist.is_main() else None
    if stage < 3:
        return engine.module if dist.is_main() else None
    state = engine._zero3_consolidated_16bit_state_dict()  # collective; whole tensors on rank 0 only
    if not dist.is_main():
        return None
    check_gathered(engine.module, state)
    return shell_with(engine.module, state)


def shell_with(trained, state: dict[str, torch.Tensor]):
    """A model of ``trained``'s class and config built on the meta device (no memory, nothing read from
    disk) that takes the gathered ``state`` tensors as its own: saved, it writes them in the layout an
    unpartitioned model writes. ``trained`` itself cannot save them: under ZeRO-3 it was loaded into
    partitions, and transformers would rename its tensors for saving by another loading path's rules.

    A peft-wrapped ``trained`` (``lora`` mode) gives a shell wrapped in the same adapter config, so
    the adapter's names, targets and ``modules_to_save`` are the trained ones."""
    peft_config = getattr(trained, "peft_config", None)
    base = trained.get_base_model() if peft_config else trained
    family = family_for(base)
    with torch.device("meta"):
        shell = family.random_model(deepcopy(base.config))
        if peft_config:
            from peft import get_peft_model

            with peft_wrapping():
                shell = get_peft_model(shell, deepcopy(peft_config["default"]))
    shell.load_state_dict(state, strict=False, assign=True)  # names checked by check_gathered
    shell.tie_weights()  # a tied lm_head is absent from `state`: it is the embedding again
    (shell.get_base_model() if peft_config else shell).generation_config = deepcopy(base.generation_config)
    left = [n for n, p in shell.state_dict().items() if p.device.type == "meta"]
    if left:
        raise RuntimeError(f"export: gathered weights left tensors unset: {left[:5]}")
    return shell


def check_gathered(model, state: dict[str, torch.Tensor]) -> None:
    """Refuse gathered weights whose names differ from the model's (a tied ``lm_head`` may be absent:
    it is the embedding)."""
    names = set(model.state_dict())
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    missing = sorted(k for k in names - set(state) if not (tied and "lm_head" in k))
    unexpected = sorted(set(state) - names)
    if missing or unexpected:
        raise RuntimeError(f"export: gathered weights do not match the model: {missing[:5]} {unexpected[:5]}")


def unquantized_copy(trained, settings: Settings, spec: ModelSpec, dtype: torch.dtype, processor):
    """The model in ``dtype`` (no bitsandbytes layers), carrying what ``trained`` trained.

    With ``model.quantization`` only the projector and the LoRA weights train; the base weights
    are reloaded in full precision, so that ``final/`` (merged or not) is an ordinary model in the
    base's dtype rather than a quantized one, which would need bitsandbytes to load.
    """
    plain = settings.model_copy(update={"model": settings.model.model_copy(update={"quantization": "none"})})
    copy = build_model(plain, spec, dtype, processor, for_export=True)
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


def export_final(
    engine, settings: Settings, spec: ModelSpec, processor, stage: int, dtype: torch.dtype
) -> dict[str, Path]:
    """Write ``final/``; returns the written paths by kind (rank 0; empty elsewhere). ALL RANKS must call this."""
    model = full_model_on_rank0(engine, settings, spec, stage, dtype, processor)
    if not dist.is_main():
        dist.barrier()
        return {}
    final = Path(settings.train.output_dir) / "final"
    tmp = final.with_name("final.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    written = write_model(model, settings.train.mode, settings.export.merge_lora, tmp)
    save_pretrained_faithfully(processor, tmp)  # keeps `legacy`: stage 2 tokenises as stage 1 did
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    written = {k: final / p.relative_to(tmp) for k, p in written.items()}
    dist.barrier()
    return written


def write_model(model, mode: str, merge_lora: bool, folder: Path) -> dict[str, Path]:
    """Save ``model`` into ``folder``; returns the written paths by kind."""
    written: dict[str, Path] = {}
    if mode == "lora":
        adapter = folder / "adapter"
        model.save_pretrained(adapter)
        written["adapter"] = adapter
        if merge_lora:
            merged = model.merge_and_unload()
            merged.config.use_cache = True
            merged.save_pretrained(folder)
            written["model"] = folder
        return written
    model.config.use_cache = True
    model.save_pretrained(folder)
    written["model"] = folder
    if mode in ("projector", "pretrain"):
        projector = _projector_state(folder, model)
        save_file(projector, str(folder / "projector.safetensors"), metadata={"format": "pt"})
        written["projector"] = folder / "projector.safetensors"
    return written
