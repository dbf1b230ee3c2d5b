"""Feeding the GPU: the next batch is staged (copied + dequantised) before the current one is
handed out; on CUDA through pinned memory and a side stream."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import torch

from avatars.data import LoaderConfig, ResumableSampler, ShardDataset, collate, make_loader
from avatars.data.device_feed import DeviceFeeder, one_ahead
from avatars.data.shard_dataset import expand_batch
from shards.writer import shard_paths

CFG = LoaderConfig(resolution=32, batch_size=4, num_workers=2, seed=3)


def test_one_ahead_stages_the_next_item_before_handing_out_the_current_one():
    events = []

    def source():
        try:
            for i in range(4):
                events.append(f"made {i}")
                yield i
        finally:
            events.append("source closed")

    out = []
    for x in one_ahead(source(), lambda i: events.append(f"staged {i}") or i * 10,
                       lambda s: events.append(f"ready {s // 10}") or s):
        out.append(x)
        events.append(f"used {x // 10}")
    assert out == [0, 10, 20, 30]
    assert events.index("staged 1") < events.index("ready 0") < events.index("used 0") < events.index("staged 2")
    assert events[-3:] == ["source closed", "ready 3", "used 3"]
    # a consumer that stops early closes the source (the loader's thread pool shuts down)
    events.clear()
    it = one_ahead(source(), lambda i: i, lambda s: s)
    next(it)
    it.close()
    assert events[-1] == "source closed"
    assert list(one_ahead(iter([]), lambda i: i, lambda s: s)) == []


def test_feeder_without_cuda_dequantises_in_place_of_the_stream(loader_shards):
    ds = ShardDataset(shard_paths(loader_shards, "000", "train"), CFG)
    compact = collate([ds.compact(i) for i in range(4)])
    feeder = DeviceFeeder(torch.device("cpu"), expand_batch)
    assert feeder.stream is None
    batch = feeder.ready(feeder.stage(compact))
    expected = expand_batch(collate([ds.compact(i) for i in range(4)]))
    assert batch["__key__"] == expected["__key__"]
    for key in ("image", "alpha", "mask", "depth", "normals", "canonical", "expression"):
        assert torch.equal(batch[key], expected[key]), key


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_loader_gives_the_cpu_loader_batches(loader_shards):
    ds = ShardDataset(shard_paths(loader_shards, "000", "train") + shard_paths(loader_shards, "001", "train"), CFG)
    cpu = list(make_loader(ds, ResumableSampler(len(ds), seed=1), CFG))
    loader = make_loader(ds, ResumableSampler(len(ds), seed=1), CFG, device="cuda")
    gpu = []
    for batch in loader:
        torch.cuda._sleep(10_000_000)  # a busy training stream: the side-stream copy must still be waited for
        gpu.append({k: (v.cpu() if torch.is_tensor(v) else v) for k, v in batch.items()})
        assert batch["image"].is_cuda
    assert len(gpu) == len(cpu) > 1
    for a, b in zip(cpu, gpu):
        assert a["__key__"] == b["__key__"]
        for key in ("image", "alpha", "mask", "depth", "normals", "canonical", "expression"):
            torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-6, msg=key)
    pinned = collate([ds.compact(i) for i in range(2)], pin_memory=True)
    assert all(v.is_pinned() for k, v in pinned.items() if k != "__key__")
    it = iter(make_loader(ds, ResumableSampler(len(ds), seed=1), replace(CFG, num_workers=2), device="cuda"))
    next(it)
    it.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("shard-loader")]
