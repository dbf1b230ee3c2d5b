"""Training batches from WebDataset tar shards, with random access and exact resume.

The shards are plain WebDataset tars (the `webdataset` library reads them too), but
training reads them through an index instead of streaming: opening a shard reads
where each member's bytes are from `<shard>.index.json` beside it (written with the
shard; trusted while the shard keeps the size and mtime it was indexed at), or else
scans its tar headers once (no data is read) and writes that file again, then a sample
is a few `pread`s and a decode. That gives

* a map-style dataset, so a seeded per-epoch permutation shuffles globally and
  the training loop can resume at an exact sample position;
* augmentation drawn from a generator seeded by (seed, epoch, index), so a
  sample's crop does not depend on which worker loads it, or on restarts;
* corrupt data never trained on, with an error naming the shard (and the sample):
  opening a shard checks it against its folder's `manifest.json` (its size; its
  sha256 only when its mtime differs from the one `verified.json` recorded, see
  `shards.integrity`) and refuses a shard a reader marked corrupt; every sample is
  checked against its own sha256 member before it is decoded, and a mismatch marks the
  shard (`<shard>.corrupt`) so that the next preprocess rebuilds it.

Augmentation (the paper's): a random square crop covering a fraction in
[min_crop, 1] of the face window's side (the square of side min(H, W) centred on the
rasterized head; the whole frame when it is square), resized to the training size;
evaluation takes the face window itself; the image and alpha are
resized bilinearly, the geometry buffers with nearest neighbour so that no
canonical coordinate is blended with the background's zeros.
"""

from __future__ import annotations

import errno
import os
import threading
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from shards.codec import MEMBERS, DecodedSample, RawSample, SampleChecksumError, decode_raw, decode_sample, dequantize
from shards.integrity import (
    REBUILD_HINT,
    ShardError,
    corrupt,
    corrupt_mark,
    shard_index,
    shard_stat,
    verify_against_manifests,
)

from .device_feed import DeviceFeeder, one_ahead


@dataclass
class LoaderConfig:
    """How shards become batches."""

    resolution: int = 64
    """Training image size (square); the paper trains at 512."""
    batch_size: int = 8
    """Samples per batch (per process)."""
    augment: bool = True
    """Random crop + resize (training). False: the face window (the min(H, W) square centred on the
    head; the whole frame when square) resized (evaluation)."""
    min_crop: float = 0.7
    """Smallest crop side as a fraction of the image side (the paper's 0.7)."""
    num_workers: int = 2
    """Decoding threads (0: decode in the iterating thread)."""
    seed: int = 0
    """Seed of the augmentation. The order of the samples is the sampler's (:class:`ResumableSampler`: its
    ``seed`` and ``shuffle``), not the loader's: ``ShardLoader`` iterates whatever order it is given."""

    def __post_init__(self) -> None:
        check_min_crop(self.min_crop)


def check_min_crop(min_crop: float) -> None:
    """A crop side is a fraction in [min_crop, 1] of the face window's: refuse anything outside (0, 1]."""
    if not 0 < min_crop <= 1:
        raise ValueError(f"min_crop must be in (0, 1], got {min_crop}")


class ShardDataset(Dataset):
    """Random-access samples of a list of shards (each item one training sample dict).

    Opening refuses a shard a reader marked corrupt and checks every shard whose folder has a
    `manifest.json` against it (`shards.integrity.verify_against_manifests`: size, and the sha256
    of a shard whose mtime changed since it was verified; `verify=False` skips that, e.g. for a
    quick look at a huge set), then indexes each shard (`shards.integrity.shard_index`: its
    `<shard>.index.json`, or its tar headers with their checks). Every sample is checked against
    its checksum when decoded.
    """

    def __init__(self, shards: list[Path], config: LoaderConfig, verify: bool = True):
        self._fds: dict[int, int] = {}
        self._fd_lock = threading.Lock()
        if not shards:
            raise ValueError("no shards given")
        self.config = config
        self.shards = [Path(s) for s in shards]
        for path in self.shards:
            mark = corrupt_mark(path)
            if mark is not None:
                raise ShardError(path, f"a reader found it corrupt ({mark}); {REBUILD_HINT}")
        threads = max(2, config.num_workers)
        pool = ThreadPoolExecutor(min(threads, len(self.shards)), thread_name_prefix="shard-index")
        try:  # threads: on a network file system each shard's open is a few round trips
            stats = list(pool.map(_stat, self.shards))  # once per shard: the check and the index share it
            if verify:
                verify_against_manifests(self.shards, threads=threads, stats=stats)
            indexed = list(pool.map(shard_index, self.shards, stats))  # the first shard (in order) that fails raises
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        #: (size, mtime_ns, inode) of each shard as checked and indexed, what its first read (in each process)
        #: compares the file it opens with (`_open`).
        self._indexed_as = [(st.st_size, st.st_mtime_ns, st.st_ino) for st in stats]
        self.index: list[tuple[int, str, dict[str, tuple[int, int]]]] = []
        unwritten: dict[Path, list[str]] = {}
        for si, (path, (samples, error)) in enumerate(zip(self.shards, indexed)):
            self.index.extend((si, key, exts) for key, exts in samples)
            if error is not None:
                unwritten.setdefault(path.parent, []).append(error)
        for folder, errors in unwritten.items():
            warnings.warn(f"{folder}: the member index of {len(errors)} shard(s) could not be written ({errors[0]}): "
                          "every open reads their tar headers (slow on a network file system); a jobs/preprocess.py "
                          "run that can write the folder writes them", RuntimeWarning, stacklevel=2)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        """`size` bytes at `offset` of shard `shard`. A read the system refuses is a `ShardError` naming the shard
        and where (`pread`'s own error names no file); an I/O error (EIO: a bad sector, a disk or controller fault)
        marks the shard for a rebuild too, since it fails the same way every night until the file is written anew
        (a rebuild writes new blocks; a transient one costs one shard's rebuild)."""
        path = self.shards[shard]
        try:
            fd = self._fds.get(shard)
            if fd is None:  # opened lazily, once per process (loader threads share it; pread has no file position)
                with self._fd_lock:
                    fd = self._fds.get(shard)
                    if fd is None:
                        fd = self._fds[shard] = self._open(shard)
            data = os.pread(fd, size, offset)
        except OSError as e:
            problem = f"cannot read {size} bytes at offset {offset}: {e.strerror or e}"
            if e.errno == errno.EIO:
                raise self._corrupt(shard, problem) from None
            raise ShardError(path, problem) from None
        if len(data) != size:
            raise ShardError(self.shards[shard], f"truncated shard: short read at offset {offset}")
        return data

    def _open(self, shard: int) -> int:
        """A descriptor of shard `shard`, which must still be the file that was checked and indexed when the dataset
        was opened: a shard a preprocess rewrote since (a new file renamed over it: another inode and mtime, or
        another size) has other members at other offsets, and reading it by the old index failed its samples'
        checksums and marked the new, good shard corrupt (rebuilt again by the next preprocess, refused by every
        loader until then). The same file changed in place (bit rot, a touch) keeps its layout: its reads are checked
        by the samples' checksums, and a mismatch marks it. (An inode alone is not compared: a process on another
        machine may see other inode numbers on some file systems.)"""
        path = self.shards[shard]
        fd = os.open(path, os.O_RDONLY)
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        size, mtime_ns, inode = self._indexed_as[shard]
        if st.st_size != size or (st.st_ino != inode and st.st_mtime_ns != mtime_ns):
            os.close(fd)
            raise ShardError(path, f"the shard was replaced since the loader opened it (size {size} -> {st.st_size}, "
                                   f"mtime_ns {mtime_ns} -> {st.st_mtime_ns}: rewritten by a jobs/preprocess.py run, "
                                   "or copied over), so the member index read then is not this file's; open the "
                                   "shards again (restart the run)")
        return fd

    def _corrupt(self, shard: int, problem: str) -> ShardError:
        """The error for a corrupt read of shard `shard`, marking the shard for a rebuild (`shards.integrity.corrupt`)
        when its path still names the file that was read: one a preprocess renamed over it meanwhile (or removed) is
        another file, which the mark would condemn (a good shard rebuilt, and refused by every loader until then)."""
        path, fd = self.shards[shard], self._fds.get(shard)
        if fd is not None:
            try:
                read, now = os.fstat(fd), os.stat(path)
                replaced = (read.st_dev, read.st_ino) != (now.st_dev, now.st_ino)
            except FileNotFoundError:
                replaced = True
            except OSError:  # cannot tell: marked (a rebuild too many at worst)
                replaced = False
            if replaced:
                return ShardError(path, f"{problem}, in the file that was read; the shard has been replaced or removed "
                                        "since (by a jobs/preprocess.py run?), so it is not marked; open the shards "
                                        "again (restart the run)")
        return corrupt(path, problem)

    def _decode(self, i: int, decoder):
        shard, key, exts = self.index[i]
        members = {ext: self._read(shard, *exts[ext]) for ext in MEMBERS}
        try:
            return decoder(key, members)  # checks the sample's checksum first (`shards.codec.verify_sample`)
        except SampleChecksumError as e:  # bit rot leaves size and mtime as they were: the shard must be marked
            raise self._corrupt(shard, f"corrupt sample {key}: {e}") from None
        except Exception as e:
            raise ShardError(self.shards[shard], f"corrupt sample {key}: {e}") from None

    def decoded(self, i: int) -> DecodedSample:
        """Sample `i` as float arrays at the stored resolution (no augmentation)."""
        return self._decode(i, decode_sample)

    def compact(self, i: int) -> dict:
        """Sample `i` cropped and resized but still quantised (what loader threads batch)."""
        s = self._decode(i, decode_raw)
        gen = torch.Generator().manual_seed(hash_seed(self.config.seed, self.epoch, i))
        return to_compact_sample(s, self.config, gen)

    def __getitem__(self, i: int) -> dict:
        """Sample `i` in the training batch contract (docs/CONTRACTS.md), without the batch dim."""
        batch = expand_batch(collate([self.compact(i)]))
        return {k: v[0] for k, v in batch.items()}

    def __del__(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fds"] = {}
        del state["_fd_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._fd_lock = threading.Lock()


def _stat(path: Path) -> os.stat_result:
    try:
        return shard_stat(path)
    except ShardError as e:
        raise ShardError(path, f"{e.problem}; re-run jobs/preprocess.py to rebuild it") from None


def hash_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes, unlike hash())."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = ((x ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


def face_window(height: int, width: int, centre: tuple[float, float] | None) -> tuple[int, int, int]:
    """(top, left, side) of the square of side min(H, W) centred on ``centre`` (row, col; the
    projected head), shifted to lie inside the frame: the whole frame when it is square."""
    side = min(height, width)
    if centre is None or height == width:
        return (height - side) // 2, (width - side) // 2, side
    top = int(round(centre[0] - side / 2))
    left = int(round(centre[1] - side / 2))
    return min(max(top, 0), height - side), min(max(left, 0), width - side), side


def crop_box(height: int, width: int, config: LoaderConfig, gen: torch.Generator,
             centre: tuple[float, float] | None = None) -> tuple[int, int, int, int]:
    """(top, left, h, w) of the crop, always square, inside the face window (:func:`face_window`):
    in training a random integer side in [min_crop, 1] of the window's side at a random place in
    it (the official code's crop); in evaluation the window itself, so a portrait frame is cropped
    around the head instead of being squeezed into a square."""
    w_top, w_left, w_side = face_window(height, width, centre)
    if not config.augment:
        return w_top, w_left, w_side, w_side
    frac = config.min_crop + (1 - config.min_crop) * torch.rand((), generator=gen).item()
    side = max(1, int(round(w_side * frac)))
    top = w_top + int(torch.randint(0, w_side - side + 1, (), generator=gen))
    left = w_left + int(torch.randint(0, w_side - side + 1, (), generator=gen))
    return top, left, side, side


def mask_centre(geom: np.ndarray) -> tuple[float, float] | None:
    """(row, col) centroid of the rasterized mask (depth code != 0) of a (6, H, W) geometry
    array, or None when no pixel is covered."""
    rows, cols = np.nonzero(geom[0])
    return (float(rows.mean()), float(cols.mean())) if len(rows) else None


def _nearest_rows(start: int, length: int, out: int) -> np.ndarray:
    """Source indices of a nearest-neighbour resize of [start, start + length) to `out` (like 'nearest-exact')."""
    idx = ((np.arange(out) + 0.5) * (length / out)).astype(np.int64)
    return start + np.minimum(idx, length - 1)


def nearest_crop_index(box: tuple[int, int, int, int], width: int, out: int) -> np.ndarray:
    """Flat pixel indices (out * out,) of a nearest-neighbour crop `box` (top, left, h, w) resized to out^2."""
    top, left, ch, cw = box
    return (_nearest_rows(top, ch, out)[:, None] * width + _nearest_rows(left, cw, out)[None, :]).ravel()


def take_pixels(a: np.ndarray, index: np.ndarray, out: int) -> np.ndarray:
    """(C, H, W) -> (C, out, out) by flat pixel index: one `np.take` per array, ~8x faster at
    512^2 than indexing rows and then columns."""
    return np.take(a.reshape(a.shape[0], -1), index, axis=1).reshape(a.shape[0], out, out)


def resize_smooth(image: torch.Tensor, box: tuple[int, int, int, int], out: int) -> torch.Tensor:
    """Crop `box` of a (C, H, W) uint8 image and resize it bilinearly (antialiased when shrinking) to out^2.

    Runs on the 8-bit values (torch's uint8 kernels round to the nearest step), ~3x
    faster than through float; an image stored channel-last (a permuted view) takes
    torch's vectorised channels-last path. Returns a contiguous (C, out, out) tensor."""
    top, left, ch, cw = box
    crop = image[:, top : top + ch, left : left + cw]
    if (ch, cw) != (out, out):
        crop = F.interpolate(crop[None], size=(out, out), mode="bilinear", align_corners=False,
                             antialias=ch > out or cw > out)[0]
    return crop.contiguous()


def to_compact_sample(s: RawSample, config: LoaderConfig, gen: torch.Generator) -> dict:
    """Crop + resize one stored sample, keeping the compact integer types.

    Geometry is resized by nearest-neighbour indexing on the quantised integers (a
    canonical coordinate is never blended with the background); the image and alpha
    are resized bilinearly (antialiased when shrinking) on their 8 bits. A sample is
    19 bytes/pixel instead of 52 as float32; `expand_batch` dequantises a whole batch
    at once, on any device.
    """
    h, w = s.geom.shape[-2:]
    box = crop_box(h, w, config, gen, mask_centre(s.geom) if h != w else None)
    r = config.resolution
    index = nearest_crop_index(box, w, r)
    return {
        "rgb": resize_smooth(torch.from_numpy(s.rgb), box, r),
        "alpha": resize_smooth(torch.from_numpy(s.alpha), box, r),
        "geom": torch.from_numpy(take_pixels(s.geom, index, r).view(np.int16)),
        "nrm": torch.from_numpy(take_pixels(s.nrm, index, r)),
        "depth_range": torch.tensor(s.meta["depth_range"], dtype=torch.float32),
        "expression": torch.from_numpy(np.asarray(s.expression, np.float32).copy()),
        "__key__": s.key,
    }


def expand_batch(compact: dict, device: torch.device | str | None = None) -> dict:
    """A collated compact batch -> the training batch contract (float32, on `device`)."""
    c = {k: (v.to(device) if device is not None and torch.is_tensor(v) else v) for k, v in compact.items()}
    mask, depth, normals, canonical = dequantize(c["geom"], c["nrm"], c["depth_range"])
    image, alpha = c["rgb"].to(torch.float32), c["alpha"].to(torch.float32)
    return {"image": image.mul_(2 / 255).sub_(1), "alpha": alpha.mul_(1 / 255), "mask": mask, "depth": depth,
            "normals": normals, "canonical": canonical, "expression": c["expression"], "__key__": c["__key__"]}


class ResumableSampler(Sampler[int]):
    """A seeded permutation per epoch that can start at any position (exact resume).

    With `num_replicas` > 1 each rank takes every num_replicas-th index of the same
    permutation (padded by wrapping so all ranks see the same number of samples).
    """

    def __init__(self, length: int, seed: int = 0, shuffle: bool = True, rank: int = 0, num_replicas: int = 1):
        self.length, self.seed, self.shuffle = length, seed, shuffle
        self.rank, self.num_replicas = rank, num_replicas
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch and skip its first `start` indices (of this rank)."""
        self.epoch, self.start = epoch, start

    def indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(hash_seed(self.seed, self.epoch))
            perm = torch.randperm(self.length, generator=generator)
            order = perm.tolist()
        else:
            order = list(range(self.length))
        per_rank = -(-self.length // self.num_replicas)
        order = (order * 2)[: per_rank * self.num_replicas]
        return order[self.rank :: self.num_replicas]

    def __len__(self) -> int:
        return len(self.indices()) - self.start

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start :])


def collate(samples: list[dict], pin_memory: bool = False) -> dict:
    """Stack samples into a batch; with `pin_memory`, straight into page-locked memory (what an
    asynchronous copy to a GPU needs)."""
    out = {}
    for k in samples[0]:
        if k == "__key__":
            continue
        parts = [s[k] for s in samples]
        if pin_memory:
            out[k] = torch.stack(parts, out=torch.empty((len(parts), *parts[0].shape), dtype=parts[0].dtype,
                                                          pin_memory=True))
        else:
            out[k] = torch.stack(parts)
    out["__key__"] = [s["__key__"] for s in samples]
    return out


class ShardLoader:
    """Iterates training batches (the contract) in `sampler` order, decoded by a pool of threads.

    Threads, not processes: every heavy step (zstd, `np.take`, torch resizes and the
    dequantisation) releases the GIL, so threads decode in parallel, while shipping a
    batch out of a worker process (pickling into new shared memory, faulting it in on
    both sides) cost more than decoding it (`benchmarks/bench_shards.py`). Each thread
    builds whole batches; at most `2 * num_workers` are decoded ahead. A batch is
    dequantised in its thread, or, with a non-CPU `device`, on that device so the
    host-to-device copy stays compact (19 bytes/pixel instead of 52). On CUDA the threads
    collate into pinned memory and the copy + dequantisation of the next batch is queued on a
    side stream before the current one is handed out (`avatars.data.device_feed`), so it
    overlaps the training step instead of stalling it.
    """

    def __init__(self, dataset: ShardDataset, sampler: Sampler[int], config: LoaderConfig, drop_last: bool = True,
                 device: torch.device | str | None = None):
        self.dataset, self.sampler, self.config, self.drop_last = dataset, sampler, config, drop_last
        self.device = None if device is None else torch.device(device)
        self._expand_here = self.device is not None and self.device.type != "cpu"

    def __len__(self) -> int:
        n, b = len(self.sampler), self.config.batch_size
        return n // b if self.drop_last else -(-n // b)

    def _batches(self) -> list[list[int]]:
        order, b = list(self.sampler), self.config.batch_size
        batches = [order[i : i + b] for i in range(0, len(order), b)]
        if self.drop_last and batches and len(batches[-1]) < b:
            batches.pop()
        return batches

    def _build(self, indices: list[int]) -> dict:
        compact = collate([self.dataset.compact(i) for i in indices], pin_memory=self._pin)
        return compact if self._expand_here else expand_batch(compact)

    @property
    def _pin(self) -> bool:
        return self._expand_here and self.device.type == "cuda" and torch.cuda.is_available()

    def __iter__(self) -> Iterator[dict]:
        if not self._expand_here:
            yield from self._built()
            return
        feeder = DeviceFeeder(self.device, expand_batch)
        yield from one_ahead(self._built(), feeder.stage, feeder.ready)

    def _built(self) -> Iterator[dict]:
        """Batches as `_build` makes them, in order, up to `2 * num_workers` decoded ahead."""
        batches = self._batches()
        if self.config.num_workers == 0:
            for indices in batches:
                yield self._build(indices)
            return
        pool = ThreadPoolExecutor(self.config.num_workers, thread_name_prefix="shard-loader",
                                  initializer=torch.set_num_threads, initargs=(1,))
        try:
            ahead: deque[Future] = deque()
            for indices in batches:
                ahead.append(pool.submit(self._build, indices))
                if len(ahead) > 2 * self.config.num_workers:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()
        finally:  # also when the consumer stops early: drop the batches not started yet
            pool.shutdown(wait=True, cancel_futures=True)


def make_loader(dataset: ShardDataset, sampler: ResumableSampler, config: LoaderConfig, drop_last: bool = True,
                device: torch.device | str | None = None) -> ShardLoader:
    """Batches of `dataset` in `sampler` order (`ShardLoader`)."""
    return ShardLoader(dataset, sampler, config, drop_last, device)
