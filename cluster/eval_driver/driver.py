"""Nightly evaluation driver: render every person's evaluation set on the Serve renderer,
compute the metrics, write comparison videos, results.json and the HTML report.

    summary = run_evaluation(EvalDriverConfig(runs=..., shards=..., stores=..., reports_root=...))

One renderer application serves every person of the run (`cluster.serve.deployment`: each
replica loads a person's model on its first request, so a replica's start is paid once, not per
person). Per person (a thread each; `person.EvalRun`): build the task frames (see `tasks`), send
every frame as one request addressed to the person (`stream.BATCHES_IN_FLIGHT` batches of them in flight at a
time, so the replicas batch them; the next sent as one comes back), then evaluate and write
`<reports_root>/runs/<date>/videos/<person>/<task>-<key>.mp4`; the application is deleted at the end. The
metric networks load while Ray starts and the renderer deploys; one that does not load (`MetricsUnavailable`)
stops the run before the first person renders.
`parallel_persons` persons render at a time and one thread more runs, so that while a person's
frames are scored the next person's already render.
A person without a trained model, or whose data, model or rendering fails, is recorded as failed
in results.json with the reason; the others go on: a person whose model load or a frame does not come back
within `frame_timeout_s` fails with `FrameTimeout` (its frames cancelled), and the frames lost with a replica
that died are sent again once (`stream.REPLICA_LOST_RETRIES`; the person fails with `ReplicaLost` when they are
lost again). A person any of whose tasks failed (its data) is
failed too (the summary, the exit code), its other tasks keep their numbers. results.json (and its key index, see
`uptodate`) is written atomically while persons render, with those finished so far (about once a minute: a run
killed by its time limit keeps them, and the next run reuses them), and at the end; then the report is built.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import socket
import subprocess
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from avatars.evaluation.metric_names import DEFAULT_METRICS
from cluster.eval_driver.person import MODEL_DIR, EvalRun
from cluster.eval_driver.person import MetricsUnavailable as MetricsUnavailable  # public path
from cluster.eval_driver.person import merge_evaluations as merge_evaluations  # public path
from cluster.eval_driver.person import video_fps as video_fps  # public path
from cluster.eval_driver.tasks import TASKS, waits_on_driver
from cluster.eval_driver.uptodate import (
    adopt,
    base_problem,
    eval_format_label,
    evaluation_key,
    find_reusables,
    media_files,
    write_key_index,
)
from cluster.ray_connect import EmbeddedRay, connect_ray, leave_ray
from cluster.report import ReportConfig, RunResults, TaskResult, build_report, run_dir
from cluster.report.schema import EVAL_FORMAT_KEY, NIGHT_LOCK, check_person_name, parse_run_date
from cluster.serve.renderer import RendererConfig
from cluster.serve.renderer import device_problem as device_problem  # public path: --eval-device's check
from common.io import DataError
from common.locks import exclusive
from common.paths import LPIPS_WEIGHTS

log = logging.getLogger(__name__)
#: Ray refuses a smaller object store (ray_constants.OBJECT_STORE_MINIMUM_MEMORY_BYTES, 75 MiB) when it starts.
RAY_MIN_OBJECT_STORE_MB = 75
#: While persons render, the night's results.json is saved with those finished so far (`_Night.save_if_due`) when a
#: person finishes, at most once every SAVE_EVERY_S seconds and SAVE_COST_FACTOR times as long as the last save took
#: (a save reads and writes the whole night: seconds for 300 persons' per-frame numbers), so that a run killed before
#: its end loses at most about that much work and saving costs at most about a tenth of the run.
SAVE_EVERY_S = 60.0
SAVE_COST_FACTOR = 10.0


@dataclass
class EvalDriverConfig:
    """Inputs, outputs and options of one nightly evaluation."""

    runs: Path
    """Training runs root: `<runs>/<person>/model/` (DiffusionAvatarsModel.save_pretrained)."""
    shards: Path
    """Shard root `<shards>/<person>/{test_seq,test_cam}-*.tar` (conditioning + ground truth)."""
    stores: Path
    """Zarr store root `<stores>/<person>.zarr` (held-out camera, cameras, canonical bounds)."""
    reports_root: Path
    """Where `runs/<date>/results.json`, the videos and `site/<date>/index.html` go."""
    persons: tuple[str, ...] = ()
    """Persons to evaluate, each once; empty: every person folder under `runs` (a name results.json cannot hold,
    such as "000 copy", fails alone before anything renders)."""
    run_date: str | None = None
    """Night of the run (YYYY-MM-DD); None: today (local time)."""
    tasks: tuple[str, ...] = TASKS
    """Non-empty subset of self_reenactment, novel_view, cross_reenactment."""
    renderer: RendererConfig = field(default_factory=RendererConfig)
    """Renderer service (sampling steps, batching, replicas and their resources)."""
    seed: int = 0
    """Noise seed of every video (the same fixed noise for all frames, as in the paper)."""
    metrics: tuple[str, ...] = DEFAULT_METRICS
    """Metrics to compute (see avatars.evaluation.metric_names); masked variants are added. Empty: the comparison
    videos only. A metric whose package is not installed (jod: pyfvvdp, cvvdp: pycvvdp) is refused up front."""
    lpips_weights: Path = LPIPS_WEIGHTS
    """LPIPS AlexNet weights (see avatars.evaluation.lpips_weights; default: the checkout's weights/, by its
    absolute path, found from any working directory)."""
    landmark_model: Path | None = None
    """TorchScript landmark detector for AKD; None: AKD is skipped with the reason."""
    face_id_model: Path | None = None
    """TorchScript face-identity network for CSIM; None: CSIM is skipped with the reason."""
    fps: float = 24.0
    """Frame rate of the evaluation frames: the one JOD assumes and the one the comparison videos play at (the
    official evaluator's 24; NeRSemble's 73 fps, every 3rd frame)."""
    video_min_seconds: float = 6.0
    """Comparison videos play at `fps` unless that makes them shorter than this: then slower (down
    to `video_min_fps`), so the few frames of a short evaluation set can be watched; 0: no minimum."""
    video_min_fps: float = 4.0
    """Slowest frame rate of a comparison video (> 0 and at most `fps`)."""
    parallel_persons: int = 1
    """Persons rendered at the same time (threads sending to the one renderer application; give it
    as many replicas, `renderer.num_replicas`, to render them in parallel). One more person thread
    runs: a person's scoring (metrics, videos) does not hold up the next person's rendering."""
    frame_timeout_s: float = 3600.0
    """The longest the driver waits for a person's model to load on a replica, and for each of its frames (from
    when the frame before it came back; a window of a person's frames is in flight at once): a person whose model load
    or frame does not come back within it (a hung replica, a model load stuck on a dead file system) fails alone,
    naming it and the limit, its frames cancelled, and the other persons render on. The default covers a model's
    load and compile warm-up on GPU (minutes) and a batch queued behind another person's on a CPU replica."""
    eval_device: str = "cpu"
    """Torch device of the metric networks (LPIPS, JOD, face models) in the driver; one torch cannot parse is
    refused up front, one that is not there when the networks load stops the run before any person renders."""
    ray_address: str | None = None
    """Ray cluster to join ('auto' or host:port); None: the one in RAY_ADDRESS (inside `ray job submit`), else
    an embedded Ray in this process."""
    ray_num_cpus: int | None = None
    """Embedded Ray only: CPUs it offers (>= 1; None: all)."""
    ray_object_store_mb: int = 512
    """Embedded Ray only: object store size in MiB (at least Ray's minimum, 75)."""
    ray_bind_host: str = "127.0.0.1"
    """Embedded Ray only: the address its node and workers listen on (loopback: nothing reachable from the
    network; see cluster.bind)."""
    build_report: bool = True
    """Build `<reports_root>/site/<date>/index.html` after writing results.json."""
    force: bool = False
    """Render and score every person even when its stored evaluation is up to date (same model,
    base, data and settings; see cluster.eval_driver.uptodate)."""
    max_frames_per_clip: int | None = None
    """Score at most this many frames of each sequence, its first ones (a clip stays continuous, so JOD and the
    videos still see motion): a nightly check of many persons at a fraction of the cost (a real person's novel-view
    set is ~20 sequences x ~240 frames). None: every frame, the paper's protocol. Such a night's numbers are recorded
    as another evaluation format (``eval_format``: "<version>, at most N frames per sequence"), so the report names
    the nights of the trend that were computed otherwise."""

    def __post_init__(self) -> None:
        # refused here, when the command line is parsed (exit code 2), not after Ray started and persons rendered
        if not self.tasks:
            raise ValueError(f"--tasks names no task (every person would pass with nothing rendered); choose from "
                             f"{list(TASKS)} or leave the flag out for all of them")
        unknown = set(self.tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"--tasks: unknown tasks {sorted(unknown)}; choose from {list(TASKS)}")
        unknown = set(self.metrics) - set(DEFAULT_METRICS)
        if unknown:
            raise ValueError(f"--metrics: unknown metrics {sorted(unknown)}; choose from {list(DEFAULT_METRICS)}")
        for flag, values in (("--persons", self.persons), ("--tasks", self.tasks)):
            twice = sorted({v for v in values if values.count(v) > 1})
            if twice:  # rendered twice, a person by two threads at once writing the same videos
                raise ValueError(f"{flag} names {', '.join(twice)} more than once")
        for metric in self.metrics:
            if (why := metric_package_problem(metric)) is not None:
                raise ValueError(why)
        for flag, path, what in (("--landmark-model", self.landmark_model, "landmark detector for AKD"),
                                 ("--face-id-model", self.face_id_model, "face-identity network for CSIM")):
            if path is not None and (why := model_file_problem(Path(path), what)) is not None:
                raise ValueError(f"{flag} {path}: {why}")
        if (why := device_problem(self.eval_device)) is not None:
            raise ValueError(f"--eval-device {self.eval_device!r}: {why}")
        if not (math.isfinite(self.frame_timeout_s) and self.frame_timeout_s > 0):
            raise ValueError(f"--frame-timeout-s must be a number of seconds > 0, got {self.frame_timeout_s}")
        if self.parallel_persons < 1:
            raise ValueError(f"--parallel-persons must be >= 1, got {self.parallel_persons}")
        if self.max_frames_per_clip is not None and self.max_frames_per_clip < 1:
            raise ValueError(f"--max-frames-per-clip must be at least 1 (leave it out for every frame), got "
                             f"{self.max_frames_per_clip}")
        if not (math.isfinite(self.fps) and self.fps > 0 and math.isfinite(self.video_min_fps)
                and self.video_min_fps > 0):
            raise ValueError(f"fps ({self.fps}) and video_min_fps ({self.video_min_fps}) must be > 0")
        if self.video_min_fps > self.fps:  # the videos had played faster than --fps, not slower
            raise ValueError(f"--video-min-fps ({self.video_min_fps:g}) must be at most --fps ({self.fps:g}): it is "
                             "the slowest a comparison video plays when --video-min-seconds slows it down")
        if self.ray_num_cpus is not None and self.ray_num_cpus < 1:  # Ray failed or hung only after it started
            raise ValueError(f"--ray-num-cpus must be at least 1 (leave it out for all CPUs), got {self.ray_num_cpus}")
        if self.ray_object_store_mb < RAY_MIN_OBJECT_STORE_MB:
            raise ValueError(f"--ray-object-store-mb must be at least {RAY_MIN_OBJECT_STORE_MB} (Ray's minimum "
                             f"object store), got {self.ray_object_store_mb}")
        if (self.renderer.device != "auto" and torch_device_type(self.renderer.device) == "cuda"
                and self.renderer.num_gpus == 0):
            raise ValueError(f"--renderer.device {self.renderer.device} needs --renderer.num-gpus > 0: Ray reserves "
                             "no GPU for a replica that asks for none (it cannot load on a node without one, and "
                             "shares one unaccounted on a node with one); or --renderer.device auto")
        if not self.video_min_seconds >= 0:
            raise ValueError(f"video_min_seconds ({self.video_min_seconds}) must be >= 0 (0: no minimum)")
        if self.run_date is not None:  # a DataError, so a ValueError
            parse_run_date(self.run_date, "--run-date")


#: metric -> (the module it imports, what it is, how to install it): checked when the config is built, not after
#: every person rendered (avatars.evaluation.metrics imports them when the metric networks load)
METRIC_PACKAGES: dict[str, tuple[str, str, str]] = {
    "jod": ("pyfvvdp", "FovVideoVDP", "pip install pyfvvdp==1.2.2"),
    "cvvdp": ("pycvvdp", "ColorVideoVDP", "pip install cvvdp==0.5.7"),
    "lpips": ("lpips", "the LPIPS network", "pip install lpips"),
    "lpips_face": ("lpips", "the LPIPS network", "pip install lpips"),
}


def metric_package_problem(metric: str) -> str | None:
    """Why `metric` cannot be computed here (the package it needs is not installed), naming --metrics, or None.
    Looked up with importlib.util.find_spec: nothing is imported (pyfvvdp and pycvvdp must be imported in a
    particular way, see avatars.evaluation.metrics)."""
    import importlib.util
    import sys

    if metric not in METRIC_PACKAGES:
        return None
    module, what, install = METRIC_PACKAGES[metric]
    try:
        found = module in sys.modules or importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if found:
        return None
    return (f"--metrics {metric} needs {what} (the {module} package), which is not installed: {install}, "
            f"or drop {metric} from --metrics")


def model_file_problem(path: Path, what: str) -> str | None:
    """Why `path` cannot be the TorchScript `what` (missing, a folder, unreadable, not a torch.jit.save archive),
    or None. A cheap look at the file; whether it loads is known when the metric networks load."""
    import zipfile

    if not path.exists():
        return f"does not exist (a TorchScript {what}; leave the flag out to skip it)"
    if not path.is_file():
        return f"is not a file (a TorchScript {what})"
    try:
        with open(path, "rb") as f:
            archive = zipfile.is_zipfile(f)
    except OSError as e:
        return f"cannot be read: {e.strerror or e}"
    if not archive:
        return f"is not a TorchScript file (expected a {what} saved with torch.jit.save, a zip archive)"
    return None


def torch_device_type(device: str) -> str:
    """The type of a device torch parses ("cuda" of "cuda:1")."""
    import torch

    return torch.device(device).type


@dataclass
class EvalSummary:
    """What one evaluation run produced."""

    run_date: str
    results_path: Path
    report_index: Path | None
    persons: list[str]
    failed: dict[str, str]
    """person -> reason (no model, missing data, render error, a failed task)."""
    frames_rendered: int
    seconds: float
    person_seconds: dict[str, float]
    reused: list[str] = field(default_factory=list)
    """Persons whose evaluation was up to date: their stored numbers were reused, nothing rendered."""


# ---- driver side helpers ----------------------------------------------------------------------


def list_persons(config: EvalDriverConfig) -> list[str]:
    if config.persons:
        return list(config.persons)
    runs = Path(config.runs)
    if not runs.is_dir():
        raise DataError(runs, "runs folder does not exist (expected <runs>/<person>/model)")
    persons = sorted(p.name for p in runs.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not persons:
        raise DataError(runs, "no person folders found (expected <runs>/<person>/model)")
    return persons


def name_problems(runs: Path, persons: list[str]) -> dict[str, str]:
    """person -> why its name cannot be a person of results.json (a stray folder such as "000 copy", a bad
    --persons entry); checked before anything renders, so it fails alone instead of the night's results.json."""
    problems = {}
    for p in persons:
        try:
            check_person_name(p, Path(runs) / p)
        except DataError as e:
            problems[p] = str(e)
    if problems and len(problems) == len(persons):
        raise DataError(runs, f"no person to evaluate: {'; '.join(problems.values())}")
    return problems


def model_problem(runs: Path, person: str) -> str | None:
    """Why `person` has no usable trained model, or None."""
    cfg = Path(runs) / person / MODEL_DIR / "config.json"
    if not cfg.is_file():
        return f"no trained model: {cfg} does not exist (training failed or has not finished)"
    return None


def cross_drivers(persons: list[str], stores: Path) -> dict[str, str | None]:
    """Whose codes drive each person in cross-reenactment: the next person in sorted order
    (cyclic) among every person with a zarr store under `stores`, evaluated now or not, never
    the person itself (None when there is no other). Independent of which persons a run
    evaluates, so a subset run drives a person exactly as the full run does."""
    root = Path(stores)
    with_data = sorted({q.name.removesuffix(".zarr") for q in root.glob("*.zarr")} if root.is_dir() else set())
    out: dict[str, str | None] = {}
    for p in persons:
        others = [q for q in with_data if q != p]
        if not others:
            out[p] = None
            continue
        after = [q for q in others if q > p]
        out[p] = (after or others)[0]
    return out


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _failed_tasks(tasks: tuple[str, ...], reason: str) -> dict[str, TaskResult]:
    return {t: TaskResult(metrics={}, skipped={"task": f"failed: {reason}"}) for t in tasks}


def task_failure(tasks: dict[str, TaskResult]) -> str | None:
    """Why a rendered person counts as failed: any of its tasks failed (its data, e.g. a missing store or a
    corrupt shard); the first failed task's reason, or None. The tasks that rendered keep their numbers."""
    failed = [(t, r.skipped["task"].removeprefix("failed: ")) for t, r in tasks.items() if r.failed]
    if not failed:
        return None
    task, reason = failed[0]
    return f"{len(failed)} of {len(tasks)} tasks failed; {task}: {reason}"


def _load_night(path: Path) -> RunResults | None:
    """The night's results.json written by an earlier run, or None (absent, or unreadable: then
    it is replaced, with a warning)."""
    if not path.is_file():
        return None
    try:
        night = RunResults.load(path, salvage=True)
    except DataError as e:
        log.warning("%s is unreadable and will be replaced: %s", path, e)
        return None
    for damage in night.damaged:  # kept as a failed task (rendered again next time) or left out, not the whole night
        log.warning("%s: malformed entry: %s", path, damage)
    return night


def _base_problem(config: EvalDriverConfig, person: str, cache: dict[Path, str]) -> str | None:
    try:
        return base_problem(config, person, cache)
    except (OSError, ValueError, KeyError) as e:  # an unreadable model fails when it is loaded, with the reason
        log.warning("%s: base check unavailable (%s)", person, e)
        return None


@dataclass
class EvalDecision:
    """What :func:`run_evaluation` does with each person before it renders any (:func:`decide`; ``launch_all
    --dry-run`` prints it)."""

    listed: list[str]
    """The persons asked for (``config.persons``, else every folder of ``config.runs``)."""
    persons: list[str]
    """The persons evaluated: those listed whose names can be file names."""
    bad_names: dict[str, str]
    """Listed persons whose names cannot be file names, with why (not evaluated)."""
    failed: dict[str, str]
    """Persons refused before rendering (no usable model, or an avatar of another base), with why."""
    drivers: dict[str, str | None]
    """Whose codes drive each person in cross-reenactment (:func:`cross_drivers`)."""
    keys: dict[str, str]
    """Each person's evaluation key now (not of the failed ones)."""
    unkeyed: dict[str, str]
    """Persons whose key is unavailable (a part is missing), with why: rendered, and they fail there with it."""
    reusable: dict[str, tuple[RunResults, Path]]
    """Persons whose stored evaluation has their key now (with its night's results and folder): reused, not
    rendered; none with ``force``."""

    @property
    def todo(self) -> list[str]:
        """The persons rendered."""
        return [p for p in self.persons if p not in self.failed and p not in self.reusable]


def decide(config: EvalDriverConfig, run_date: str, index: bool = True) -> EvalDecision:
    """Which persons of ``config`` the evaluation of ``run_date`` refuses, reuses or renders, and why, deciding
    without rendering (files are read and hashed; with ``index`` False nothing is written: a night read in full
    gets no key index)."""
    listed = list_persons(config)
    bad_names = name_problems(config.runs, listed)
    persons = [p for p in listed if p not in bad_names]
    failed = {p: r for p in persons if (r := model_problem(config.runs, p))}
    bases: dict[Path, str] = {}  # base folder -> fingerprint, hashed once
    for p in persons:
        if p not in failed and (r := _base_problem(config, p, bases)):
            failed[p] = r
    drivers = cross_drivers(persons, config.stores)
    keys: dict[str, str] = {}
    unkeyed: dict[str, str] = {}
    for p in persons:
        if p in failed:
            continue
        try:
            keys[p] = evaluation_key(config, p, drivers[p], bases)
        except (OSError, ValueError, KeyError) as e:
            unkeyed[p] = str(e)
    # every stored night is looked up once for all persons, not once per person
    reusable = {} if config.force else find_reusables(config.reports_root, run_date, keys, index=index)
    return EvalDecision(listed, persons, bad_names, failed, drivers, keys, unkeyed, reusable)


def run_evaluation(config: EvalDriverConfig) -> EvalSummary:
    """Render + evaluate every person, write results.json (and the report); see module docstring.

    A person whose evaluation is up to date (same model, base, data and settings as numbers
    already stored, see `uptodate`) is not rendered again unless `config.force`; its stored
    numbers are reused. The night's results.json keeps the persons an earlier run of the same
    night evaluated and this one did not. While persons render, it is saved with those finished so far
    (`_Night.save_if_due`): a run killed before its end keeps them, and the next run reuses them."""
    t0 = time.time()
    run_date = config.run_date or dt.date.today().isoformat()
    run_id = dt.datetime.now().strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}"
    folder = run_dir(config.reports_root, run_date)
    decision = decide(config, run_date)
    for p, r in decision.bad_names.items():
        log.error("not evaluated: %s", r)
    for p, r in decision.failed.items():
        log.error("%s: %s", p, r)
    for p, r in decision.unkeyed.items():  # rendering will fail with the reason
        log.warning("%s: evaluation key unavailable (%s); rendering", p, r)
    persons, failed, keys = decision.persons, decision.failed, decision.keys
    results: dict[str, dict[str, TaskResult]] = {p: _failed_tasks(config.tasks, r) for p, r in failed.items()}
    evaluations: dict[str, dict[str, str]] = {}
    reused = [p for p in persons if p in decision.reusable]
    for p in reused:
        results[p], evaluations[p] = adopt(*decision.reusable[p], p, folder)
    todo, drivers, listed, bad_names = decision.todo, decision.drivers, decision.listed, decision.bad_names
    r = config.renderer
    meta = {
        "runs": str(config.runs), "git_commit": _git_commit(), "host": socket.gethostname(), "run_id": run_id,
        "sampler": f"{r.sampler}, {r.num_inference_steps} steps, seed {config.seed}",
        "renderer": f"max_batch_size {r.max_batch_size}, {r.num_replicas} replica(s) x {r.num_cpus:g} CPU "
                    f"{r.num_gpus:g} GPU",
    }
    night = _Night(config, folder, RunResults(run_date, results, meta, evaluations), persons, todo, failed, keys,
                   sorted(bad_names), started=t0)
    person_seconds: dict[str, float] = {}
    frames_rendered = 0
    if todo:
        # a person's videos are named by its evaluation key (the run's id without one)
        tags = {p: keys[p][:16] if p in keys else run_id for p in todo}

        def done(person: str) -> None:
            night.finished(person)
            night.save_if_due()

        try:
            frames_rendered = _render_all(config, folder, todo, drivers, results, failed, person_seconds,
                                          app=f"avatars-{run_id}", media_tags=tags, on_done=done)
        except BaseException:  # stopped (SIGTERM at a SLURM time limit, Ctrl-C, a crash): the persons finished since
            if night.recorded:  # the last save are kept, the next run renders only the rest (none finished: bad
                night.save()  # input found before any rendered, such as metric networks that did not load)
            raise
        for p in todo:  # a stand-in for _render_all (the tests') fills `results` without saying so
            if p not in night.recorded:
                night.finished(p)
    path = night.save(final=True)
    index = build_report(ReportConfig(config.reports_root, run_date)) if config.build_report else None
    return EvalSummary(run_date, path, index, listed, {**failed, **bad_names}, frames_rendered, time.time() - t0,
                       person_seconds, reused)


class _Night:
    """What one evaluation run saves of its night: the persons decided before anything renders (failed, reused) and
    each rendered person once it finished (:meth:`finished`). Saved while persons render (:meth:`save_if_due`,
    after a person finishes: a run killed by its time limit or a lost node keeps the persons it finished, with
    their keys, and the next run reuses them instead of starting over) and at the end (:meth:`save`)."""

    def __init__(self, config: EvalDriverConfig, folder: Path, results: RunResults, persons: list[str],
                 todo: list[str], failed: dict[str, str], keys: dict[str, str], bad_names: list[str], started: float):
        self.config, self.folder, self.results, self.persons = config, folder, results, persons
        self.todo, self.failed, self.keys, self.bad_names, self.started = todo, failed, keys, bad_names, started
        #: the persons of `todo` whose outcome is recorded (in the order they finished)
        self.recorded: list[str] = []
        self._last_save, self._save_cost = time.monotonic(), 0.0

    def finished(self, person: str) -> None:
        """``person``'s outcome is in the results (and in `failed` when it failed): a failed task fails it too, and
        its provenance is recorded; its key only when it and its tasks did not fail and none waits on its driver's
        data (such a person is rendered again next time)."""
        results = self.results.persons[person]
        if person not in self.failed and (why := task_failure(results)):
            self.failed[person] = why
            log.error("%s: %s", person, why)
        stamp = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
        entry = {"run_id": self.results.meta["run_id"], "evaluated_at": stamp,
                 EVAL_FORMAT_KEY: eval_format_label(self.config)}
        if person in self.keys and person not in self.failed and not any(waits_on_driver(r) for r in results.values()):
            entry["key"] = self.keys[person]
        self.results.evaluations[person] = entry
        self.recorded.append(person)

    def so_far(self) -> RunResults:
        """The persons decided so far (those still rendering are left out: the night's file keeps what an earlier
        run of it stored of them)."""
        r = self.results
        done = [p for p in self.persons if p in r.persons and (p not in self.todo or p in self.recorded)]
        return RunResults(r.run_date, {p: r.persons[p] for p in done}, dict(r.meta),
                          {p: r.evaluations[p] for p in done if p in r.evaluations})

    def save(self, final: bool = False) -> Path:
        """Merge the persons decided so far over the night's results.json and save it; ``final``: every person is
        decided, and the videos and thumbnails of the rendered persons that the night no longer refers to go."""
        t = time.monotonic()
        path = _save_night(self.config, self.folder, self.so_far(), self.bad_names,
                           rendered=self.todo if final else [], started=self.started)
        self._last_save, self._save_cost = time.monotonic(), time.monotonic() - t
        return path

    def save_if_due(self) -> None:
        """:meth:`save` when :data:`SAVE_EVERY_S` and :data:`SAVE_COST_FACTOR` times the last save's duration have
        passed since the last one; a save that fails (a full disk) is warned about, the persons render on and the
        night is saved at the end."""
        if time.monotonic() - self._last_save < max(SAVE_EVERY_S, SAVE_COST_FACTOR * self._save_cost):
            return
        try:
            path = self.save()
            log.info("%s: saved with %d of %d rendered persons finished", path, len(self.recorded), len(self.todo))
        except Exception as e:  # a failed intermediate save must not stop the night; the final save tries again
            log.warning("could not save the night's results so far (%s: %s); saving at the end",
                        type(e).__name__, e)
            self._last_save = time.monotonic()


def _save_night(config: EvalDriverConfig, folder: Path, night: RunResults, bad_names: list[str],
                rendered: list[str], started: float) -> Path:
    """Merges this run's persons over the night's results.json and saves it, with its summary (written by
    `RunResults.save`: what the report reads of a past night) and its key index (`uptodate.write_key_index`),
    under a lock on the night's folder: two evaluations of one night (a rerun of
    some persons beside the nightly one) each read the file, merged and wrote it, and the later write dropped the
    persons of the earlier one. `rendered`: the persons whose videos and thumbnails that the night no longer
    refers to, written before `started`, are removed."""
    with exclusive(folder / NIGHT_LOCK, "saving the night's results", wait=True):
        night = night.merged_over(_load_night(folder / "results.json"))
        all_failed = sorted(p for p, tasks in night.persons.items() if any(t.failed for t in tasks.values()))
        all_drivers = cross_drivers(list(night.persons), config.stores)
        night.meta.update({
            "failed_persons": ", ".join(all_failed + bad_names) or "none",
            "cross_reenactment": ", ".join(f"{p} by {d}" for p, d in all_drivers.items() if d) or "n/a",
        })
        path = night.save(config.reports_root)
        try:
            write_key_index(path, night)
        except OSError as e:  # the lookup then reads the night in full: slower, not wrong
            log.warning("%s: key index not written (%s); later runs read the night in full", path, e)
        _remove_unreferenced_media(folder, night, rendered, before=started)
    return path


def _remove_unreferenced_media(folder: Path, night: RunResults, persons: list[str], before: float) -> None:
    """Delete the videos and thumbnails of ``persons`` (rendered again by this run) that the saved night no
    longer references and that were written before this run started (an earlier render of this night with other
    inputs, or one stopped before it saved); a run rendering at the same time keeps its files."""
    for person in persons:
        keep = set(media_files(night.persons.get(person, {})))
        for kind in ("videos", "thumbnails"):
            media = folder / kind / person
            for f in media.iterdir() if media.is_dir() else ():
                try:
                    if f.is_file() and f"{kind}/{person}/{f.name}" not in keep and f.stat().st_mtime < before:
                        f.unlink()
                except OSError as e:
                    log.warning("cannot remove the unreferenced %s: %s", f, e)


PersonOutcome = tuple[str, "dict[str, TaskResult] | None", "str | None"]
"""(person, its task results, None) or (person, None, why it failed)."""


def evaluate_persons(run: EvalRun, handle, persons: list[str], drivers: dict[str, str | None],
                     person_seconds: dict[str, float]) -> Iterator[PersonOutcome]:
    """The outcome of each of `persons` as it finishes (they start in order), rendered on the renderer application
    `handle`. One thread more than `run`'s render slots (`parallel_persons`): while a person's frames are
    scored, the next person's already render on the replica it left. A person's failure is
    reported for that person only; a person that takes long (up to ``--frame-timeout-s`` per frame when its frames
    do not come back) does not hold up the outcomes of those that finished."""

    def one(person: str) -> PersonOutcome:
        t = time.time()
        try:
            return person, run.person(handle, person, drivers[person]), None
        except Exception as e:  # one person's failure must not stop the night
            log.error("%s failed:\n%s", person, traceback.format_exc())
            return person, None, f"{type(e).__name__}: {e}"
        finally:
            person_seconds[person] = time.time() - t

    pool = ThreadPoolExecutor(run.config.parallel_persons + 1, thread_name_prefix="eval")
    try:
        for done in as_completed([pool.submit(one, p) for p in persons]):
            yield done.result()
    except BaseException:  # stopped (SIGTERM at a time limit, Ctrl-C): the persons not started stay so, and the
        pool.shutdown(wait=False, cancel_futures=True)  # caller saves the finished ones without waiting for the rest
        raise
    pool.shutdown()


def _render_all(config: EvalDriverConfig, folder: Path, todo: list[str], drivers: dict[str, str | None],
                results: dict[str, dict[str, TaskResult]], failed: dict[str, str],
                person_seconds: dict[str, float], app: str = "avatars",
                media_tags: dict[str, str] | None = None, on_done: Callable[[str], None] | None = None) -> int:
    """Render and score `todo` on one renderer application `app` serving all of them (Ray started
    here unless connected); fills `results`, `failed` and `person_seconds`; returns the frames
    rendered. `media_tags`: what each person's video names carry (EvalRun); `on_done`: called with each person
    once its outcome is in `results` / `failed` (the night is saved as it goes)."""
    run = EvalRun(config, folder, media_tags)
    embedded = EmbeddedRay(num_cpus=config.ray_num_cpus, object_store_memory_mb=config.ray_object_store_mb,
                           bind_host=config.ray_bind_host, include_dashboard=False)
    started = connect_ray(config.ray_address, embedded, log_to_driver=False)
    from cluster.serve.deployment import deploy_renderer

    try:
        models = {p: Path(config.runs) / p / MODEL_DIR for p in todo}
        # every person the threads render at once stays loaded (plus the next one's)
        handle = deploy_renderer(models, config.renderer, app, max_models_per_replica=config.parallel_persons + 1)
        # the metric networks loaded while Ray started and the renderer deployed: one that did not (a model file
        # that is no TorchScript, a device that is not there) stops the stage here, before any person renders
        run.wait_for_metrics()
        for person, out, error in evaluate_persons(run, handle, todo, drivers, person_seconds):
            if error is not None:
                failed[person] = error
                results[person] = _failed_tasks(config.tasks, error)
            else:
                results[person] = out
                log.info("%s done in %.1f s", person, person_seconds[person])
            if on_done is not None:
                on_done(person)
    finally:  # the embedded Ray started here stops; on a cluster only this run's application goes, also one
        leave_ray(config.ray_address, started, app)  # that failed to deploy or was interrupted while deploying
    return run.frames_rendered
