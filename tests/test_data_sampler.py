"""LengthGroupedSampler (determinism, sharding, resume, grouping by real counts) and the collator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from visionzip_core.data import DataCollator, LengthGroupedSampler


def lengths_mixed(n=203, seed=0):
    rng = np.random.default_rng(seed)
    lens = rng.integers(20, 400, size=n)
    text_only = rng.random(n) < 0.2
    return np.where(text_only, -lens, lens).tolist()


def test_deterministic_and_epoch_dependent():
    lens = lengths_mixed()
    a = list(LengthGroupedSampler(lens, batch_size=4, seed=1))
    b = list(LengthGroupedSampler(lens, batch_size=4, seed=1))
    c = list(LengthGroupedSampler(lens, batch_size=4, seed=2))
    s = LengthGroupedSampler(lens, batch_size=4, seed=1)
    s.set_epoch(1)
    assert a == b and a != c and list(s) != a
    assert sorted(set(a)) == list(range(len(lens)))  # every sample, once (plus wrap padding)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_equal_disjoint_and_cover(world):
    lens = lengths_mixed()
    shards = [list(LengthGroupedSampler(lens, 4, num_replicas=world, rank=r, seed=5)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1
    total = sum(len(s) for s in shards)
    assert total % (4 * world) == 0 and total - len(lens) < 4 * world
    flat = [i for s in shards for i in s]
    assert set(flat) == set(range(len(lens)))
    assert len(flat) - len(set(flat)) == total - len(lens)  # only the wrap padding repeats


def test_resume_sees_exactly_the_rest():
    lens = lengths_mixed()
    for rank in (0, 1):
        full = LengthGroupedSampler(lens, 4, num_replicas=2, rank=rank, seed=7)
        full.set_epoch(3)
        order = list(full)
        resumed = LengthGroupedSampler(lens, 4, num_replicas=2, rank=rank, seed=7)
        resumed.set_epoch(3)
        resumed.set_start(40)
        assert list(resumed) == order[40:] and len(resumed) == len(order) - 40
        resumed.set_epoch(4)  # a new epoch starts from its beginning
        full.set_epoch(4)
        assert list(resumed) == list(full)


def test_batches_are_single_modality_and_grouped_by_length():
    lens = np.array(lengths_mixed(n=800))
    world, bs = 2, 4
    shards = [list(LengthGroupedSampler(lens, bs, num_replicas=world, rank=r, seed=0)) for r in range(world)]
    global_batches = [
        np.concatenate([shards[r][k : k + bs] for r in range(world)]) for k in range(0, len(shards[0]), bs)
    ]
    mixed = [b for b in global_batches if len({bool(x) for x in lens[b] > 0}) > 1]
    assert len(mixed) <= 1  # only the remainders batch may mix modalities
    spread = np.median([np.ptp(np.abs(lens[b])) for b in global_batches])
    rand = np.random.default_rng(0).permutation(len(lens))[: len(lens) // 8 * 8].reshape(-1, 8)
    random_spread = np.median([np.ptp(np.abs(lens[b])) for b in rand])
    assert spread < random_spread / 4


def test_grouping_uses_real_compressed_counts():
    """Same text, different K: 64-token images group apart from 576-token ones."""
    short = [64 + 20] * 32  # compressed image samples
    long = [576 + 20] * 32  # stock image samples
    lens = short + long
    order = list(LengthGroupedSampler(lens, batch_size=8, seed=0, megabatch_mult=8))
    batches = [order[k : k + 8] for k in range(0, len(order), 8)]
    assert all(len({lens[i] for i in b}) == 1 for b in batches)


def test_ungrouped_and_sequential():
    lens = lengths_mixed(n=10)
    seq = LengthGroupedSampler(lens, 3, group_by_length=False, shuffle=False)
    assert list(seq) == list(range(10)) + [0, 1]
    rnd = list(LengthGroupedSampler(lens, 3, group_by_length=False, seed=1))
    assert rnd[:10] != list(range(10)) and sorted(rnd[:10]) == list(range(10))


def test_collator_pads_right_and_stacks_images():
    items = [
        {"input_ids": torch.tensor([1, 5, 5, 7]), "labels": torch.tensor([-100, -100, -100, 7]),
         "pixel_values": torch.ones(1, 3, 4, 4)},
        {"input_ids": torch.tensor([1, 8]), "labels": torch.tensor([-100, 8])},
        {"input_ids": torch.tensor([1, 5, 9]), "labels": torch.tensor([-100, -100, 9]),
         "pixel_values": torch.full((2, 3, 4, 4), 2.0)},
    ]  # fmt: skip
    out = DataCollator(pad_token_id=3)(items)
    assert out["input_ids"].tolist() == [[1, 5, 5, 7], [1, 8, 3, 3], [1, 5, 9, 3]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]
    assert out["labels"].tolist() == [[-100, -100, -100, 7], [-100, 8, -100, -100], [-100, -100, 9, -100]]
    assert out["pixel_values"].shape == (3, 3, 4, 4) and out["pixel_values"][1:].eq(2).all()
    text_only = DataCollator(pad_token_id=0, pad_to_multiple_of=8)(items[1:2])
    assert "pixel_values" not in text_only and text_only["input_ids"].shape == (1, 8)


def test_validation_shards_count_every_sample_once():
    """DistributedSampler's padding repeats are marked, so each sample counts once on some rank."""
    from visionzip_core.training.dataloaders import ValidationShard

    for n, world in ((7, 2), (10, 3), (4, 4), (3, 4), (1, 2)):
        shards = [list(ValidationShard(n, rank, world)) for rank in range(world)]
        assert len({len(s) for s in shards}) == 1  # the same number of batches on every rank
        counted = sorted(i for s in shards for i, padding in s if not padding)
        assert counted == list(range(n)), (n, world, shards)
