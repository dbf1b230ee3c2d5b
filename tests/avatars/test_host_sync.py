"""Host-sync counters: 'not measurable' without CUDA, never a fake 0."""

from __future__ import annotations

import json

import pytest
import torch

from avatars.host_sync import count_host_reads, count_host_syncs


def test_cpu_sync_count_is_not_measurable():
    result, syncs = count_host_syncs(lambda: torch.ones(3).sum().item(), "cpu")
    assert result == 3.0
    assert not syncs.measurable and syncs.count is None
    assert str(syncs).startswith("not measurable") and syncs.to_json().startswith("not measurable")
    json.dumps(syncs.to_json())


def test_host_reads_are_listed_on_any_device():
    x = torch.arange(6.0)
    _, reads = count_host_reads(lambda: (x.sum().item(), torch.nonzero(x), bool(x[1] > 0)))
    assert reads == ["_local_scalar_dense", "nonzero", "_local_scalar_dense"]
    _, none = count_host_reads(lambda: (x * 2 + 1).sum())
    assert none == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_syncs_are_counted():
    x = torch.arange(6.0, device="cuda")
    _, syncs = count_host_syncs(lambda: [x.sum().item() for _ in range(3)], "cuda")
    assert syncs.count == 3
    _, none = count_host_syncs(lambda: x * 2, "cuda")
    assert none.count == 0


def test_the_debug_modes_prototype_notice_is_not_a_sync():
    """torch warns once that the sync debug mode is a prototype; on the H200 that notice was counted
    as a host sync of the first measured training step."""
    from avatars.host_sync import is_sync_warning

    assert not is_sync_warning("Synchronization debug mode is a prototype feature and does not yet detect all "
                               "synchronizing operations (Triggered internally at Module.cpp:1003.)")
    assert is_sync_warning("called a synchronizing CUDA operation")
