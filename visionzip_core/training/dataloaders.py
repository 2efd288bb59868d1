"""DataLoaders for training (length-grouped, rank-sharded, resumable) and validation (sharded, in order)."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from visionzip_core.data import IGNORE_INDEX, DataCollator, LengthGroupedSampler
from visionzip_core.data.collate import PackingCollator
from visionzip_core.data.sampler import FixedBatchSampler, TokenBudgetBatchSampler
from visionzip_core.training.config_rules import PACKED_LAYOUT


class IndexedDataset(Dataset):
    """Adds each item's dataset index as ``sample_index`` (so the trainer can log what it saw)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int | tuple[int, bool]) -> dict:
        i, padding = i if isinstance(i, tuple) else (i, False)
        item = {**self.dataset[i], "sample_index": i}
        if padding:  # a repeat that only evens out the ranks' batch counts: it must not count
            item["labels"] = torch.full_like(item["labels"], IGNORE_INDEX)
        return item


@dataclass(frozen=True)
class IndexedCollator:
    collator: DataCollator | PackingCollator

    def __call__(self, items: list[dict]) -> dict:
        batch = self.collator(items)
        batch["sample_index"] = [int(item["sample_index"]) for item in items]
        return batch


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGTERM/SIGINT to the trainer: a scheduler signals every process, and a
    worker killed by it would break the step the trainer is finishing before it saves. Workers
    still exit with their parent."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, as torch's own worker-count check reads it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS)
        return os.cpu_count() or 1


def loader_workers(requested: int) -> int:
    """``data.num_workers`` capped at the CPUs available: more workers than CPUs only contend (and
    torch warns about it once per loader)."""
    return min(requested, available_cpus())


def workers_note(requested: int) -> str | None:
    """The one line saying ``data.num_workers`` was capped; None when it was not."""
    workers = loader_workers(requested)
    if workers == requested:
        return None
    cpus = available_cpus()
    return f"data.num_workers: {requested} capped at {workers}, the {cpus} CPU{'s' if cpus != 1 else ''} available"


def make_collator(
    data_settings, pad_token_id: int, attn_implementation: str | None = None
) -> DataCollator | PackingCollator:
    """Packed rows with ``data.packing`` (one row for flash-attention), else one padded row per sample."""
    if data_settings.packing:
        return PackingCollator(
            pad_token_id=pad_token_id,
            max_tokens_per_row=data_settings.row_tokens,
            one_row=PACKED_LAYOUT[attn_implementation] == "one_row",
        )
    return DataCollator(pad_token_id=pad_token_id)


def build_train_loader(
    dataset,
    data_settings,
    batch_size: int,
    rank: int,
    world: int,
    pad_token_id: int,
    attn_implementation: str | None = None,
):
    """``(loader, batch_sampler)``: this rank's micro-batches in a seeded, length-grouped order.

    A micro-batch is ``batch_size`` samples, or as many as fit ``data.batch_tokens``. Position it
    with ``batch_sampler.set_epoch(e); batch_sampler.set_start(n micro-batches)`` before each
    ``iter(loader)``; ``batch_sampler.batches_in_epoch(e)`` counts them.
    """
    if data_settings.batch_tokens is not None:
        batches = TokenBudgetBatchSampler(
            dataset.lengths,
            max_tokens=data_settings.batch_tokens,
            packed=data_settings.packing,
            num_replicas=world,
            rank=rank,
            seed=data_settings.seed,
            group_by_length=data_settings.group_by_length,
        )
    else:
        batches = FixedBatchSampler(
            LengthGroupedSampler(
                dataset.lengths,
                batch_size=batch_size,
                num_replicas=world,
                rank=rank,
                seed=data_settings.seed,
                group_by_modality=True,
                group_by_length=data_settings.group_by_length,
            )
        )
    loader = DataLoader(
        IndexedDataset(dataset),
        batch_sampler=batches,
        collate_fn=IndexedCollator(make_collator(data_settings, pad_token_id, attn_implementation)),
        num_workers=loader_workers(data_settings.num_workers),
        # A private generator: creating an iterator must not draw from the global torch RNG, or a
        # resumed run (which creates it mid-epoch) would see a different random stream.
        generator=torch.Generator().manual_seed(data_settings.seed),
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=ignore_stop_signals,
    )
    return loader, batches


# Float inputs that are not activations and keep their dtype: Qwen2.5-VL's seconds per video frame
# group sets the temporal positions (bf16 would round 1/3 s and every multiple of it).
KEEP_DTYPE = frozenset({"second_per_grid_ts"})
# Counts a forward reads on the host to split its inputs (LLaVA-OneVision's frames per video and
# images per sample): left there, reading them is no device sync.
HOST_COUNTS = frozenset({"video_frames", "batch_num_images"})


def batch_to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Every tensor of ``batch`` copied to ``device``, then its float activations (pixels) cast to
    ``dtype`` THERE: the copy can run asynchronously from the loader's pinned memory
    (``non_blocking``), which a cast on the host would undo (its result is not pinned), and a
    cast is cheaper on the device. Integer tensors and :data:`KEEP_DTYPE` keep their dtype;
    :data:`HOST_COUNTS` stay on the host."""
    out = {}
    for key, value in batch.items():
        if key in HOST_COUNTS:
            out[key] = value
            continue
        value = value.to(device, non_blocking=True)
        if value.is_floating_point() and key not in KEEP_DTYPE:
            value = value.to(dtype)
        out[key] = value
    return out


class ValidationShard(torch.utils.data.Sampler[tuple[int, bool]]):
    """``DistributedSampler(shuffle=False)``'s indices, each with whether it is padding.

    DistributedSampler repeats the first indices so that every rank runs the same number of
    batches (ZeRO-3 forward passes are collective: a rank that stops early hangs the others). A
    repeat still runs, but its labels are ignored, so every sample counts exactly once in the
    validation loss, whatever the number of processes.
    """

    def __init__(self, n: int, rank: int, world: int):
        from torch.utils.data import DistributedSampler

        self.inner = DistributedSampler(
            range(n), num_replicas=world, rank=rank, shuffle=False, drop_last=False
        )
        self.n, self.rank, self.world = n, rank, world

    def __iter__(self):
        for k, i in enumerate(self.inner):
            yield i, self.rank + k * self.world >= self.n  # position in the padded order

    def __len__(self) -> int:
        return len(self.inner)


def build_val_loader(
    dataset,
    data_settings,
    batch_size: int,
    rank: int,
    world: int,
    pad_token_id: int,
    attn_implementation: str | None = None,
):
    return DataLoader(
        IndexedDataset(dataset),
        batch_size=batch_size,
        sampler=ValidationShard(len(dataset), rank, world),
        collate_fn=IndexedCollator(make_collator(data_settings, pad_token_id, attn_implementation)),
        num_workers=loader_workers(data_settings.num_workers),
        generator=torch.Generator().manual_seed(data_settings.seed),
        worker_init_fn=ignore_stop_signals,
    )
