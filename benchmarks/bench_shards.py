"""Shard loader vs loose files: samples/s and bytes/sample at 256^2 and 512^2.

    python benchmarks/bench_shards.py [--sizes 256 512] [--workers 2] [--passes 3] [--open-only]

For each size it builds a one-person synthetic set (96 samples), writes it as
(a) our WebDataset shards, (b) loose files per sample: rgb.png + alpha.png + all
buffers as one float32 .npy (the obvious layout), and (c) the original
implementation's per-buffer PNG layout (8-bit RGB/mask/normals, 16-bit
depth and canonical channels), and reports bytes/sample of all three.

Throughput (samples/s, batch 8, random crop + resize to the stored size, the same
fast resizes everywhere) is measured for our loader over (a) and for (b) read two
ways: by a torch DataLoader with worker processes (the usual way, and the
original's), and by our loader's own thread pool (so only the layout differs).
Each with a warm page cache (one untimed pass first) and a cold one (the files
dropped from the page cache before every pass, as when the data set is larger
than memory). Goals from issue 3: loader >= 1.5x loose files, >= 2x fewer bytes
than float32.

Integrity: the time of the preprocess's up-to-date check of the existing shard set
(`write_shards` with nothing to write) before, hashing every shard in full
(``verify_all``, what every launch did; cold and warm page cache), and after, by size
and mtime against `verified.json`; and the per-sample checksum every read now verifies,
against the decode it precedes (ms/sample).

Open: the time of `ShardDataset(paths)` over the shard set (best of `--passes`, warm and cold page cache) and
the read system calls and bytes it makes (the process's `/proc/self/io` counters around it: `syscr`, `rchar`),
with each shard's member index (`<shard>.index.json`) and without: the tar headers walked and the index written,
and walked where the folder cannot be written (what every open did before the indexes). `--open-only` measures
only this (`results/shards_open.json`).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import report  # noqa: E402

import shards.integrity  # noqa: E402
from avatars.data import LoaderConfig, ResumableSampler, ShardDataset, ShardLoader, collate, make_loader  # noqa: E402
from avatars.data.shard_dataset import crop_box, hash_seed, nearest_crop_index, resize_smooth, take_pixels  # noqa: E402
from shards.codec import MEMBERS, decode_raw, verify_sample  # noqa: E402
from shards.ingest import IngestConfig, ingest_person  # noqa: E402
from shards.synthetic import SyntheticConfig, generate  # noqa: E402
from shards.writer import ShardConfig, shard_paths, write_shards  # noqa: E402

SHARDS = ShardConfig(samples_per_shard=16)


def build(size: int, root: Path) -> tuple[Path, list[Path]]:
    cfg = replace(SyntheticConfig(), persons=1, sequences=3, frames=2, image_size=size)
    generate(cfg, root / "captures")
    store = ingest_person(root / "captures", "000", root / "zarr", IngestConfig(held_out_sequences=1)).path
    write_shards([store], root / "shards", SHARDS, workers=2, progress=False)
    paths = [p for split in ("train", "test_seq", "test_cam") for p in shard_paths(root / "shards", "000", split)]
    return store, paths


def _png(a: np.ndarray) -> bytes:
    """PNG bytes; uint16 2-D arrays become 16-bit grayscale PNGs."""
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def write_loose(ds: ShardDataset, out: Path) -> tuple[int, int]:
    """Write (b) and (c) for every sample; returns their total bytes."""
    loose = png_layout = 0
    for i in range(len(ds)):
        s = ds.decoded(i)
        d = out / "loose" / f"{i:05d}"
        d.mkdir(parents=True, exist_ok=True)
        rgb8 = (s.rgb.transpose(1, 2, 0) * 255).round().astype(np.uint8)
        alpha8 = (s.alpha[0] * 255).round().astype(np.uint8)
        files = {"rgb.png": _png(rgb8), "alpha.png": _png(alpha8), "expr.npy": _npy(s.expression),
                 "buffers.npy": _npy(np.concatenate([s.mask, s.depth, s.normals, s.canonical]).astype(np.float32)),
                 "meta.json": json.dumps(s.meta).encode()}
        for name, data in files.items():
            (d / name).write_bytes(data)
        loose += sum(len(v) for v in files.values())
        # (c) per-buffer PNGs: 16-bit depth and canonical channels, 8-bit normals and mask.
        m = s.mask[0] > 0
        lo, hi = s.meta["depth_range"]
        depth16 = np.where(m, 1 + (s.depth[0] - lo) / max(hi - lo, 1e-9) * 65534, 0).round().astype(np.uint16)
        canon16 = ((s.canonical + 1) / 2 * 65535).round().astype(np.uint16)
        nrm8 = ((s.normals.transpose(1, 2, 0) + 1) / 2 * 255).round().astype(np.uint8)
        pngs = [_png(rgb8), _png(alpha8), _png((m * 255).astype(np.uint8)), _png(depth16), _png(nrm8)]
        pngs += [_png(canon16[c]) for c in range(5)]
        png_layout += sum(map(len, pngs)) + len(files["expr.npy"]) + len(files["meta.json"])
    return loose, png_layout


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


class LooseDataset(Dataset):
    """Reads layout (b) with the same crop + resize as the shard loader."""

    def __init__(self, root: Path, config: LoaderConfig):
        self.dirs = sorted((root / "loose").iterdir())
        self.config = config

    def __len__(self) -> int:
        return len(self.dirs)

    def __getitem__(self, i: int) -> dict:
        d = self.dirs[i]
        rgb = np.asarray(Image.open(d / "rgb.png")).transpose(2, 0, 1)
        alpha = np.asarray(Image.open(d / "alpha.png"))[None]
        buffers = np.load(d / "buffers.npy")
        json.loads((d / "meta.json").read_text())
        gen = torch.Generator().manual_seed(hash_seed(self.config.seed, 0, i))
        h, w = buffers.shape[-2:]
        box = crop_box(h, w, self.config, gen)
        r = self.config.resolution
        # The same fast resizes as the shard loader: flat-index gather, bilinear on the 8 bits.
        geo = torch.from_numpy(take_pixels(buffers, nearest_crop_index(box, w, r), r))
        smooth = resize_smooth(torch.from_numpy(np.concatenate([rgb, alpha])), box, r).float() / 255
        return {"image": smooth[:3] * 2 - 1, "alpha": smooth[3:], "mask": geo[0:1], "depth": geo[1:2],
                "normals": geo[2:5], "canonical": geo[5:10], "expression": torch.from_numpy(np.load(d / "expr.npy")),
                "__key__": d.name}


class ThreadedLoose(ShardLoader):
    """Loose files through the shard loader's own thread pool (so the loaders differ only in the data layout)."""

    def _build(self, indices: list[int]) -> dict:
        return collate([self.dataset[i] for i in indices])


def evict(files: list[Path]) -> None:
    """Drop the files from the page cache (as when the data set is larger than memory)."""
    os.sync()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def throughput(loader, passes: int, cold_files: list[Path] | None) -> float:
    """Samples/s over `passes` passes; warm: after one untimed pass, cold: page cache dropped before each pass."""
    if cold_files is None:
        for _ in loader:
            pass
    n = elapsed = 0.0
    for _ in range(passes):
        if cold_files is not None:
            evict(cold_files)
        t = time.perf_counter()
        for b in loader:
            n += len(b["__key__"])
        elapsed += time.perf_counter() - t
    return n / elapsed


def integrity(size: int, store: Path, root: Path, paths: list[Path], ds: ShardDataset, workers: int,
              passes: int) -> dict:
    """Seconds of the preprocess's up-to-date check (best of `passes`): every shard hashed (before) vs size and
    mtime (after); and ms/sample of the sample checksum vs the whole decode of a read."""
    def check(verify_all: bool, cold: bool) -> float:
        best = float("inf")
        for _ in range(passes):
            if cold:
                evict(paths)
            t = time.perf_counter()
            res = write_shards([store], root / "shards", SHARDS, workers=workers, progress=False,
                               verify_all=verify_all)
            best = min(best, time.perf_counter() - t)
            assert not res.written and len(res.skipped) == len(paths), res
        return best

    check(False, False)  # warm: the store's metadata and the shards
    full_cold, full_warm, stat = check(True, True), check(True, False), check(False, False)
    members = [{ext: ds._read(si, *exts[ext]) for ext in MEMBERS} for si, _, exts in ds.index]
    t = time.perf_counter()
    for m in members:
        verify_sample(m)
    verify_ms = (time.perf_counter() - t) / len(members) * 1e3
    t = time.perf_counter()
    for (_, key, _), m in zip(ds.index, members):
        decode_raw(key, m)
    decode_ms = (time.perf_counter() - t) / len(members) * 1e3
    total = sum(p.stat().st_size for p in paths)
    return {"size": size, "shards": len(paths), "MB": total / 1e6,
            "full hash cold s": full_cold, "full hash warm s": full_warm, "size+mtime s": stat,
            "speedup warm": full_warm / stat, "hash MB/s cold": total / 1e6 / full_cold,
            "sample checksum ms": verify_ms, "decode_raw ms (incl. checksum)": decode_ms}


def _io_counters() -> dict[str, int]:
    """This process's read counters (all its threads): read system calls and bytes read."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {"syscr": int(fields["syscr"]), "rchar": int(fields["rchar"])}


def open_cost(size: int, paths: list[Path], cfg: LoaderConfig, passes: int) -> list[dict]:
    """Seconds, read system calls and bytes of opening `ShardDataset(paths, cfg)`: with the shards' member indexes,
    without them (the tar headers walked, the indexes written again), and without them on a folder that cannot be
    written (walked at every open: what every open did before the indexes). Best of `passes`, warm and cold."""
    indexes = [shards.integrity.index_path(p) for p in paths]
    saved = {i: i.read_bytes() for i in indexes}
    real_write = shards.integrity.write_index

    def read_only(path, st, samples):
        raise PermissionError(13, "Permission denied (benchmark: a read-only folder)", str(path))

    def prepare(mode: str) -> None:
        for i, data in saved.items():
            if mode == "index file":
                if not i.exists():
                    i.write_bytes(data)
            else:
                i.unlink(missing_ok=True)
        shards.integrity.write_index = read_only if mode == "tar walk, read-only folder" else real_write

    baseline = _io_counters()
    idle = {k: v - baseline[k] for k, v in _io_counters().items()}  # what reading the counters itself costs
    rows = []
    try:
        for mode in ("index file", "tar walk, index written", "tar walk, read-only folder"):
            for cache in ("warm", "cold"):
                best, counts = float("inf"), None
                for k in range(passes + (cache == "warm")):  # warm: one untimed pass first
                    prepare(mode)
                    saved_now = [i for i in indexes if i.exists()]
                    if cache == "cold":
                        evict(paths + saved_now)
                    before, t = _io_counters(), time.perf_counter()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)
                        ds = ShardDataset(paths, cfg)
                    elapsed, after = time.perf_counter() - t, _io_counters()
                    if cache == "warm" and k == 0:
                        continue
                    best = min(best, elapsed)
                    counts = {c: after[c] - before[c] - idle[c] for c in after}
                n = len(ds)
                rows.append({"size": size, "shards": len(paths), "samples": n, "open": mode, "page cache": cache,
                             "open ms": best * 1e3, "read syscalls": counts["syscr"],
                             "KB read": counts["rchar"] / 1e3, "read syscalls/sample": counts["syscr"] / n})
    finally:
        shards.integrity.write_index = real_write
        prepare("index file")
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("data/bench-shards"))
    ap.add_argument("--open-only", action="store_true",
                    help="measure only the open of the shard set, with and without member indexes (shards_open.json)")
    return ap.parse_args(argv)


def main() -> None:
    a = parse_args()
    torch.set_num_threads(1)  # one thread per loader worker; the iterating thread only waits
    sizes, speeds, checks, opens = [], [], [], []
    for size in a.sizes:
        root = a.workdir / str(size)
        store, paths = build(size, root)
        cfg = LoaderConfig(resolution=size, batch_size=8, num_workers=a.workers, seed=0)
        opens += open_cost(size, paths, cfg, a.passes)
        if a.open_only:
            continue
        ds = ShardDataset(paths, cfg)
        checks.append(integrity(size, store, root, paths, ds, a.workers, a.passes))
        shutil.rmtree(root / "loose", ignore_errors=True)
        loose_bytes, png_bytes = write_loose(ds, root)
        n = len(ds)
        shard_bytes = sum(p.stat().st_size for p in paths)
        sizes += [{"size": size, "layout": "webdataset shards (ours)", "KB/sample": shard_bytes / n / 1e3,
                   "bytes vs float32": loose_bytes / shard_bytes},
                  {"size": size, "layout": "loose files, float32 .npy buffers", "KB/sample": loose_bytes / n / 1e3,
                   "bytes vs float32": 1.0},
                  {"size": size, "layout": "original per-buffer PNGs (16-bit depth/canonical)",
                   "KB/sample": png_bytes / n / 1e3, "bytes vs float32": loose_bytes / png_bytes}]
        loose_ds = LooseDataset(root, cfg)
        loose_files = [f for d in loose_ds.dirs for f in d.iterdir()]
        sampler = ResumableSampler(n, seed=0)
        loaders = {
            "ours": (make_loader(ds, sampler, cfg, drop_last=False), paths),
            "loose, same threads": (ThreadedLoose(loose_ds, sampler, cfg, drop_last=False), loose_files),
            "loose, DataLoader": (DataLoader(loose_ds, batch_size=8, sampler=sampler, num_workers=a.workers,
                                             collate_fn=collate, persistent_workers=True), loose_files),
        }
        for cache in ("warm", "cold"):
            got = {name: throughput(loader, a.passes, files if cache == "cold" else None)
                   for name, (loader, files) in loaders.items()}
            speeds.append({"size": size, "page cache": cache, **{f"{k} samples/s": v for k, v in got.items()},
                           "ours vs loose DataLoader": got["ours"] / got["loose, DataLoader"],
                           "ours vs loose same threads": got["ours"] / got["loose, same threads"]})
    print(f"ShardDataset open ({a.workers} threads, best of {a.passes}): with the member indexes, without (the tar "
          "headers walked; the indexes written, or not on a read-only folder: every open before them); read system "
          "calls and bytes from /proc/self/io")
    report("shards_open", opens)
    if a.open_only:
        return
    print("\nbytes per sample")
    report("shards_bytes", sizes)
    print(f"\nup-to-date check of the existing shards (write_shards, {a.workers} threads, best of {a.passes}): "
          "every shard hashed (before) vs size + mtime (after); per-sample checksum vs the decode of a read")
    report("shards_integrity", checks)
    print(f"\nloader throughput ({a.workers} workers, batch 8, random crop + resize to the stored size)")
    report("shards", speeds, {"workers": a.workers, "passes": a.passes, "bytes": sizes, "integrity": checks,
                              "open": opens})


if __name__ == "__main__":
    main()
