"""SyncCounter sees every kind of scalar read it documents, and nothing else."""

import torch

from fastcascade.diagnostics import SyncCounter


def test_each_documented_sync_is_counted_once():
    a = torch.arange(6.0)
    reads = {
        "item": lambda: a.sum().item(),
        "nonzero": lambda: torch.nonzero(a),
        "masked_select": lambda: torch.masked_select(a, a > 2),
        "bool_index": lambda: a[a > 2],
        "unique": lambda: torch.unique(a),
        "equal": lambda: torch.equal(a, a),
    }
    for name, read in reads.items():
        with SyncCounter() as counter:
            read()
        assert dict(counter.by_op) == {name: 1}, (name, counter.by_op)


def test_device_side_work_is_not_counted():
    a = torch.rand(4, 5, 6)
    with SyncCounter() as counter:
        b = torch.where(a > 0.5, a, 0).cumsum(0).amax(dim=1)
        torch.argmax(b)
        a.clone().scatter_reduce_(0, torch.zeros_like(a, dtype=torch.long), a, "amin")
    assert counter.syncs == 0 and counter.transfers == []
