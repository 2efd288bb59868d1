"""Training on VisionZip-compressed visual tokens; the recipe is ``recipe`` (``main``), run by
``train/finetune.py`` or the ``visionzip-train`` command.

Modules: ``settings`` (typed YAML config, ``load_config``, ``ConfigError``), ``distributed``
(launcher-agnostic process group, ``print0``), ``modeling`` (build/assemble, freeze, LoRA,
param groups), ``optimization`` (AdamW, warmup + cosine), ``deepspeed_config`` (fill "auto"),
``dataloaders``, ``checkpointing`` (atomic save, exact resume), ``resume`` (what a resume may
change, which folders a run may use), ``output_lock`` (one writer per folder), ``metrics``
(metrics.jsonl, progress bar), ``tracking`` (wandb), ``export`` (``final/``), ``resume_check`` (the
start-up resume check), ``nonfinite`` (the NaN/inf policy), ``export_scoring`` (``eval.generate_accuracy``).
"""
