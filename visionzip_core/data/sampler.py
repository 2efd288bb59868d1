"""A seeded, resumable, rank-sharded sampler that batches samples of similar real token counts."""

from __future__ import annotations

import numpy as np
import torch


def grouped_order(
    lengths: np.ndarray,
    global_batch: int,
    seed: int,
    epoch: int,
    group_by_length: bool = True,
    group_by_modality: bool = True,
    shuffle: bool = True,
    megabatch_mult: int = 16,
) -> np.ndarray:
    """One epoch's order of all indices, as consecutive global batches of ``global_batch``.

    With ``group_by_modality``, image samples (length > 0) and text-only samples (length < 0) are
    batched apart, as LLaVA's ``group_by_modality_length`` does, except for one last mixed batch of
    the remainders. With ``group_by_length``, each modality is shuffled, cut into megabatches of
    ``megabatch_mult`` global batches, sorted by ``|length|`` inside each and cut into global
    batches; the batches are then shuffled. The result is padded by wrapping to a multiple of
    ``global_batch`` so that every rank gets the same count. Deterministic in ``(seed, epoch)``.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    rng = np.random.default_rng([seed, epoch])
    if not shuffle and not group_by_length:
        order = np.arange(n)
    elif not group_by_length:
        order = rng.permutation(n)
    else:
        groups = (
            [np.flatnonzero(lengths > 0), np.flatnonzero(lengths <= 0)]
            if group_by_modality
            else [np.arange(n)]
        )
        batches, remainders = [], []
        mega = global_batch * megabatch_mult
        for group in groups:
            if len(group) == 0:
                continue
            group = rng.permutation(group)
            for start in range(0, len(group), mega):
                chunk = group[start : start + mega]
                # stable sort, longest first, so the order depends only on (seed, epoch)
                chunk = chunk[np.argsort(-np.abs(lengths[chunk]), kind="stable")]
                full = len(chunk) // global_batch * global_batch
                batches += [chunk[k : k + global_batch] for k in range(0, full, global_batch)]
                remainders.append(chunk[full:])
        batches = [batches[k] for k in rng.permutation(len(batches))]
        rest = np.concatenate(remainders) if remainders else np.empty(0, dtype=np.int64)
        rest = rest[np.argsort(-np.abs(lengths[rest]), kind="stable")]
        batches += [rest[k : k + global_batch] for k in range(0, len(rest), global_batch)]
        order = np.concatenate(batches) if batches else np.empty(0, dtype=np.int64)
    padded = -(-n // global_batch) * global_batch
    if padded > n:
        order = np.concatenate([order, np.resize(order, padded - n)])
    return order.astype(np.int64)


class LengthGroupedSampler(torch.utils.data.Sampler[int]):
    """Per-rank indices for a ``DataLoader(batch_size=batch_size)``.

    Every global batch (``batch_size * num_replicas`` consecutive samples of the epoch order) holds
    samples of similar token count and, with ``group_by_modality``, one modality; rank ``r`` takes
    slice ``r`` of each global batch, so all ranks step through the same global batch together and
    get equal counts (the epoch is padded by repeating its first samples, never more than one
    global batch minus one).

    Resume: ``set_epoch(e)`` then ``set_start(n)`` skips the first ``n`` samples of this rank's
    order for epoch ``e``, so a resumed run sees exactly what an unbroken run would have.
    ``set_epoch`` with a new epoch clears the start. ``len()`` counts what iteration yields.
    """

    def __init__(
        self,
        lengths,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        group_by_modality: bool = True,
        group_by_length: bool = True,
        shuffle: bool = True,
        megabatch_mult: int = 16,
    ):
        if batch_size < 1 or num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"bad sampler sharding: batch_size={batch_size}, rank={rank}/{num_replicas}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if len(self.lengths) == 0:
            raise ValueError("LengthGroupedSampler needs at least one sample")
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.group_by_modality = group_by_modality
        self.group_by_length = group_by_length
        self.shuffle = shuffle
        self.megabatch_mult = megabatch_mult
        self.epoch = 0
        self.start = 0

    @property
    def num_samples(self) -> int:
        """Samples this rank sees in a whole epoch (before ``set_start``)."""
        global_batch = self.batch_size * self.num_replicas
        return -(-len(self.lengths) // global_batch) * self.batch_size

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0
        self.epoch = epoch

    def set_start(self, start: int) -> None:
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"set_start({start}): this rank has {self.num_samples} samples per epoch")
        self.start = start

    def rank_order(self) -> np.ndarray:
        """This rank's whole-epoch order, ``[num_samples]``."""
        order = grouped_order(
            self.lengths,
            self.batch_size * self.num_replicas,
            self.seed,
            self.epoch,
            self.group_by_length,
            self.group_by_modality,
            self.shuffle,
            self.megabatch_mult,
        )
        per_batch = order.reshape(-1, self.num_replicas, self.batch_size)
        return per_batch[:, self.rank, :].reshape(-1)

    def __iter__(self):
        return iter(self.rank_order()[self.start :].tolist())

    def __len__(self) -> int:
        return self.num_samples - self.start
