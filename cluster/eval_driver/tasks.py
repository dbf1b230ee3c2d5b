"""The frames of each evaluation task (data only: no Ray, no model).

* ``self_reenactment``: the person's held-out sequences seen from the held-out (frontal)
  camera; conditioning and ground truth straight from the person's ``test_seq`` shards.
* ``novel_view``: the training sequences seen from the held-out camera (``test_cam`` shards).
* ``cross_reenactment``: person A's avatar driven by person B's expression codes on B's
  held-out sequences, seen from A's held-out camera. The driving meshes (A's face making B's
  expressions) exist only for synthetic captures: A's generator (``synthetic.json`` in A's
  capture folder) gives A's true mesh for any code, then the same smoothing + noise as the
  capture's "fitted" meshes; the canonical coordinates are normalised with A's bounds like
  the store does, and the buffers are rasterized at A's held-out camera and resized to the
  model resolution exactly like the shard loader does. There is no ground truth; the left
  video panel shows B's driving frame instead.

Every task is a list of clips (one per sequence, frames in time order); one clip is one
video for the metrics (JOD is a per-video score), and the clips are concatenated in the mp4.
A task holds its clips' keys only: a clip's frames are read when it is rendered
(:meth:`LazyClip.load`), so the evaluation holds a few clips of a person at a time, not its
whole evaluation set (at 512 px ~15 MB a frame: a real person's thousands of held-out and
novel-view frames were tens of GB in the driver's memory).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from avatars.data import LoaderConfig, ShardDataset
from cluster.report import TaskResult
from common.io import DataError
from shards.codec import normalise_canonical
from shards.raster import rasterize
from shards.store import PersonStore
from shards.writer import MANIFEST, shard_paths

TASKS = ("self_reenactment", "novel_view", "cross_reenactment")
_KEY = re.compile(r"^(?P<person>[^/]+)/(?P<seq>.+)/frame_(?P<t>\d+)/cam_(?P<serial>[^/]+)$")
CONDITIONING = ("mask", "depth", "normals", "canonical", "expression")


class TaskSkipped(Exception):
    """A task that cannot run for this person (the message says why); not a failure of the person."""


@dataclass
class Clip:
    """One continuous sequence: per-frame conditioning (channel-first float32) and reference frames.

    reference: (T, H, W, 3) float32 in [0, 1]: ground truth, or B's driving frames (cross-reenactment).
    alpha: (T, H, W) ground-truth foreground (masked metrics), None without ground truth.
    """

    sequence: str
    keys: list[str]
    conditioning: list[dict[str, np.ndarray]]
    reference: np.ndarray
    alpha: np.ndarray | None

    @property
    def frames(self) -> int:
        return len(self.keys)

    def load(self) -> Clip:
        """This clip (its frames are read already)."""
        return self


@dataclass
class LazyClip:
    """A clip whose frames are read when :meth:`load` is called (a task's clips are loaded one at a time as they
    are rendered); ``keys`` are known before."""

    sequence: str
    keys: list[str]
    loader: Callable[[], Clip]

    @property
    def frames(self) -> int:
        return len(self.keys)

    def load(self) -> Clip:
        """Read the clip's frames (DataError when its data does not read)."""
        clip = self.loader()
        if clip.keys != self.keys:
            raise RuntimeError(f"clip {self.sequence} loaded {len(clip.keys)} frames other than its "
                               f"{len(self.keys)} planned ones")
        return clip


@dataclass
class TaskFrames:
    """Everything needed to render and evaluate one person on one task."""

    person: str
    task: str
    clips: list[Clip | LazyClip]
    has_ground_truth: bool
    driver: str | None = None
    """Whose expression codes drive the avatar (cross-reenactment)."""
    notes: list[str] = field(default_factory=list)

    @property
    def frames(self) -> int:
        return sum(c.frames for c in self.clips)

    def load_clips(self) -> list[Clip]:
        """Every clip's frames read at once (for small sets: benchmarks and tests; the evaluation loads one clip at a
        time)."""
        return [c.load() for c in self.clips]


def parse_key(key: str) -> tuple[str, str, int, str]:
    """'<person>/<seq>/frame_<t>/cam_<serial>' -> (person, seq, t, serial)."""
    m = _KEY.match(key)
    if not m:
        raise ValueError(f"sample key {key!r} does not look like <person>/<seq>/frame_<t>/cam_<serial>")
    return m["person"], m["seq"], int(m["t"]), m["serial"]


def open_store(stores: Path, person: str) -> PersonStore:
    path = Path(stores) / f"{person}.zarr"
    if not path.exists():
        raise DataError(path, f"zarr store of person {person} is missing; run jobs/ingest.py")
    return PersonStore(path)


def shard_clips(shards: Path, person: str, split: str, resolution: int, serial: str | None,
                sequence_order: list[str], max_frames: int | None = None) -> list[LazyClip]:
    """Clips (one per sequence) of a person's shard split, optionally only one camera, each of at most `max_frames`
    frames (its first ones; None: all); their frames are read when each is loaded."""
    paths = shard_paths(shards, person, split)
    if not paths:
        raise DataError(Path(shards) / person / MANIFEST, f"no '{split}' shards for person {person}")
    ds = ShardDataset(paths, LoaderConfig(resolution=resolution, augment=False, num_workers=0))
    picked: dict[str, list[tuple[int, int, str]]] = {}
    for i, (_, key, _) in enumerate(ds.index):
        _, seq, t, cam = parse_key(key)
        if serial is None or cam == serial:
            picked.setdefault(seq, []).append((t, i, key))
    order = {s: k for k, s in enumerate(sequence_order)}
    clips = []
    for seq in sorted(picked, key=lambda s: (order.get(s, len(order)), s)):
        frames = sorted(picked[seq])[:max_frames]
        clips.append(LazyClip(seq, [key for _, _, key in frames],
                              lambda seq=seq, index=[i for _, i, _ in frames]: _read_clip(ds, seq, index)))
    return clips


def _read_clip(ds: ShardDataset, sequence: str, index: list[int]) -> Clip:
    items = [ds[i] for i in index]
    return Clip(
        sequence=sequence,
        keys=[s["__key__"] for s in items],
        conditioning=[{k: s[k].numpy().astype(np.float32, copy=False) for k in CONDITIONING} for s in items],
        reference=np.stack([((s["image"] + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy() for s in items]),
        alpha=np.stack([s["alpha"][0].numpy() for s in items]),
    )


def self_reenactment(store: PersonStore, shards: Path, resolution: int, max_frames: int | None = None) -> TaskFrames:
    camera = store.attrs["held_out_camera"]
    clips = shard_clips(shards, store.person, "test_seq", resolution, camera, store.sequences, max_frames)
    if not clips:
        raise DataError(Path(shards) / store.person / MANIFEST,
                        f"no held-out sequence frames from the held-out camera {camera} in the test_seq shards")
    return TaskFrames(store.person, "self_reenactment", clips, True,
                      notes=[f"held-out sequences {', '.join(c.sequence for c in clips)} from camera {camera}"])


def novel_view(store: PersonStore, shards: Path, resolution: int, max_frames: int | None = None) -> TaskFrames:
    clips = shard_clips(shards, store.person, "test_cam", resolution, None, store.sequences, max_frames)
    if not clips:
        raise DataError(Path(shards) / store.person / MANIFEST, "the test_cam shards hold no frames")
    return TaskFrames(store.person, "novel_view", clips, True,
                      notes=[f"training sequences from the held-out camera {store.attrs['held_out_camera']}"])


def synthetic_config(store: PersonStore):
    """The SyntheticConfig a synthetic capture was generated with, or None for a real capture."""
    from shards.synthetic import SyntheticConfig

    marker = Path(store.attrs["source_root"]) / store.person / "synthetic.json"
    if not marker.is_file():
        return None
    try:
        spec = json.loads(marker.read_text())
        return SyntheticConfig(**spec["config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(marker, f"unreadable synthetic capture spec: {e}") from None


def nearest_resize(x: np.ndarray, size: int) -> np.ndarray:
    """(C, H, W) -> (C, size, size) nearest neighbour, the shard loader's sampling grid."""
    _, h, w = x.shape
    rows = np.minimum(((np.arange(size) + 0.5) * (h / size)).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size) + 0.5) * (w / size)).astype(np.int64), w - 1)
    return x[:, rows[:, None], cols[None, :]]


def driven_conditioning(store: PersonStore, person_model, synth, expression: np.ndarray, camera, resolution: int,
                        fit_seed: int) -> dict[str, np.ndarray]:
    """Conditioning buffers of `store.person`'s fitted mesh under `expression`, seen by `camera`."""
    from shards.synthetic import head as H

    true_v = person_model.true_vertices(expression)
    fitted = H.smooth_and_perturb(true_v, person_model.faces, np.random.default_rng(fit_seed), synth.fit_smoothing,
                                  synth.fit_noise).astype(np.float32)
    canonical = normalise_canonical(person_model.canonical(expression).astype(np.float32),
                                    store.attrs["canonical_bounds"], store.attrs["ambient_bounds"])
    buf = rasterize(torch.from_numpy(fitted), torch.from_numpy(person_model.faces).long(), camera,
                    attributes=torch.from_numpy(canonical), backend="cpu")
    mask = buf.mask.numpy()
    chans = {
        "mask": mask[None].astype(np.float32),
        "depth": buf.depth.numpy()[None],
        "normals": buf.normals.numpy().transpose(2, 0, 1),
        "canonical": buf.attributes.numpy().transpose(2, 0, 1),
    }
    out = {k: np.ascontiguousarray(nearest_resize(v, resolution), dtype=np.float32) for k, v in chans.items()}
    out["expression"] = np.asarray(expression, np.float32)
    return out


#: What a person's data that does not read raises (a missing or damaged store or shard): that task fails, or is
#: skipped when it is the cross-reenactment driver's data (:func:`driver_unusable`); anything else is a bug.
DATA_ERRORS = (DataError, FileNotFoundError, ValueError)


#: In the reason of a task skipped by :func:`driver_unusable` (found by :func:`waits_on_driver`).
DRIVER_UNUSABLE = "'s data is unusable ("


def driver_unusable(person: str, driver: str, error: Exception) -> TaskSkipped:
    """The driving person's own data does not read: `person`'s cross-reenactment is skipped, not failed (its
    avatar and data are fine); the driver's own tasks fail on that data and name it."""
    return TaskSkipped(f"cross-reenactment of {person} by {driver} is skipped: {driver}{DRIVER_UNUSABLE}{error})")


def waits_on_driver(result: TaskResult) -> bool:
    """The task was skipped by :func:`driver_unusable`: not up to date, since the driver's data may be repaired
    without changing what the evaluation key covers (its manifest and store metadata, not its shards' bytes)."""
    return not result.failed and DRIVER_UNUSABLE in result.skipped.get("task", "")


def cross_reenactment(store: PersonStore, driver_store: PersonStore, shards: Path, resolution: int,
                      driver_clips: list[Clip | LazyClip] | None = None, max_frames: int | None = None) -> TaskFrames:
    """`store.person`'s avatar driven by `driver_store.person`'s held-out expression codes."""
    from shards.synthetic.generate import PersonModel, stable_seed

    a, b = store.person, driver_store.person
    synth = synthetic_config(store)
    if synth is None:
        raise TaskSkipped(f"cross-reenactment of {a} needs driving meshes (the fitted mesh of {a} under {b}'s "
                          f"expression codes); {a} is not a synthetic capture (no "
                          f"{Path(store.attrs['source_root']) / a / 'synthetic.json'}), so it is skipped")
    if driver_store.expression_dim != store.expression_dim:
        raise TaskSkipped(f"cross-reenactment of {a} by {b}: expression codes differ in size "
                          f"({driver_store.expression_dim} vs {store.expression_dim})")
    if driver_clips is None:
        try:
            driver_clips = self_reenactment(driver_store, shards, resolution, max_frames).clips
        except DATA_ERRORS as e:
            raise driver_unusable(a, b, e) from None
    person_model = PersonModel.build(synth, a)
    held = store.attrs["held_out_camera"]
    camera = next((c for c in store.cameras if c.serial == held), None)
    if camera is None:
        raise DataError(store.path, f"held-out camera {held} is not among the store's cameras")

    def driven(driver_clip: Clip | LazyClip) -> Clip:
        try:
            clip = driver_clip.load()
        except DATA_ERRORS as e:  # the driver's frames do not read: its own tasks fail on them and name them
            raise TaskSkipped(str(driver_unusable(a, b, e))) from None
        cond = []
        for key, c in zip(clip.keys, clip.conditioning):
            _, seq, t, _ = parse_key(key)
            cond.append(driven_conditioning(store, person_model, synth, c["expression"], camera, resolution,
                                            stable_seed(synth.seed, a, "driven-by", b, seq, t, "fit")))
        return Clip(f"{b}:{clip.sequence}", [f"{a}<-{k}" for k in clip.keys], cond, clip.reference, None)

    clips = [LazyClip(f"{b}:{c.sequence}", [f"{a}<-{k}" for k in c.keys], lambda c=c: driven(c)) for c in driver_clips]
    return TaskFrames(a, "cross_reenactment", clips, False, driver=b,
                      notes=[f"{a}'s avatar driven by {b}'s held-out sequences, camera {held}"])
