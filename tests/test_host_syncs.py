"""Host-device syncs: the counter itself, and VisionZip's forward against the stock forward.

The bound: VisionZip may add at most :data:`MAX_ADDED` syncs to a stock forward, at batch 2 and at
batch 8 alike, so no per-image or per-row host read hides in the compression path.
"""

from __future__ import annotations

import pytest
import torch

from visionzip_core.testing.host_syncs import HostSyncCounter, count_host_syncs
from visionzip_core.testing.sync_counts import FAMILIES, forward_sync_counts

MAX_ADDED = 4


def test_the_counter_sees_each_kind_of_host_read_and_only_inside_its_block():
    x = torch.arange(10.0)
    mask = x > 3
    reads = {
        "item": [lambda: x.sum().item(), lambda: int(x[2]), lambda: bool(x[2] > 1), lambda: float(x[1])],
        "tolist": [lambda: x.tolist()],
        "numpy": [lambda: x.numpy()],
        "boolean index": [
            lambda: x[mask],
            lambda: x.clone().__setitem__(mask, 0.0),
            lambda: x.masked_select(mask),
        ],
        "nonzero": [lambda: mask.nonzero()],
        "unique": [lambda: torch.unique(x), lambda: torch.unique_consecutive(x)],
        "repeat_interleave": [lambda: torch.repeat_interleave(torch.tensor([1, 2]), torch.tensor([2, 3]))],
    }
    for kind, calls in reads.items():
        for call in calls:
            _, counter = count_host_syncs(call)
            assert dict(counter.kinds) == {kind: 1}, (kind, dict(counter.kinds))
    # Device-side work of known sizes is not a sync.
    free = [
        lambda: (x * 2).sum(),
        lambda: x[torch.tensor([1, 2])],
        lambda: x.topk(3).indices.sort(),
        lambda: torch.repeat_interleave(torch.tensor([1, 2]), torch.tensor([2, 3]), output_size=5),
        lambda: torch.where(mask, x, 0.0),
    ]
    for call in free:
        assert count_host_syncs(call)[1].total == 0
    # Nothing stays wrapped after the block.
    original = torch.Tensor.tolist
    with HostSyncCounter() as counter:
        assert torch.Tensor.tolist is not original
    assert torch.Tensor.tolist is original
    x.tolist()
    assert counter.total == 0


@pytest.mark.parametrize("family_name", FAMILIES)
def test_visionzip_adds_a_constant_number_of_syncs_to_the_stock_forward(family_name, tmp_path):
    counts = forward_sync_counts(family_name, (2, 8), tmp_path)
    for count in counts:
        assert count.added <= MAX_ADDED, count
