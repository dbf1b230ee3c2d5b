from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from avatars.data import LoaderConfig, ResumableSampler, ShardDataset, ShardError, make_loader
from shards.writer import shard_paths

CFG = LoaderConfig(resolution=32, batch_size=4, num_workers=0, seed=3)


def _dataset(shards: Path, config: LoaderConfig = CFG, split: str = "train") -> ShardDataset:
    return ShardDataset(shard_paths(shards, "000", split) + shard_paths(shards, "001", split), config)


def test_batch_follows_the_contract(loader_shards):
    ds = _dataset(loader_shards)
    batch = next(iter(make_loader(ds, ResumableSampler(len(ds), seed=0), CFG)))
    b, r = CFG.batch_size, CFG.resolution
    shapes = {"image": (b, 3, r, r), "alpha": (b, 1, r, r), "mask": (b, 1, r, r), "depth": (b, 1, r, r),
              "normals": (b, 3, r, r), "canonical": (b, 5, r, r), "expression": (b, 10)}
    for k, shape in shapes.items():
        assert batch[k].shape == shape and batch[k].dtype == torch.float32, k
    assert len(batch["__key__"]) == b and all(k.startswith(("000/", "001/")) for k in batch["__key__"])
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert set(batch["mask"].unique().tolist()) <= {0.0, 1.0}
    outside = batch["mask"] == 0
    for k in ("depth", "normals", "canonical"):
        assert (batch[k] * outside).abs().max() == 0, k
    inside = batch["mask"][:, 0] > 0
    n = batch["normals"].permute(0, 2, 3, 1)[inside]
    assert torch.allclose(n.norm(dim=-1), torch.ones(len(n)), atol=1e-3)


def test_augmentation_is_identical_for_target_and_buffers(loader_shards):
    ds = _dataset(loader_shards, replace(CFG, resolution=48))
    plain = _dataset(loader_shards, replace(CFG, resolution=48, augment=False))
    ious, plain_ious = [], []
    for i in range(len(ds)):
        for d, acc in ((ds, ious), (plain, plain_ious)):
            s = d[i]
            a, m = s["alpha"][0] > 0.5, s["mask"][0] > 0
            acc.append(((a & m).sum() / (a | m).sum()).item())
    # The fitted mesh silhouette matches the true alpha as well after cropping as before.
    assert np.mean(ious) > 0.85 and abs(np.mean(ious) - np.mean(plain_ious)) < 0.03
    # Crops really happen: some augmented sample differs from the uncropped one.
    assert any(not torch.equal(ds[i]["mask"], plain[i]["mask"]) for i in range(len(ds)))


def test_no_augmentation_is_the_resized_image(loader_shards):
    ds = _dataset(loader_shards, replace(CFG, augment=False, resolution=48))
    s, dec = ds[0], ds.decoded(0)
    assert torch.allclose((s["image"] + 1) / 2, torch.from_numpy(dec.rgb), atol=1e-6)
    assert torch.equal(s["canonical"], torch.from_numpy(dec.canonical))


def test_min_crop_one_trains_on_the_evaluation_window(loader_shards):
    # TrainOptions.min_crop=1: every training sample is the whole face window, as the evaluation renders it.
    whole = _dataset(loader_shards, replace(CFG, resolution=48, min_crop=1.0))
    plain = _dataset(loader_shards, replace(CFG, resolution=48, augment=False))
    for i in range(len(whole)):
        a, b = whole[i], plain[i]
        assert all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k])), i
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="min_crop"):
            LoaderConfig(min_crop=bad)


def test_samples_are_deterministic_across_workers(loader_shards):
    ds = _dataset(loader_shards)
    runs = []
    for workers in (0, 2):
        cfg = replace(CFG, num_workers=workers)
        sampler = ResumableSampler(len(ds), seed=5)
        runs.append([b for b in make_loader(ds, sampler, cfg)])
    assert [b["__key__"] for b in runs[0]] == [b["__key__"] for b in runs[1]]
    for b0, b1 in zip(*runs):
        assert torch.equal(b0["image"], b1["image"]) and torch.equal(b0["canonical"], b1["canonical"])


def test_sampler_shuffles_per_epoch_and_resumes_exactly():
    s = ResumableSampler(50, seed=1)
    e0 = list(s)
    assert sorted(e0) == list(range(50)) and e0 != list(range(50))
    s.set_epoch(1)
    e1 = list(s)
    assert e1 != e0 and sorted(e1) == list(range(50))
    s.set_epoch(1, start=17)
    assert list(s) == e1[17:] and len(s) == 33
    ranks = [list(ResumableSampler(50, seed=1, rank=r, num_replicas=3)) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1 and set().union(*map(set, ranks)) == set(range(50))
    assert list(ResumableSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


def _copy_shards(src: Path, dst: Path) -> list[Path]:
    out = []
    for p in shard_paths(src, "000", "train"):
        out.append(dst / p.name)
        shutil.copy(p, out[-1])
    return out


@pytest.mark.parametrize("damage", ["truncate", "garbage", "drop_member", "missing"])
def test_corrupt_shard_is_named(loader_shards, tmp_path, damage):
    paths = _copy_shards(loader_shards, tmp_path)
    victim = paths[1]
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        victim.write_bytes(b"\x00garbage" * 300)
    elif damage == "drop_member":
        import tarfile

        with tarfile.open(fileobj=__import__("io").BytesIO(data)) as src, tarfile.open(victim, "w") as dst:
            for m in src.getmembers():
                if not m.name.endswith(".geom.npy.zst"):
                    dst.addfile(m, src.extractfile(m))
    else:
        victim.unlink()
    with pytest.raises(ShardError) as err:
        ShardDataset(paths, CFG)
    assert str(victim) in str(err.value)


def test_corrupt_payload_is_named(loader_shards, tmp_path):
    paths = _copy_shards(loader_shards, tmp_path)
    ds = ShardDataset(paths, CFG)
    shard, key, exts = ds.index[0]
    off, size = exts["geom.npy.zst"]
    with open(paths[shard], "r+b") as f:
        f.seek(off)
        f.write(b"\xff" * min(size, 64))
    with pytest.raises(ShardError, match=f"{paths[shard]}.*corrupt sample {key}"):
        ds[0]


def test_dequantize_matches_the_reference_formula_for_every_input_type():
    from shards.codec import U16, dequantize

    gen = torch.Generator().manual_seed(0)
    geom = torch.randint(0, U16 + 1, (2, 6, 5, 7), generator=gen, dtype=torch.int32)
    geom[:, :, 0, 0] = 0  # no surface
    geom[0, 1:, 1, 1] = U16  # the top of the 16-bit range (negative as int16)
    nrm = torch.randint(0, 256, (2, 3, 5, 7), generator=gen, dtype=torch.uint8)
    depth_range = torch.tensor([[1.0, 3.0], [0.5, 0.75]])
    m = (geom[:, :1] > 0).float()
    lo, hi = depth_range[:, :1, None, None], depth_range[:, 1:, None, None]
    n = nrm.double() / 255 * 2 - 1
    want = (m, (lo + (geom[:, :1] - 1) / (U16 - 1) * (hi - lo)) * m, n / n.norm(dim=1, keepdim=True) * m,
            (geom[:, 1:] / U16 * 2 - 1) * m)
    # int32 (the path of GPUs and other backends) and the int16 bit pattern (CPU's one-pass uint16 copy).
    for g in (geom, geom.to(torch.int16), geom.to(torch.int16).view(torch.uint16)):
        got = dequantize(g, nrm, depth_range)
        for a, b, name in zip(got, want, ("mask", "depth", "normals", "canonical")):
            assert a.dtype == torch.float32 and a.shape == b.shape, name
            torch.testing.assert_close(a.double(), b.double(), atol=1e-6, rtol=1e-6, msg=name)


def test_threaded_loader_counts_batches_and_stops_early(loader_shards):
    import threading

    ds = _dataset(loader_shards)
    cfg = replace(CFG, num_workers=2)
    full = make_loader(ds, ResumableSampler(len(ds), seed=0), cfg, drop_last=False)
    assert len(full) == -(-len(ds) // cfg.batch_size) and len(list(full)) == len(full)
    dropped = make_loader(ds, ResumableSampler(len(ds), seed=0), cfg, drop_last=True)
    assert len(dropped) == len(ds) // cfg.batch_size == len(list(dropped))
    it = iter(full)
    next(it)
    it.close()  # the consumer stops mid-epoch: no decoding thread is left behind
    assert not [t for t in threading.enumerate() if t.name.startswith("shard-loader")]


def test_error_in_a_loader_thread_names_the_shard(loader_shards, tmp_path):
    paths = _copy_shards(loader_shards, tmp_path)
    ds = ShardDataset(paths, replace(CFG, num_workers=2))
    shard, key, exts = ds.index[-1]
    off, size = exts["nrm.npy.zst"]
    with open(paths[shard], "r+b") as f:
        f.seek(off)
        f.write(b"\x00" * min(size, 64))
    with pytest.raises(ShardError, match=f"{paths[shard]}.*corrupt sample {key}"):
        list(make_loader(ds, ResumableSampler(len(ds), seed=0), ds.config, drop_last=False))


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


@pytest.mark.parametrize("member", ["expr.npy", "json", "geom.npy.zst"])
def test_same_size_corruption_fails_when_the_shard_is_opened(loader_shards, tmp_path, member):
    """One flipped byte anywhere (even in the uncompressed expression code) is caught by the
    manifest's sha256 before anything is trained on, naming the shard."""
    shutil.copytree(loader_shards / "000", tmp_path / "000")
    paths = shard_paths(tmp_path, "000", "train")
    ShardDataset(paths, CFG)  # intact: opens
    _, _, exts = ShardDataset(paths, CFG, verify=False).index[0]
    off, size = exts[member]
    _flip_byte(paths[0], off + size // 2)
    with pytest.raises(ShardError, match=f"{paths[0]}.*sha256.*preprocess"):
        ShardDataset(paths, CFG)


def test_zstd_checksums_catch_a_flipped_bit_without_a_manifest(loader_shards, tmp_path):
    """Shards copied out of their folder (no manifest) still fail loudly on a flipped bit."""
    paths = _copy_shards(loader_shards, tmp_path)
    ds = ShardDataset(paths, CFG)
    shard, key, exts = ds.index[0]
    off, size = exts["rgb.npy.zst"]
    _flip_byte(paths[shard], off + size // 2)
    with pytest.raises(ShardError, match=f"corrupt sample {key}.*checksum"):
        ds[0]


def _portrait_sample(height: int = 96, width: int = 64, head: tuple[int, int] = (55, 30), radius: int = 12):
    """A non-square (portrait) raw sample whose rasterized head sits low and left of the centre."""
    from shards.codec import RawSample

    rows, cols = np.mgrid[0:height, 0:width]
    disc = (rows - head[0]) ** 2 + (cols - head[1]) ** 2 <= radius**2
    geom = np.zeros((6, height, width), np.uint16)
    geom[:, disc] = 30000
    rgb = np.zeros((3, height, width), np.uint8)
    rgb[0] = rows.astype(np.uint8)  # red encodes the source row, green the source column
    rgb[1] = cols.astype(np.uint8)
    return RawSample("p/s/frame_00000/cam_0", rgb, disc[None].astype(np.uint8) * 255, geom,
                     np.full((3, height, width), 128, np.uint8), np.zeros(4, np.float32), {"depth_range": [0.9, 1.1]})


def test_portrait_frames_are_cropped_around_the_head_not_squeezed():
    from avatars.data.shard_dataset import crop_box, face_window, mask_centre, to_compact_sample

    s = _portrait_sample()
    centre = mask_centre(s.geom)
    assert centre == pytest.approx((55, 30), abs=0.5)
    assert face_window(96, 64, centre) == (23, 0, 64)  # a 64x64 square around row 55
    assert face_window(96, 64, (5.0, 30.0)) == (0, 0, 64)  # shifted into the frame
    assert face_window(96, 64, (90.0, 30.0)) == (32, 0, 64)
    assert face_window(64, 64, centre) == (0, 0, 64)  # square frames: the whole frame
    evaluation = LoaderConfig(resolution=64, augment=False)
    out = to_compact_sample(s, evaluation, torch.Generator().manual_seed(0))
    rows = out["rgb"][0].float()
    assert rows[0, 0] == 23 and rows[-1, 0] == 86  # rows 23..86, cropped 1:1 instead of squeezed
    assert out["rgb"].shape == (3, 64, 64)
    assert (out["geom"][0] != 0).sum() == (s.geom[0] != 0).sum()  # the whole head is in the crop
    training = LoaderConfig(resolution=32, augment=True, min_crop=0.7)
    for seed in range(50):
        top, left, h, w = crop_box(96, 64, training, torch.Generator().manual_seed(seed), centre)
        assert h == w and 0.7 * 64 - 1 <= h <= 64
        assert 23 <= top and top + h <= 23 + 64 and 0 <= left and left + w <= 64  # inside the face window
