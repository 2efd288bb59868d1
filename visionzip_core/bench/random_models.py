"""Random-weight models of the benchmark sizes (``ModelFamily.bench_sizes``), built directly on the
target device (``"meta"``: the structure only), and their processors, each family's by its hooks
(``bench_config``, ``random_model``, ``bench_processor``)."""

from __future__ import annotations

import functools

import torch

from visionzip_core.families import ModelFamily, family_for
from visionzip_core.testing.tokenizers import tiny_tokenizer


@functools.cache
def _config_tokenizer(kind: str):
    """The tiny tokenizer of ``kind`` whose special ids a benchmark config takes (read only; built
    once per process: training its BPE takes a moment)."""
    return tiny_tokenizer(kind)


def bench_config(size, family: str | ModelFamily):
    """The model config of benchmark ``size`` for ``family`` (its ``bench_config`` hook), with the
    special ids of the family's tiny tokenizer where the family has no fixed ones."""
    fam = family_for(family) if isinstance(family, str) else family
    return fam.bench_config(size, _config_tokenizer(fam.tiny_tokenizer))


def build_random_model(size, device: str | torch.device = "cpu", seed: int = 0, *, family: str):
    """A model of ``family`` with ``size``'s shapes and random weights, built directly on ``device``.

    On a GPU the weights are allocated and initialised there (a 7B model builds in seconds);
    ``device="meta"`` builds the structure only, for checks without memory. It generates with the
    pad, bos and eos ids of its config's text part.
    """
    fam = family_for(family)
    config = bench_config(size, fam)
    torch.manual_seed(seed)
    with torch.device(device):
        model = fam.random_model(config, dtype=getattr(torch, size.dtype))
    text = config.text_config
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(model.generation_config, key, getattr(text, key))
    return model


def random_model_processor(size, model):
    """The processor of a random benchmark model, matched to its token ids (the family's
    ``bench_processor`` over a fresh tiny tokenizer of the family)."""
    family = family_for(model)
    return family.bench_processor(model, size, tiny_tokenizer(family.tiny_tokenizer))
