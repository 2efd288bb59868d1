"""Observation points of the training loop, for tests to inject; the recipe runs with the no-op default.

Tests need to see which samples each step drew, to make a step's loss NaN and to slow steps down
so that a run can be killed mid-way. None of that belongs in a user's config, so it is not a
config section: :func:`visionzip_core.training.recipe.main` takes ``hooks=``, an object with these
methods (``tests/hooked_finetune.py`` builds one from its command line).
"""

from __future__ import annotations

from pathlib import Path

import torch


class TrainHooks:
    """No-ops. Subclass and pass to ``main(argv, hooks=...)``."""

    def on_start(self, output_dir: Path, rank: int, step: int) -> None:
        """Before the first step of this process (``step`` = steps already trained, on resume)."""

    def on_micro_batch(self, step: int, sample_indices: list[int]) -> None:
        """Before each micro-batch of optimizer step ``step`` (1-based)."""

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """The micro-batch loss that backward uses."""
        return loss

    def after_step(self, step: int) -> None:
        """After optimizer step ``step``, before logging and checkpointing."""

    def before_scoring(self, final: Path) -> None:
        """After the export ``final`` is loaded for ``eval.generate_accuracy``, before it is scored."""
