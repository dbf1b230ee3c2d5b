"""Turn a person's zarr store + images into WebDataset tar shards.

Output per person::

    <out>/<person>/<split>-000000.tar ...   one sample per (frame, camera), see shards.codec
    <out>/<person>/manifest.json            per shard: split, sample count, bytes, sha256, keys digest

Samples go to shards in the store's deterministic order (frame-major, camera-minor),
so keys and shard contents are reproducible; tar headers carry no timestamps or
owners, so the same inputs give byte-identical shards. Each shard is written to a
temporary file and renamed; the manifest is rewritten (atomically) after every
finished shard, so an interrupted run resumes by skipping shards that the manifest
lists with the same spec and whose file has the listed size and sha256. A shard is
not read to know that: `verified.json` beside the manifest records the size and
mtime_ns each shard had when its sha256 last matched (when written, or hashed since),
and only a shard whose mtime differs (or that has no record) is hashed; a shard a
reader marked corrupt (`<shard>.corrupt`) is rebuilt, see `shards.integrity`.
`<shard>.index.json` beside each shard (written with it) lists where its samples' members
lie, so the loader's open does not walk the tar headers; an up-to-date shard without one
(written by an older version) is not rebuilt but indexed by the next run, as is one whose
mtime changed (`_reindexed`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import tarfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from common.io import DataError, atomic_file, atomic_write_json
from common.locks import exclusive
from common.process_pool import map_tolerant

from .codec import CODEC_VERSION, MEMBERS, encode_sample, normalise_canonical
from .contract import Camera
from .ingest import CONTENT, INGEST_WHAT, STORES_LOCK_FILE, alpha_value_problem
from .integrity import (
    CORRUPT_SUFFIX,
    INDEX_SUFFIX,
    MANIFEST,
    SampleIndex,
    ShardError,
    check_shard,
    corrupt_mark,
    corrupt_marker,
    index_path,
    load_manifest,
    load_verified,
    shard_stat,
    walk_shard,
    write_index,
    write_verified,
)
from .raster import BACKENDS, RasterBuffers, rasterize_views
from .store import SPLITS, PersonStore, Sample

SHARD_FMT = "{split}-{index:06d}.tar"
#: Bumped whenever the writer starts refusing samples it used to write (part of every shard's spec digest, so
#: shards written before are checked again, i.e. rebuilt, on the next preprocess instead of being taken as up to
#: date; a valid sample's bytes do not change). 1: `check_foreground`, and alpha maps with no foreground or 0/1.
SAMPLE_CHECKS = 1
#: The least fraction of a sample's rasterized mesh pixels that must lie inside the foreground of its alpha map
#: (alpha > 0.5), else the sample is refused (`check_foreground`). NeRSemble's mattes cover the head, hair, neck
#: and torso, so a mesh that is calibrated and in the calibration's coordinate frame lies almost entirely inside:
#: only its silhouette's edge can stick out, by the tracking error and the matte's soft border (the synthetic data
#: sets measure >= 0.99: the tiny test set 0.999 to 1.0, the default 16-camera set at 128 px 0.991). A fraction
#: below one half is no tracking error but a mesh drawn where the person is not (a wrong or mirrored extrinsic,
#: a mesh in another coordinate frame or unit, another camera's alpha map): trained on, it teaches the model to
#: draw a head where the conditioning has none, or to erase one it draws.
MIN_MESH_IN_MATTE = 0.5


@dataclass
class ShardConfig:
    """How samples are rendered into shards."""

    samples_per_shard: int = 64
    """Samples per tar file (the loader reads by index, so shard size does not limit its parallelism;
    smaller shards let an interrupted preprocess resume at a finer grain)."""
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """RGB in [0, 1] the target images are matted onto (with the capture's alpha map)."""
    image_width: int | None = None
    """Resize images (and cameras) to this width, keeping the aspect ratio; None keeps the capture size."""
    raster_backend: str = "auto"
    """Rasterizer backend: 'auto' (nvdiffrast when CUDA is available), 'cpu' or 'nvdiffrast'."""

    def __post_init__(self) -> None:
        if len(self.background) != 3 or not all(0.0 <= float(c) <= 1.0 for c in self.background):
            raise ValueError(f"background must be RGB in [0, 1] (three values), got {tuple(self.background)}")
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if self.image_width is not None and self.image_width < 1:
            raise ValueError(f"image_width must be >= 1 or None (the capture size), got {self.image_width}")
        if self.raster_backend not in BACKENDS:
            raise ValueError(f"raster_backend must be one of {BACKENDS}, got {self.raster_backend!r}")


@dataclass(frozen=True)
class ShardTask:
    """One shard to write."""

    store: str
    out_dir: str
    split: str
    index: int
    samples: tuple[Sample, ...]  # planned once per person: listing a large store's samples again for every shard
    # took ~0.4 s of the ~0.5 s each shard's worker spent before its first frame (20 sequences x 300 frames x 16 cams)
    spec: str  # digest of everything the shard's bytes depend on

    @property
    def name(self) -> str:
        return SHARD_FMT.format(split=self.split, index=self.index)


def _spec_digest(store: PersonStore, config: ShardConfig, keys: list[str]) -> str:
    """Digest of everything a shard's bytes depend on: the store's data, the shard settings, the codec and checks
    and the shard's sample keys. The store's data is its content identity (`shards.ingest.CONTENT`), so a store
    ingested again from a capture touched, copied without mtimes or moved keeps every shard's spec; a store written
    before stores recorded one is keyed by its stat fingerprint, the spec it had (an upgrade rebuilds nothing)."""
    content = store.attrs.get(CONTENT)
    data = {"content": content} if content is not None else {"fingerprint": store.attrs["fingerprint"]}
    h = hashlib.sha256(json.dumps({**data, "config": asdict(config), "codec": CODEC_VERSION,
                                   "checks": SAMPLE_CHECKS}, sort_keys=True).encode())
    h.update("\n".join(keys).encode())
    return h.hexdigest()


def plan_person(store_path: Path, out_dir: Path, config: ShardConfig) -> list[ShardTask]:
    """All shard tasks of one person, in deterministic order."""
    store = PersonStore(store_path)
    named = Path(store_path).name.removesuffix(".zarr")
    if store.person != named:  # its shards would go to (and replace) the other person's folder, keyed as that person
        raise DataError(store_path, f"the store holds person {store.person!r} (attribute 'person') but is named "
                                    f"{Path(store_path).name} (a renamed or copied store): rename it back to "
                                    f"{store.person}.zarr, or ingest person {named} with jobs/ingest.py")
    all_samples = store.samples()
    tasks = []
    for split in SPLITS:
        ids = [i for i, s in enumerate(all_samples) if s.split == split]
        for k in range(0, len(ids), config.samples_per_shard):
            chunk = tuple(all_samples[i] for i in ids[k : k + config.samples_per_shard])
            keys = [sample_key(store.person, s) for s in chunk]
            tasks.append(ShardTask(str(store_path), str(out_dir / store.person), split,
                                   k // config.samples_per_shard, chunk, _spec_digest(store, config, keys)))
    return tasks


def sample_key(person: str, sample: Sample) -> str:
    return f"{person}/{sample.key}"


@dataclass
class MeshTensors:
    """One fitted mesh ready to rasterize: the canonical coords already normalised to [-1, 1]."""

    vertices: torch.Tensor  # (V, 3)
    faces: torch.Tensor  # (F, 3) int64
    canonical: torch.Tensor  # (V, 5)
    expression: np.ndarray  # (D,)

    @staticmethod
    def from_store(store: PersonStore, frame: int) -> "MeshTensors":
        m = store.mesh(frame)
        canon = normalise_canonical(m.canonical, store.attrs["canonical_bounds"], store.attrs["ambient_bounds"])
        return MeshTensors(torch.from_numpy(m.vertices).float(), torch.from_numpy(m.faces).long(),
                           torch.from_numpy(canon), np.asarray(m.expression))

    def rasterize_views(self, cameras: list[Camera], backend: str = "auto") -> list[RasterBuffers]:
        """RasterBuffers (on CPU) of this mesh seen by each of `cameras`: what the shard samples store."""
        dev = "cuda" if backend != "cpu" and torch.cuda.is_available() else "cpu"
        bufs = rasterize_views(self.vertices.to(dev), self.faces.to(dev), cameras, attributes=self.canonical.to(dev),
                               backend=backend)
        return [b.to("cpu") for b in bufs]


def _read_rgb_alpha(paths: tuple[Path, Path], captured: tuple[int, int],
                    size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """An image and its alpha map, which must have the ``captured`` size the store's camera has (an image
    replaced after the ingest by one of another size would be stretched onto the camera's pixels without a
    word), resized to ``size``. An alpha map with no foreground or with values 0/1 is refused (the ingest
    refuses them too; this catches a store ingested before it did, or a capture changed since)."""
    images = []
    for path, mode in zip(paths, ("RGB", "L")):
        try:
            with Image.open(path) as im:
                image = im.convert(mode)
        except OSError as e:
            raise DataError(path, f"unreadable image or alpha map while sharding: {e}") from None
        if image.size != captured:
            raise DataError(path, f"is {image.size[0]}x{image.size[1]}, but the store's camera is "
                                  f"{captured[0]}x{captured[1]}: the capture changed after it was ingested "
                                  "(jobs/ingest.py validates and ingests it again)")
        if mode == "L":
            problem = alpha_value_problem(image.getextrema()[1])
            if problem:
                raise DataError(path, f"{problem} (jobs/ingest.py refuses it)")
        images.append(np.asarray(image if image.size == size else image.resize(size, Image.BILINEAR)))
    return images[0], images[1]


def mesh_in_matte(mask: np.ndarray, alpha: np.ndarray) -> float:
    """Fraction of the rasterized mesh's pixels (``mask``, bool (H, W)) where the alpha map (uint8 (H, W),
    0..255) is above one half; NaN for an empty mask."""
    covered = int(np.count_nonzero(mask))
    if not covered:
        return float("nan")
    return int(np.count_nonzero(mask & (alpha > 127))) / covered


def check_foreground(store: PersonStore, sample: Sample, mask: np.ndarray, alpha: np.ndarray) -> None:
    """DataError naming the store, the sample's sequence, frame and camera and what to check, when the fitted
    mesh is not seen by the camera (an empty rasterized mask) or does not lie on the person in the image (less
    than `MIN_MESH_IN_MATTE` of its pixels inside the alpha map's foreground). Such a sample would be trained
    on with an unmasked loss: an image of the person with empty (or misplaced) conditioning."""
    fraction = mesh_in_matte(mask, alpha)
    if fraction >= MIN_MESH_IN_MATTE:
        return
    capture = store.capture
    where = (f"sequence {sample.sequence}, frame {sample.timestep}, camera {sample.serial} "
             f"(sample {sample_key(store.person, sample)})")
    frame_files = (f"camera {sample.serial}'s world_2_cam and intrinsics in {capture.calibration_path}, and "
                   f"that the mesh {capture.mesh_path(sample.sequence, sample.timestep)} is in the calibration's "
                   "world coordinate frame and units")
    if np.isnan(fraction):
        raise DataError(store.path, f"{where}: the fitted mesh covers no pixel of the image (the camera does not "
                                    f"see it: behind or beside the camera, or far outside the view); check "
                                    f"{frame_files}")
    raise DataError(store.path, f"{where}: only {fraction:.0%} of the {int(np.count_nonzero(mask))} pixels the "
                                f"fitted mesh covers lie inside the alpha map's foreground (alpha > 0.5; at least "
                                f"{MIN_MESH_IN_MATTE:.0%} needed): the mesh does not project onto the person; check "
                                f"{frame_files}, and that {store.image_paths(sample)[1]} is this camera's alpha map")


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> tuple[int, int]:
    """One member, timestamp- and owner-free, so the same inputs give the same bytes; returns where its bytes are in
    the tar (offset, size), what `<shard>.index.json` records.

    Not webdataset's ``TarWriter`` (1.0.2): it passes its ``format`` argument nowhere (members get
    POSIX "ustar\\0" headers instead of these GNU ones) and writes a sample's members in sorted name
    order instead of :data:`~shards.codec.MEMBERS` order, so every shard's bytes, and the sha256 that
    ``manifest.json`` records and the loader verifies, would change. webdataset reads these tars
    (``tests/shards/test_shards.py``).
    """
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))  # after it, tar.offset is past the member's bytes padded to a block
    return tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE, len(data)


def write_shard(task: ShardTask, config: ShardConfig) -> dict:
    """Render and write one shard; returns its manifest entry."""
    store = PersonStore(Path(task.store))
    bounds = store.attrs["canonical_bounds"]
    bg = np.asarray(config.background, np.float32)
    keys = []
    index: SampleIndex = []

    def camera(s: Sample) -> Camera:
        cam = store.cameras[s.camera]
        if config.image_width and config.image_width != cam.width:
            cam = cam.resized(config.image_width, round(cam.height * config.image_width / cam.width))
        return cam

    def rendered() -> Iterator[tuple[Sample, Camera, RasterBuffers, np.ndarray]]:
        """The shard's samples with their buffers: the cameras of each frame rasterized together."""
        for frame, group in itertools.groupby(task.samples, key=lambda s: s.frame):
            group = list(group)
            mesh = MeshTensors.from_store(store, frame)
            cams = [camera(s) for s in group]
            for s, cam, buf in zip(group, cams, mesh.rasterize_views(cams, config.raster_backend)):
                yield s, cam, buf, mesh.expression

    path = Path(task.out_dir) / task.name
    with atomic_file(path) as tmp:
        with tarfile.open(tmp, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for s, cam, buf, expr in rendered():
                captured = store.cameras[s.camera]
                rgb, alpha = _read_rgb_alpha(store.image_paths(s), (captured.width, captured.height),
                                             (cam.width, cam.height))
                check_foreground(store, s, buf.mask.numpy(), alpha)
                a = alpha.astype(np.float32)[..., None] / 255
                matted = np.round((rgb.astype(np.float32) / 255 * a + bg * (1 - a)) * 255).astype(np.uint8)
                key = sample_key(store.person, s)
                meta = {"person": store.person, "sequence": s.sequence, "timestep": s.timestep, "serial": s.serial,
                        "split": s.split, "K": cam.K.tolist(), "world_to_cam": cam.world_to_cam.tolist(),
                        "width": cam.width, "height": cam.height, "canonical_bounds": bounds,
                        "ambient_bounds": store.attrs["ambient_bounds"],
                        "background": list(config.background)}
                members = encode_sample(matted, alpha, buf.mask.numpy(), buf.depth.numpy(), buf.attributes.numpy(),
                                        buf.normals.numpy(), np.asarray(expr), meta)
                spans = {}
                for ext in MEMBERS:
                    spans[ext] = _tar_member(tar, f"{key}.{ext}", members[ext])
                index.append((key, spans))
                keys.append(key)
        data_hash = hashlib.sha256(tmp.read_bytes()).hexdigest()
        st = tmp.stat()  # the rename keeps size and mtime: what `verified.json` and the member index record
    write_index(path, st, index)  # after the shard: an index is never trusted for a file it was not written for
    return {"split": task.split, "samples": len(keys), "bytes": st.st_size, "sha256": data_hash, "spec": task.spec,
            "first_key": keys[0], "last_key": keys[-1], _MTIME: st.st_mtime_ns}


_NEW, _CHANGED = "not written yet", "inputs or settings changed"
#: Key of `write_shard`'s entry that goes to `verified.json`, not to the manifest.
_MTIME = "mtime_ns"


class Staleness(NamedTuple):
    """`_stale_reason`'s verdict on one shard."""

    reason: str | None
    """Why the shard must be (re)written; None: it is up to date."""
    record: dict | None
    """Its new `verified.json` record when it was hashed now (and matched)."""
    indexed: bool
    """An up-to-date shard whose member index is (re)written (it had none, or it was hashed now)."""


def _stale_reason(task: ShardTask, manifest: dict, verified: dict[str, dict], verify_all: bool = False,
                  write_index: bool = True) -> Staleness:
    """Whether `task`'s shard must be (re)written, and why. Up to date: the manifest lists it with the same spec, no
    reader marked it corrupt, its size matches and either its size and mtime match its `verified.json` record (not
    read) or its sha256 matches (hashed: a shard copied or touched since, or any with `verify_all`). An up-to-date
    shard without a member index, or hashed now, is indexed (`_reindexed`; with ``write_index`` False its tar
    headers are walked and nothing is written), and rebuilt only when that walk finds it damaged."""
    entry = manifest.get("shards", {}).get(task.name)
    if not entry:
        return Staleness(_NEW, None, False)
    if entry.get("spec") != task.spec:
        return Staleness(_CHANGED, None, False)
    path = Path(task.out_dir) / task.name
    mark = corrupt_mark(path)
    if mark is not None:
        return Staleness(f"a reader found it corrupt ({corrupt_marker(path).name}): {mark}", None, False)
    problem, record = check_shard(path, entry, verified.get(task.name), full=verify_all)
    indexed = problem is None and (record is not None or not index_path(path).exists())
    if indexed:
        problem = _reindexed(path, write_index)
    return Staleness(problem, record, indexed) if problem is None else Staleness(problem, None, False)


#: `_stale_reason`'s reasons that rebuild a shard from other inputs than the ones its manifest entry records.
NEW_INPUTS = (_NEW, _CHANGED)


def _reindexed(path: Path, write: bool = True) -> str | None:
    """Writes (with ``write``) the member index of an up-to-date shard that has none (written by an older version)
    or whose mtime changed (it was hashed now: copied or touched, so its index is stale) from its tar headers, so
    that the loader's opens need not walk them (and a training folder that is read-only gets them). Returns why the
    shard must be rebuilt when the walk finds it damaged (a tar header), else None (a folder that cannot be written
    only warns: the loader walks the headers then)."""
    try:
        st = shard_stat(path)
        samples = walk_shard(path, st)
    except ShardError as e:
        return e.problem
    if not write:
        return None
    try:
        write_index(path, st, samples)
    except OSError as e:
        warnings.warn(f"{path}: its member index could not be written ({e}); the loader reads its tar headers "
                      "instead", RuntimeWarning, stacklevel=2)
    return None


@dataclass
class ShardPlan:
    """What `write_shards` does with each person's shards, decided before it writes any (`plan_shards`)."""

    config: ShardConfig
    out_dir: Path
    tasks: dict[str, list[ShardTask]] = field(default_factory=dict)
    """person -> its shards, in order."""
    failed: dict[str, str] = field(default_factory=dict)
    """person -> why its shards cannot be planned (a broken or misnamed store)."""
    manifests: dict[str, dict] = field(default_factory=dict)
    """person -> its manifest as found."""
    verified: dict[str, dict[str, dict]] = field(default_factory=dict)
    """person -> its `verified.json` records as found."""
    stale: dict[tuple[str, str], Staleness] = field(default_factory=dict)
    """(person, shard name) -> its verdict."""

    def kept(self, person: str) -> dict[str, dict]:
        """The manifest entries of ``person``'s shards that are up to date."""
        wanted = {t.name for t in self.tasks[person]}
        return {k: v for k, v in self.manifests[person].get("shards", {}).items()
                if k in wanted and self.stale[(person, k)].reason is None}

    def records(self, person: str) -> dict[str, dict]:
        """``person``'s `verified.json` records once its up-to-date shards are known: those hashed now replace theirs,
        those of stale shards go."""
        return {k: r for k in self.kept(person)
                if (r := self.stale[(person, k)].record or self.verified[person].get(k)) is not None}

    def leftovers(self, person: str) -> list[Path]:
        """Shards of an earlier, larger plan (a glob would read them) and the markers and indexes of shards that are
        no longer planned: removed by the write."""
        pdir = self.out_dir / person
        if not pdir.is_dir():
            return []
        wanted = {t.name for t in self.tasks[person]}
        old = [path for path in pdir.glob("*.tar") if path.name not in wanted]
        for suffix in (CORRUPT_SUFFIX, INDEX_SUFFIX):
            old += [m for m in pdir.glob("*.tar" + suffix) if m.name.removesuffix(suffix) not in wanted]
        return old

    def same_manifest(self, person: str) -> bool:
        """Whether ``person``'s manifest after the write is the one on disk now: no shard is new or of another spec
        (one rebuilt from its recorded spec comes out with the bytes its entry lists: same inputs, same bytes) and
        nothing else in it changes. What every fingerprint of the person's data (its training data digest, the tiny
        base's key, its evaluation key) is computed from."""
        if any(self.stale[(person, t.name)].reason in NEW_INPUTS for t in self.tasks[person]):
            return False
        found = self.manifests[person]
        after = _finish_manifest({"person": person, "config": asdict(self.config),
                                  "shards": dict(found.get("shards", {}))}, self.tasks[person])
        return json.loads(json.dumps(after)) == found


def plan_shards(store_paths: list[Path], out_dir: Path, config: ShardConfig, workers: int = 1,
                verify_all: bool = False, write_index: bool = True) -> ShardPlan:
    """Which of every person's shards are up to date (`_stale_reason`; threads: the few that are hashed release the
    GIL). With ``write_index`` False nothing is written (`launch_all --dry-run`); otherwise the member index of an
    up-to-date shard that needs one is written on the way."""
    out_dir = Path(out_dir)
    plan = ShardPlan(config, out_dir)
    for sp in store_paths:
        person = Path(sp).name[: -len(".zarr")] if Path(sp).name.endswith(".zarr") else Path(sp).stem
        try:
            plan.tasks[person] = plan_person(Path(sp), out_dir, config)
        except DataError as e:
            plan.failed[person] = str(e)
    for person in list(plan.tasks):
        try:
            plan.manifests[person] = load_manifest(out_dir / person / MANIFEST)
        except ShardError as e:  # a manifest of another shape: not overwritten unread, its person fails alone
            plan.failed[person] = str(e)
            del plan.tasks[person]
    plan.verified = {p: load_verified(out_dir / p) for p in plan.tasks}
    checks = [(person, t) for person, tasks in plan.tasks.items() for t in tasks]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        found = list(pool.map(lambda pt: _stale_reason(pt[1], plan.manifests[pt[0]], plan.verified[pt[0]],
                                                       verify_all, write_index), checks))
    plan.stale = {(p, t.name): verdict for (p, t), verdict in zip(checks, found)}
    return plan


@dataclass
class ShardRunResult:
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    rebuilt: dict[str, str] = field(default_factory=dict)  # "<person>/<shard>" -> why the existing file was rejected
    failed: dict[str, str] = field(default_factory=dict)  # person -> error (its other shards may exist)


#: Held in the shard root while `write_shards` runs (`common.locks.exclusive`): a second preprocess on it (a
#: `jobs/preprocess.py` of a user beside the main job's data stage) is refused (`common.locks.AlreadyRunning`).
#: Each run plans from the manifests and shards it finds and then writes whole manifests and `verified.json`
#: files from what it planned, so two at once each overwrote the other's shards, manifest entries and records:
#: both ended "written", with a complete manifest listing shards that are not on disk as listed.
LOCK_FILE = ".preprocess.lock"


def write_shards(store_paths: list[Path], out_dir: Path, config: ShardConfig, workers: int = 1,
                 progress: bool = True, verify_all: bool = False,
                 item_timeout_s: float | None = None) -> ShardRunResult:
    """Write the shards of every person (parallel over shards of all persons); resumable.

    A person whose store or images are broken is recorded in `result.failed` (its
    manifest stays incomplete, so training refuses it) and the others are finished.
    Existing shards are kept when up to date (`_stale_reason`: by size and mtime, hashed when
    the mtime changed; `verify_all` hashes every one). A shard still being written after
    `item_timeout_s` fails its person (`common.process_pool.ItemTimedOut`; its process killed).
    Another preprocess running on `out_dir` is `common.locks.AlreadyRunning` (`LOCK_FILE`), before anything is
    read or written; so is an ingest running into a folder of `store_paths` (`STORES_LOCK_FILE`, held shared for
    the whole run: other preprocesses may read the same stores into other shard roots). The locks are taken in
    one order, the shard root's and then each store folder's (sorted), none of them waited for: a run refused
    never holds up another.
    """
    out_dir = Path(out_dir)
    folders = sorted({Path(sp).parent.resolve() for sp in store_paths if Path(sp).parent.is_dir()})
    with contextlib.ExitStack() as held:
        held.enter_context(exclusive(out_dir / LOCK_FILE,
                                     "a shard preprocess (jobs/preprocess.py, or the main job's data stage)"))
        for folder in folders:  # a folder that is not there has no store to read: its persons fail as missing
            held.enter_context(exclusive(folder / STORES_LOCK_FILE, INGEST_WHAT, shared=True))
        return _write_shards(store_paths, out_dir, config, workers, progress, verify_all, item_timeout_s)


def _write_shards(store_paths: list[Path], out_dir: Path, config: ShardConfig, workers: int, progress: bool,
                  verify_all: bool, item_timeout_s: float | None) -> ShardRunResult:
    result = ShardRunResult()
    plan = plan_shards(store_paths, out_dir, config, workers, verify_all)
    for person, error in plan.failed.items():
        result.failed[person] = error
        try:
            _mark_failed(out_dir / person / MANIFEST, error)
        except OSError as e:  # its folder cannot be written: said, and the others go on
            result.failed[person] = f"{error}; its manifest could not be marked incomplete ({e})"
    tasks_by_person, manifests, verified = plan.tasks, dict(plan.manifests), dict(plan.verified)
    todo = []
    for person, tasks in tasks_by_person.items():
        manifests[person] = {"person": person, "config": asdict(config), "shards": plan.kept(person)}
        try:  # a person's folder that cannot be written (its permissions, a read-only copy) fails that person alone
            records = plan.records(person)
            if records != verified[person]:
                write_verified(out_dir / person, records)
            verified[person] = records
            for old in plan.leftovers(person):
                old.unlink(missing_ok=True)
            _write_manifest(out_dir, person, manifests[person], tasks)
        except OSError as e:
            result.failed[person] = f"{type(e).__name__}: {e}"
            continue
        for t in tasks:
            reason = plan.stale[(person, t.name)].reason
            if reason is None:
                result.skipped.append(f"{person}/{t.name}")
                continue
            if reason not in NEW_INPUTS:  # the file on disk is damaged
                result.rebuilt[f"{person}/{t.name}"] = reason
            todo.append((person, t))

    def done(person: str, task: ShardTask, entry: dict) -> None:
        entry = dict(entry)
        mtime_ns = entry.pop(_MTIME)
        manifests[person]["shards"][task.name] = entry
        _write_manifest(out_dir, person, manifests[person], tasks_by_person[person])
        verified[person][task.name] = {"bytes": entry["bytes"], "mtime_ns": mtime_ns, "sha256": entry["sha256"]}
        write_verified(out_dir / person, verified[person])
        corrupt_marker(Path(task.out_dir) / task.name).unlink(missing_ok=True)  # the shard it condemned is gone
        result.written.append(f"{person}/{task.name}")

    def failed(person: str, error: Exception) -> None:
        result.failed.setdefault(person, f"{type(error).__name__}: {error}")
        # the manifest says why it is incomplete, so training's refusal names the sample (not "interrupted?")
        manifests[person].setdefault("failed", result.failed[person])
        _write_manifest(out_dir, person, manifests[person], tasks_by_person[person])

    bar = tqdm(total=len(todo), desc="shards", unit="shard", disable=not progress)
    person_of = {t: person for person, t in todo}

    def finished(task: ShardTask, entry: dict | None, error: Exception | None) -> None:
        person = person_of[task]
        try:
            if error is None:
                done(person, task, entry)
            else:  # one person's broken input, or a worker that died on it, must not stop the others
                failed(person, error)
        except OSError as e:  # nor its folder that cannot be written (its manifest, `verified.json`)
            result.failed.setdefault(person, f"{type(e).__name__}: {e}")
        bar.update()

    def rerun(unfinished: list[ShardTask]) -> None:
        bar.write(f"shards: a worker process died or none finished within the time limit; writing "
                  f"{len(unfinished)} shards again, one process each")

    map_tolerant(partial(write_shard, config=config), [t for _, t in todo], workers, finished,
                 name=lambda t: f"{person_of[t]}/{t.name}", on_rerun=rerun, timeout_s=item_timeout_s)
    bar.close()
    return result


def _finish_manifest(manifest: dict, tasks: list[ShardTask]) -> dict:
    """``manifest`` (changed in place) with its shards in plan order, whether it is complete and its counts."""
    shards = manifest["shards"]
    order = [t.name for t in tasks if t.name in shards]
    manifest["shards"] = {k: shards[k] for k in order}
    manifest["complete"] = len(order) == len(tasks)
    manifest["counts"] = {s: sum(v["samples"] for v in manifest["shards"].values() if v["split"] == s) for s in SPLITS}
    return manifest


def _write_manifest(out_dir: Path, person: str, manifest: dict, tasks: list[ShardTask]) -> None:
    atomic_write_json(out_dir / person / MANIFEST, _finish_manifest(manifest, tasks))


def _mark_failed(path: Path, reason: str) -> None:
    """Marks the manifest at `path` (if any) incomplete: shards made from inputs that are now broken are no longer
    known to be theirs, so training must refuse them, not take the last run's as up to date."""
    try:
        manifest = load_manifest(path)
    except ShardError:  # of another shape: every reader refuses it already
        return
    if manifest:
        atomic_write_json(path, {**manifest, "complete": False, "failed": reason})


def _complete_manifest(shard_dir: Path, person: str) -> dict:
    """``person``'s shard manifest, which must be complete (else the error saying why not)."""
    mpath = Path(shard_dir) / person / MANIFEST
    manifest = load_manifest(mpath)
    if not manifest:
        raise DataError(mpath, "shard manifest is missing or unreadable; run jobs/preprocess.py")
    if not manifest.get("complete"):
        why = f"the last preprocess failed: {manifest['failed']}" if manifest.get("failed") else \
            "an interrupted preprocess?"
        raise DataError(mpath, f"shards are incomplete ({why}); re-run jobs/preprocess.py")
    return manifest


def split_digest(shard_dir: Path, person: str, split: str) -> str:
    """sha256 over the name and sha256 of every shard of ``person``'s ``split`` in its manifest (which must be
    complete): what a training run reads. Another held-out split, other images or other preprocessing settings
    give another digest, so an avatar is known to be trained on the data it is evaluated against."""
    entries = _complete_manifest(shard_dir, person)["shards"]
    listed = sorted((name, e["sha256"]) for name, e in entries.items() if e["split"] == split)
    return hashlib.sha256(json.dumps(listed).encode()).hexdigest()


def shard_paths(shard_dir: Path, person: str, split: str) -> list[Path]:
    """The shards of one person and split listed by its manifest (error if incomplete)."""
    manifest = _complete_manifest(shard_dir, person)
    return [Path(shard_dir) / person / name for name, e in manifest["shards"].items() if e["split"] == split]
