"""When a person's evaluation is up to date, and reusing it.

An evaluation is a function of the trained avatar, the frozen base it renders on, the person's
evaluation data (and the cross-reenactment driver's), and the evaluation settings. Their
fingerprints make one key (:func:`evaluation_key`); results.json records the key of every
person it holds (``evaluations[person]["key"]``). A later run that computes the same key finds
the newest night (up to its own) holding it and reuses those numbers, videos and thumbnails
instead of rendering again (:func:`find_reusable`, :func:`adopt`); ``--force`` renders anyway.
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
from common.fingerprint import file_digest, json_digest, tree_fingerprint
from common.io import DataError, atomic_file
from shards.writer import MANIFEST

if TYPE_CHECKING:
    from cluster.eval_driver.driver import EvalDriverConfig

log = logging.getLogger(__name__)

#: Bump when what an evaluation computes changes (metrics, videos): every stored key goes stale.
#: 2: frames with an empty mask leave the masked metrics (6fd0532); videos named by the key.
EVAL_FORMAT = 2
#: Renderer fields that change where or how fast frames render, not what they show.
_SERVICE_FIELDS = {"batch_wait_timeout_s", "max_ongoing_requests", "num_replicas", "num_cpus", "num_gpus",
                   "metrics_port", "metrics_host"}


def _optional_file(path: Path | None) -> str | None:
    return file_digest(path) if path is not None and Path(path).is_file() else None


def settings_digest(config: EvalDriverConfig) -> dict:
    """The evaluation settings that change its numbers or videos."""
    renderer = {k: v for k, v in dataclasses.asdict(config.renderer).items() if k not in _SERVICE_FIELDS}
    if isinstance(renderer.get("pipeline"), dict):
        renderer["pipeline"].pop("compile_cache", None)  # where compiled code is kept, not what it renders
    lpips = {"lpips", "lpips_face"} & set(config.metrics)  # both use the LPIPS weights
    return {
        "tasks": list(config.tasks), "metrics": list(config.metrics), "seed": config.seed, "renderer": renderer,
        "fps": config.fps, "video_min_seconds": config.video_min_seconds, "video_min_fps": config.video_min_fps,
        "eval_device": config.eval_device,
        "lpips_weights": _optional_file(config.lpips_weights) if lpips else None,
        "landmark_model": _optional_file(config.landmark_model),
        "face_id_model": _optional_file(config.face_id_model),
    }


def data_digest(shards: Path, stores: Path, person: str) -> str:
    """The person's shards (their manifest lists every shard's sha256) and zarr store (its root
    metadata holds the ingest fingerprint of the capture)."""
    manifest = Path(shards) / person / MANIFEST
    store_meta = Path(stores) / f"{person}.zarr" / "zarr.json"
    for path in (manifest, store_meta):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
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


def find_reusable(reports_root: Path, run_date: str, person: str, key: str) -> tuple[RunResults, Path] | None:
    """The newest night up to ``run_date`` whose results hold ``person`` evaluated with ``key``, none of
    its tasks failed or was skipped for its driver's unusable data (a corrupt shard repaired since is not up
    to date: the key does not cover it) and whose videos and thumbnails of it are all there; (its results, its
    folder) or None."""
    for path in reversed(list_runs(reports_root)):
        if path.parent.name > run_date:
            continue
        try:
            run = RunResults.load(path)
        except DataError as e:
            log.warning("not reusing results from %s: %s", path, e)
            continue
        if run.evaluations.get(person, {}).get("key") != key or person not in run.persons:
            continue
        # stored by a run before failures (or skips for a driver's unusable data) were not keyed
        if any(t.failed or waits_on_driver(t) for t in run.persons[person].values()):
            continue
        if all((path.parent / f).is_file() for f in media_files(run.persons[person])):
            return run, path.parent
    return None


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
