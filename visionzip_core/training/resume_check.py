"""The resume check at start-up: this run's settings record, checked against the output folder and
the checkpoint it resumes before anything is removed or loaded (:mod:`.resume` holds the rules)."""

from __future__ import annotations

import json
from pathlib import Path

from visionzip_core.training import checkpointing, resume
from visionzip_core.training import distributed as dist
from visionzip_core.training.deepspeed_config import zero_stage
from visionzip_core.training.model_spec import ModelSpec
from visionzip_core.training.repo_paths import resolve_repo_path
from visionzip_core.training.schema import Settings


def check_resume(
    settings: Settings,
    spec: ModelSpec,
    output_dir: Path,
    resume_from: Path | None,
    precision: str,
    record: dict | None = None,
) -> dict:
    """This run's settings record, checked before anything is removed or loaded: the folder must
    not hold another run, and the checkpoint must have been written with the same settings (except
    train.resume_allow_changes). Called again with the record completed by the data's sample count."""
    t = settings.train
    first = record is None
    if first:
        checkpoints = checkpointing.complete_checkpoints(output_dir)
        if t.resume == "auto" and resume_from is not None:
            # auto resumes from the newest checkpoint that verifies: any newer one was found damaged
            # (and warned about); this run's saves replace it, so it is no other run's output.
            newest = checkpointing.checkpoint_step(resume_from)
            checkpoints = [c for c in checkpoints if checkpointing.checkpoint_step(c) <= newest]
        resume.check_output_dir(output_dir, t.resume, resume_from, checkpoints)
        ds_json = json.loads(resolve_repo_path(settings.deepspeed.config).read_text())
        record = resume.run_record(
            settings,
            feature_layer=spec.feature_layer,
            world_size=dist.world_size(),
            precision=precision,
            zero_stage=zero_stage(ds_json),
        )
    if resume_from is None:
        return record
    saved = resume.read_record(resume_from)
    if saved is None:
        if first:
            dist.print0(
                f"warning: {resume_from} records no settings (an older version wrote it): not checked"
            )
        return record
    only = None if first else ("data.train_samples",)
    for note in resume.check_resume_settings(resume_from, saved, record, t.resume_allow_changes, only):
        dist.print0(note)
    return record
