"""``eval.generate_accuracy``: the exported model scored on ``data.val`` after training, as one
report line. A failure while scoring keeps the trained run and its export (exit :data:`EXIT_NOT_SCORED`)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from visionzip_core.adapt import load_visionzip_model, load_visionzip_processor
from visionzip_core.evaluation import load_eval_samples, samples_for, score_generation
from visionzip_core.families import family_for
from visionzip_core.training import distributed as dist
from visionzip_core.training.hooks import TrainHooks
from visionzip_core.training.settings import Settings

EXIT_NOT_SCORED = 4  # eval.generate_accuracy was asked for and failed; the run and its export are kept


class ScoringFailed(RuntimeError):
    """``eval.generate_accuracy`` was asked for and could not score the export (the run is kept)."""


def score_export(
    settings: Settings, paths: dict[str, Path], device: torch.device, hooks: TrainHooks | None = None
) -> str | None:
    """``eval.generate_accuracy``: the exported model's exact-match accuracy of generated first replies on
    ``data.val`` (rank 0), as one report line, prompted the way the model's family is trained.

    Nothing to score (no full export, no val sample with an image: warned about before the run)
    is a ``not scored: ...`` line. Runs after export, so a failure while scoring keeps the trained
    run and its export: it raises :class:`ScoringFailed` with the one-line reason (exit
    :data:`EXIT_NOT_SCORED`)."""
    e = settings.eval
    if not e.generate_accuracy or not dist.is_main():
        return None
    if "model" not in paths:
        return "not scored: no full model was exported"
    hooks = hooks or TrainHooks()
    try:
        samples = []
        for source in settings.data.val:  # paths made absolute by the config loader
            samples += load_eval_samples(source.path, source.image_folder or ".")
        model = load_visionzip_model(str(paths["model"])).to(device).eval()
        samples, _ = samples_for(family_for(model), samples)  # videos, where the family takes none
        samples = samples[: e.limit] if e.limit else samples
        if not samples:
            return "not scored: data.val has no sample with an image"
        processor = load_visionzip_processor(str(paths["model"]))
        hooks.before_scoring(paths["model"])
        started = time.perf_counter()
        score = score_generation(model, processor, samples, e.max_new_tokens)
    except Exception as err:  # the run is trained and exported; scoring it must not lose that
        raise ScoringFailed(f"{type(err).__name__}: {' '.join(str(err).split())[:200]}") from err
    return (
        f"{score.accuracy:.3f} ({score.correct}/{score.samples} first replies exact, "
        f"{time.perf_counter() - started:.1f} s)"
    )
