"""Synthetic text for the benchmarks: the LLaVA-665k-like text lengths of the planner and the packing
comparison. A family's synthetic batches, laid out as its data pipeline lays them out, are its
``bench_batch`` hook; their text lengths are :func:`~visionzip_core.families.base.synthetic_text_lengths`."""

from __future__ import annotations

import numpy as np


def mix665k_like_text_lengths(n: int, seed: int = 0, cap: int = 2048 - 576 - 1) -> list[int]:
    """Text tokens (besides the image's) of ``n`` one-image samples, shaped like LLaVA-665k.

    A stand-in, not fitted to the file: half the samples are single-turn and half multi-turn (2 to
    10 turns, as 665k's VQA sets group several questions about one picture); each turn is a
    question of about 15 tokens and an answer that is short (a word or a number, about 4 tokens)
    six times in ten and otherwise a sentence-to-paragraph reply (median 90 tokens); the system
    prompt and role markers add 40. So many samples are short and a tail is long: median about
    170 text tokens, 10th percentile 57, 90th 640, mean 267, capped at ``cap`` (a 2048-token sample with 576
    image tokens). Deterministic in ``seed``.
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        turns = 1 if rng.random() < 0.5 else int(rng.integers(2, 11))
        total = 40.0
        for _ in range(turns):
            total += rng.lognormal(np.log(15), 0.4)
            short = rng.random() < 0.6
            total += rng.lognormal(np.log(4), 0.5) if short else min(rng.lognormal(np.log(90), 0.7), 600)
        out.append(int(min(total, cap)))
    return out
