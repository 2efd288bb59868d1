"""Host syncs per forward, VisionZip against the stock model, for every family on its tiny model.

:func:`forward_sync_counts` is what ``scripts/count_syncs.py`` prints and what the tests bound:
VisionZip may add a small constant to the stock forward's syncs, never a count that grows with
the batch. Each batch holds one image per row, of alternating sizes where the family takes any
size, so per-image and per-row work both show.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from visionzip_core.adapt import remove_visionzip, visionzip, visionzip_processor
from visionzip_core.families import FAMILIES as REGISTERED
from visionzip_core.families import family_for
from visionzip_core.testing.host_syncs import count_cuda_syncs, count_host_syncs
from visionzip_core.testing.tiny import write_tiny

#: The families measured, by name: every registered family, on its tiny model.
FAMILIES = tuple(f.name for f in REGISTERED)
#: VisionZip's settings per family (``ModelFamily.tiny_budget``: fixed counts for a fixed-size
#: tower, ratios for an any-size one).
SETTINGS = {f.name: f.tiny_budget for f in REGISTERED}
# (height, width) of the images, cycled over the rows.
_SIZES = ((112, 168), (84, 56), (140, 112), (56, 84))


@dataclass(frozen=True)
class SyncCount:
    """Host syncs of one forward of ``family`` at ``batch`` rows."""

    family: str
    batch: int
    stock: int
    visionzip: int

    @property
    def added(self) -> int:
        return self.visionzip - self.stock


def _image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def load_tiny(family_name: str, folder: str | Path):
    """``(model, processor)`` of the family's tiny model, built into ``folder``."""
    folder = write_tiny(family_name, Path(folder) / family_name)
    family = family_for(family_name)
    return family.load(str(folder)).eval(), family.load_processor(str(folder))


def image_batch(family_name: str, processor, batch: int) -> dict:
    """``batch`` rows, one image each, padded on the left as for generation."""
    images = [_image(*_SIZES[i % len(_SIZES)], seed=i) for i in range(batch)]
    family = family_for(family_name)
    # The family's own first turn, without a system prompt.
    texts = [family.prompt(processor, f"What is {i}?", 1, system="").lstrip() for i in range(batch)]
    processor.tokenizer.padding_side = "left"
    return dict(processor(text=texts, images=images, padding=True, return_tensors="pt"))


def forward_sync_counts(
    family_name: str,
    batches: tuple[int, ...] = (2, 8),
    folder: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> list[SyncCount]:
    """Syncs of one forward (no grad) of the stock model and of the VisionZip model, per batch.

    On ``device="cpu"`` every host read is counted (:class:`HostSyncCounter`); on a CUDA device,
    the synchronising calls torch's sync debug mode reports (:func:`count_cuda_syncs`), after one
    warm-up forward of each.
    """
    device = torch.device(device)

    def count(model, inputs) -> int:
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        if device.type == "cuda":
            model(**inputs)  # warm-up: lazy initialisation is not the forward's
            return count_cuda_syncs(model, **inputs)[1]
        return count_host_syncs(model, **inputs)[1].total

    with tempfile.TemporaryDirectory() as scratch:
        model, processor = load_tiny(family_name, folder or scratch)
        model.to(device)
        counts = []
        for batch in batches:
            with torch.no_grad():
                stock = count(model, image_batch(family_name, processor, batch))
                visionzip(model, **SETTINGS[family_name])
                adapted = visionzip_processor(processor, model.config)
                ours = count(model, image_batch(family_name, adapted, batch))
                remove_visionzip(model)
                family_for(family_name).adapt_processor(adapted, None, model.config)  # stock counts again
            counts.append(SyncCount(family_name, batch, stock, ours))
        return counts
