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


class FixedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """``batch_size`` samples per micro-batch: :class:`LengthGroupedSampler`'s order, cut in batches.

    Positions count micro-batches: ``set_start(n)`` skips this rank's first ``n`` of the epoch.
    """

    def __init__(self, sampler: LengthGroupedSampler):
        self.sampler = sampler
        self.batch_size = sampler.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def set_start(self, batches: int) -> None:
        self.sampler.set_start(batches * self.batch_size)

    def batches_in_epoch(self, epoch: int) -> int:
        """This rank's micro-batches in ``epoch`` (the same every epoch)."""
        return self.sampler.num_samples // self.batch_size

    def __iter__(self):
        order = self.sampler.rank_order()[self.sampler.start :].tolist()
        return iter(order[k : k + self.batch_size] for k in range(0, len(order), self.batch_size))

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size


def token_budget_batches(
    lengths: np.ndarray,
    max_tokens: int,
    packed: bool,
    num_replicas: int,
    seed: int,
    epoch: int,
    group_by_length: bool = True,
    group_by_modality: bool = True,
    megabatch: int = 1024,
) -> list[np.ndarray]:
    """One epoch's micro-batches (all ranks'), each as many samples as fit ``max_tokens``.

    The cost of a micro-batch is its summed lengths when ``packed`` (rows hold samples back to
    back) and ``count x longest`` otherwise (padding counts). Samples are shuffled; with
    ``group_by_length`` they are then sorted longest first inside megabatches of ``megabatch``
    samples, so each micro-batch holds similar lengths; with ``group_by_modality`` image samples
    (length > 0) and text-only ones (length <= 0) are batched apart. The micro-batches are
    shuffled, and the list is cut to a multiple of ``num_replicas`` so that every rank runs the
    same number (up to ``num_replicas - 1`` micro-batches sit out an epoch, different ones each
    epoch). Deterministic in ``(seed, epoch)``.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    size = np.abs(lengths)
    if int(size.max(initial=0)) > max_tokens:
        raise ValueError(f"a sample of {int(size.max())} tokens exceeds the budget of {max_tokens}")
    rng = np.random.default_rng([seed, epoch])
    n = len(lengths)
    groups = (
        [np.flatnonzero(lengths > 0), np.flatnonzero(lengths <= 0)] if group_by_modality else [np.arange(n)]
    )
    batches: list[np.ndarray] = []
    for group in groups:
        group = rng.permutation(group)
        chunks = (
            [group[k : k + megabatch] for k in range(0, len(group), megabatch)]
            if group_by_length
            else [group]
        )
        for chunk in chunks:
            if group_by_length:
                chunk = chunk[np.argsort(-size[chunk], kind="stable")]
            current: list[int] = []
            total = longest = 0
            for i in chunk.tolist():
                new_total, new_longest = total + size[i], max(longest, size[i])
                cost = new_total if packed else new_longest * (len(current) + 1)
                if current and cost > max_tokens:
                    batches.append(np.array(current, dtype=np.int64))
                    current, new_total, new_longest = [], size[i], size[i]
                current.append(i)
                total, longest = new_total, new_longest
            if current:
                batches.append(np.array(current, dtype=np.int64))
    batches = [batches[k] for k in rng.permutation(len(batches))]
    return batches[: len(batches) // num_replicas * num_replicas]


class TokenBudgetBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Per-rank micro-batches of :func:`token_budget_batches`: rank ``r`` takes every
    ``num_replicas``-th one from ``r``. ``set_epoch``/``set_start(n micro-batches)`` as
    :class:`FixedBatchSampler`; the count can differ between epochs (:meth:`batches_in_epoch`)."""

    def __init__(
        self,
        lengths,
        max_tokens: int,
        packed: bool,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        group_by_length: bool = True,
        group_by_modality: bool = True,
    ):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"bad sampler sharding: rank={rank}/{num_replicas}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.max_tokens, self.packed = max_tokens, packed
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.group_by_length, self.group_by_modality = group_by_length, group_by_modality
        self.epoch = self.start = 0
        self._cache: dict[int, list[np.ndarray]] = {}

    def _rank_batches(self, epoch: int) -> list[np.ndarray]:
        if epoch not in self._cache:
            every = token_budget_batches(
                self.lengths,
                self.max_tokens,
                self.packed,
                self.num_replicas,
                self.seed,
                epoch,
                self.group_by_length,
                self.group_by_modality,
            )
            self._cache = {epoch: every[self.rank :: self.num_replicas]}
        return self._cache[epoch]

    def batches_in_epoch(self, epoch: int) -> int:
        return len(self._rank_batches(epoch))

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0
        self.epoch = epoch

    def set_start(self, batches: int) -> None:
        if not 0 <= batches <= self.batches_in_epoch(self.epoch):
            raise ValueError(
                f"set_start({batches}): this rank has {self.batches_in_epoch(self.epoch)} batches"
            )
        self.start = batches

    def __iter__(self):
        return iter(b.tolist() for b in self._rank_batches(self.epoch)[self.start :])

    def __len__(self) -> int:
        return self.batches_in_epoch(self.epoch) - self.start
