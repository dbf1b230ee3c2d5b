"""When a person's evaluation is up to date, and reusing it.

An evaluation is a function of the trained avatar, the frozen base it renders on, the person's
evaluation data (and the cross-reenactment driver's), and the evaluation settings. Their
fingerprints make one key (:func:`evaluation_key`); results.json records the key of every
person it holds (``evaluations[person]["key"]``). A later run that computes the same key finds
the newest night (up to its own) holding it and reuses those numbers, videos and thumbnails
instead of rendering again (:func:`find_reusables`, :func:`adopt`); ``--force`` renders anyway.
Each night's key index (:data:`KEY_INDEX`, written with its results.json) lists those keys, so
that the lookup for all persons reads a night's per-frame numbers only when it holds one of them
(a night saved without the index, by an earlier version, is read once per run and indexed then).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.eval_driver.tasks import waits_on_driver
from cluster.report import RunResults, TaskResult
from cluster.report.schema import list_runs
from cluster.report.summary import read_stamped, results_stamp, write_if_unchanged
from common.fingerprint import file_digest, json_digest, tree_fingerprint
from common.io import DataError, atomic_file, atomic_write_json
from shards.ingest import CONTENT
from shards.writer import MANIFEST

if TYPE_CHECKING:
    from cluster.eval_driver.driver import EvalDriverConfig

log = logging.getLogger(__name__)

#: Bump when what an evaluation computes changes (metrics, videos): every stored key goes stale.
#: 2: frames with an empty mask leave the masked metrics (6fd0532); videos named by the key.
EVAL_FORMAT = 2
#: Beside each night's results.json: the keys of its reusable persons and the size and time of the results.json
#: they were read from (:func:`write_key_index`), so that finding reusable numbers does not read every night's
#: per-frame numbers (a night of 300 persons: 133 MB, seconds to read) for every person.
KEY_INDEX = "results.keys.json"
KEY_INDEX_VERSION = 1
#: Renderer fields that change where or how fast frames render, not what they show.
_SERVICE_FIELDS = {"batch_wait_timeout_s", "max_ongoing_requests", "num_replicas", "num_cpus", "num_gpus",
                   "metrics_port", "metrics_host", "metrics_targets_dir"}


def _optional_file(path: Path | None) -> str | None:
    return file_digest(path) if path is not None and Path(path).is_file() else None


def eval_format_label(config: EvalDriverConfig) -> str:
    """What a person's evaluation records as its format (``eval_format``): :data:`EVAL_FORMAT`, and the frames it
    scored when they were a subset (``--max-frames-per-clip``): the report names the nights of another format in
    the trend, whose numbers were computed otherwise."""
    if config.max_frames_per_clip is None:
        return str(EVAL_FORMAT)
    return f"{EVAL_FORMAT}, at most {config.max_frames_per_clip} frames per sequence"


def settings_digest(config: EvalDriverConfig) -> dict:
    """The evaluation settings that change its numbers or videos (``max_frames_per_clip`` only when set: the keys
    of the evaluations of every frame, stored before it existed, stay valid)."""
    renderer = {k: v for k, v in dataclasses.asdict(config.renderer).items() if k not in _SERVICE_FIELDS}
    if isinstance(renderer.get("pipeline"), dict):
        renderer["pipeline"].pop("compile_cache", None)  # where compiled code is kept, not what it renders
    lpips = {"lpips", "lpips_face"} & set(config.metrics)  # both use the LPIPS weights
    settings = {
        "tasks": list(config.tasks), "metrics": list(config.metrics), "seed": config.seed, "renderer": renderer,
        "fps": config.fps, "video_min_seconds": config.video_min_seconds, "video_min_fps": config.video_min_fps,
        "eval_device": config.eval_device,
        "lpips_weights": _optional_file(config.lpips_weights) if lpips else None,
        "landmark_model": _optional_file(config.landmark_model),
        "face_id_model": _optional_file(config.face_id_model),
    }
    if config.max_frames_per_clip is not None:
        settings["max_frames_per_clip"] = config.max_frames_per_clip
    return settings


def data_digest(shards: Path, stores: Path, person: str) -> str:
    """The person's shards (their manifest lists every shard's sha256) and zarr store: its content identity
    (`shards.ingest.CONTENT`, in its root metadata), so a store ingested again from a capture touched, copied
    without mtimes or moved keeps the person's evaluation key. A store written before stores recorded one is
    keyed by its root metadata's bytes (which hold the ingest's stat fingerprint), the key it had."""
    manifest = Path(shards) / person / MANIFEST
    store_meta = Path(stores) / f"{person}.zarr" / "zarr.json"
    for path in (manifest, store_meta):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
    meta = store_meta.read_bytes()
    try:
        content = json.loads(meta).get("attributes", {}).get(CONTENT)
    except (ValueError, AttributeError):  # not a JSON object: keyed by its bytes, and its reader says what is wrong
        content = None
    if isinstance(content, str):
        return json_digest({"manifest": file_digest(manifest), "store_content": content})
    return json_digest({"manifest": file_digest(manifest), "store": file_digest(store_meta)})


def model_base(model_dir: Path, override: Path | None = None) -> Path | None:
    """The base model directory an avatar renders on: ``override`` or the one it recorded."""
    if override is not None:
        return Path(override)
    meta = json.loads((Path(model_dir) / "config.json").read_text())
    return Path(meta["base_model"]) if meta.get("base_model") else None


def _base_fingerprint(base: Path | None, cache: dict[Path, str]) -> str | None:
    """Fingerprint of a base folder, hashed once per evaluation run (every person shares it)."""
    if base is None:
        return None
    if base not in cache:
        cache[base] = tree_fingerprint(base)
    return cache[base]


def base_problem(config: EvalDriverConfig, person: str, cache: dict[Path, str] | None = None) -> str | None:
    """Why the person's avatar must not be rendered on the base it would render on (its
    recorded base or ``--renderer.base-model``): the base's content is not the one the avatar
    was trained on. None when it is, or when the model recorded no fingerprint (saved outside
    the trainer)."""
    model_dir = Path(config.runs) / person / "model"
    meta = json.loads((model_dir / "config.json").read_text())
    trained_on = meta.get("base_fingerprint")
    if trained_on is None:
        return None
    base = model_base(model_dir, config.renderer.base_model)
    if base is None or not base.is_dir():
        return f"the base it was trained on ({meta.get('base_model')}) is gone: retrain it"
    now = _base_fingerprint(base, {} if cache is None else cache)
    if now != trained_on:
        return (f"trained on a base with fingerprint {trained_on[:12]}, but {base} now holds {now[:12]}: "
                f"not rendered on a base it was not trained on; retrain it (launch_all does) or restore that base")
    return None


def evaluation_key(config: EvalDriverConfig, person: str, driver: str | None,
                   cache: dict[Path, str] | None = None) -> str:
    """sha256 of everything the person's evaluation depends on; raises OSError / ValueError when
    a part is missing (the person is then rendered, and fails there with the reason)."""
    model_dir = Path(config.runs) / person / "model"
    base = model_base(model_dir, config.renderer.base_model)
    parts = {
        "format": EVAL_FORMAT,
        "model": tree_fingerprint(model_dir),
        "base": _base_fingerprint(base, {} if cache is None else cache),
        "data": data_digest(config.shards, config.stores, person),
        "driver": None,
        "settings": settings_digest(config),
    }
    if driver is not None and "cross_reenactment" in config.tasks:
        parts["driver"] = {"person": driver, "data": data_digest(config.shards, config.stores, driver)}
    return json_digest(parts)


def media_files(tasks: dict[str, TaskResult]) -> list[str]:
    """The videos and thumbnails (paths relative to the night folder) that a person's task results refer to."""
    return [f for r in tasks.values() for f in (r.video, r.thumbnail) if f]


def _reusable_key(night: RunResults, person: str) -> str | None:
    """``person``'s key in ``night`` when a later run with that key may reuse its stored evaluation: it has one,
    and none of its tasks failed or was skipped for its driver's unusable data (a corrupt shard repaired since is
    not up to date: the key does not cover it; a run before failures were not keyed stored keys beside them)."""
    key = night.evaluations.get(person, {}).get("key")
    if key is None or person not in night.persons:
        return None
    if any(t.failed or waits_on_driver(t) for t in night.persons[person].values()):
        return None
    return key


def reusable_keys(night: RunResults) -> dict[str, str]:
    """person -> key of each person of ``night`` whose evaluation may be reused (see :func:`_reusable_key`)."""
    return {p: k for p in night.evaluations if (k := _reusable_key(night, p)) is not None}


def _reusable(run: RunResults, folder: Path, person: str, key: str) -> bool:
    """``person`` of the night ``run`` (in ``folder``) was evaluated with ``key``, may be reused and its videos and
    thumbnails are all there."""
    return _reusable_key(run, person) == key and all((folder / f).is_file() for f in media_files(run.persons[person]))


def write_key_index(results_path: Path, night: RunResults, stamp: dict[str, int] | None = None) -> None:
    """Write the key index of the night ``night`` that ``results_path`` holds (:data:`KEY_INDEX`, beside it, after
    it): its reusable persons' keys (:func:`reusable_keys`) and the stamp of the results.json they were read from
    (default: its stamp now), so that finding reusable numbers (:func:`find_reusables`) reads this small file
    instead of the night's per-frame numbers. Written after results.json: a run killed between the two leaves an
    index whose stamp does not match, which is ignored."""
    stamp = results_stamp(results_path) if stamp is None else stamp
    atomic_write_json(Path(results_path).with_name(KEY_INDEX),
                      {"version": KEY_INDEX_VERSION, "results": stamp, "keys": reusable_keys(night)})


def read_key_index(results_path: Path) -> dict[str, str] | None:
    """person -> key of the reusable persons of the night ``results_path`` (see :func:`write_key_index`), or None
    when the night has no usable index: none (a night saved by a version without it), one that does not match
    results.json (rewritten since) or one that does not read (with a warning); the night is then read in full."""
    obj = read_stamped(results_path, KEY_INDEX, KEY_INDEX_VERSION, "key index")
    if obj is None:
        return None
    keys = obj.get("keys")
    if not isinstance(keys, dict) or not all(isinstance(p, str) and isinstance(k, str) for p, k in keys.items()):
        log.warning("%s: malformed key index (expected 'keys': {person: key}); reading %s in full",
                    Path(results_path).with_name(KEY_INDEX), results_path)
        return None
    return keys


def find_reusables(reports_root: Path, run_date: str, wanted: dict[str, str],
                   index: bool = True) -> dict[str, tuple[RunResults, Path]]:
    """For each person of ``wanted`` (person -> its evaluation key now): the newest night up to ``run_date`` whose
    results hold it evaluated with that key, reusable (:func:`reusable_keys`) and with its videos and thumbnails
    all there, as (that night's results of the persons found in it, the night's folder); persons with none are
    left out. Each night is looked up once for all persons, newest first, until every person is found: through
    its key index (:data:`KEY_INDEX`) when it has one that matches, and read in full only when it holds a wanted
    key (or has no index: it then gets one, unless ``index`` is False: nothing is written, as for
    ``launch_all --dry-run``). A night that does not read is skipped with a warning."""
    found: dict[str, tuple[RunResults, Path]] = {}
    for path in reversed(list_runs(reports_root)):
        left = {p: k for p, k in wanted.items() if p not in found}
        if not left:
            break
        if path.parent.name > run_date:
            continue
        keys = read_key_index(path)
        if keys is not None and not any(keys.get(p) == k for p, k in left.items()):
            continue
        try:
            stamp = results_stamp(path) if keys is None else None
            run = RunResults.load(path)
        except (DataError, OSError) as e:
            log.warning("not reusing results from %s: %s", path, e)
            continue
        if stamp is not None and index:  # read in full: indexed, so that later runs need not read it again
            write_if_unchanged(path, stamp, lambda: write_key_index(path, run, stamp), "key index")
        hits = [p for p, k in left.items() if _reusable(run, path.parent, p, k)]
        if hits:  # only theirs are kept: a night of 300 persons' per-frame numbers is hundreds of MB in memory
            part = RunResults(run.run_date, {p: run.persons[p] for p in hits}, dict(run.meta),
                              {p: run.evaluations[p] for p in hits})
            found.update({p: (part, path.parent) for p in hits})
    return found


def _link_or_copy(src: Path, dst: Path) -> None:
    with atomic_file(dst) as tmp:
        try:
            os.unlink(tmp)
            os.link(src, tmp)  # same file system: no copy
        except OSError:
            shutil.copyfile(src, tmp)


def adopt(run: RunResults, folder: Path, person: str, into: Path) -> tuple[dict[str, TaskResult], dict[str, str]]:
    """``person``'s tasks and provenance from ``run`` (in ``folder``), with its videos and
    thumbnails linked (or copied) into the night folder ``into`` when that is another night."""
    tasks = run.persons[person]
    if Path(folder).resolve() != Path(into).resolve():
        for rel in media_files(tasks):
            _link_or_copy(Path(folder) / rel, Path(into) / rel)
    provenance = dict(run.evaluations[person])
    if run.run_date != Path(into).name:
        provenance["reused_from"] = run.run_date
    return tasks, provenance
