"""The main job: data -> shards -> one training job per person in parallel -> evaluation -> report.

    python jobs/launch_all.py --persons all                      # embedded local Ray, synthetic data, tiny preset
    python jobs/launch_all.py --persons all --dry-run            # what that run would do and why; writes nothing
    python jobs/launch_all.py paper --persons 017,018 --captures /data/nersemble \\
        --train.base-model /models/sd21 --backend slurm --slurm.partition gpu --job-gpus 1

The first argument picks the training preset (tiny, the default, or paper); ``paper --help``
shows every value of that run.

Stages, each skipping work that is already up to date:
1. data: generate the synthetic capture root when no --captures is given, ingest every
   person into zarr, write the training shards (local worker processes);
2. a model that needs no pretrained base (tiny) and no --train.base-model: pretrain the tiny
   frozen base once (the CPU-sized stand-in for Stable Diffusion 2.1, see
   avatars/training/base_pretraining.py) on every person of the data set, whatever
   --persons is, into <workdir>/base/tiny-<key> (key: hash of its settings and data; a base
   is never overwritten);
3. training: one job per person on the chosen backend (ray | slurm | local), each with
   its reserved CPUs/GPUs, bounded retries, resume from the last checkpoint; an avatar
   trained on another base than this run's is retrained from scratch (said per person);
4. evaluation: the Ray Serve renderer renders every trained person's evaluation set,
   computes the metrics and writes results.json, the videos and the nightly report; a
   person whose model, base, data and evaluation settings are unchanged keeps its stored
   numbers and videos (--force renders it again), and a subset run keeps the other
   persons' results of the night.
Exit code 0 only when every person trained and was evaluated, 1 when some failed (a
summary table names them), 2 when nothing could be run (bad input, an unusable work
directory, a backend that is not there: checked before any work, see cluster/preflight.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from avatars.training import PRESETS as TRAIN_PRESETS
from avatars.training import TrainOptions
from avatars.training.config import EXPORTER_PORTS, MAX_METRICS_PORT, TrainingDiverged
from cluster.slurm_backend import SlurmConfig
from common.cpu_clock import ProcessTreeClock, format_stage_table
from common.io import DataError, atomic_write_json
from common.locks import AlreadyRunning, exclusive
from common.names import host_problem
from jobs import ingest as ingest_job
from jobs import make_synthetic
from jobs import preprocess as preprocess_job
from jobs._parallel import ITEM_TIMEOUT_S, default_workers
from jobs._presets import preset_cli
from shards.contract import find_persons
from shards.ingest import IngestConfig
from shards.synthetic import SyntheticConfig
from shards.writer import ShardConfig

if TYPE_CHECKING:
    from cluster.ray_connect import RaySession


@dataclass
class LaunchAllArgs:
    persons: str = "all"
    """'all' or comma-separated person ids (e.g. 017,018)."""
    workdir: Path = Path("data")
    """Root for everything the pipeline writes: captures/ (synthetic), zarr/, shards/, base/, runs/, status/,
    reports/."""
    captures: Path | None = None
    """Existing capture root (NeRSemble-like layout). None: generate the synthetic data set into <workdir>/captures."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """Synthetic data set used when --captures is not given."""
    ingest: IngestConfig = field(default_factory=IngestConfig)
    """Split and validation settings of the ingest."""
    shards: ShardConfig = field(default_factory=ShardConfig)
    """Rasterization and packing of the training shards."""
    workers: int = field(default_factory=default_workers)
    """Parallel processes for data preparation."""
    data_item_timeout_s: float = ITEM_TIMEOUT_S
    """Data stages: a person's ingest or one of its shards still running after this many seconds is stopped (its
    process killed) and the person fails; the others go on (a read hung on a file system that does not answer held
    the whole main job)."""
    train: TrainOptions = field(default_factory=TrainOptions)
    """Training options shared by every person (model, steps, base model, ...); the preset's."""
    backend: Literal["ray", "slurm", "local"] = "ray"
    """Where the per-person jobs run: Ray (embedded or --ray-address), SLURM via submitit, or sequentially here."""
    ray_address: str | None = None
    """Ray cluster to join ('auto' or host:port); None: the cluster in RAY_ADDRESS when set (as inside
    `ray job submit`), else an embedded local Ray."""
    ray_bind_host: str = "127.0.0.1"
    """Embedded Ray only: the address its node, workers, Serve replicas and dashboard listen on. Loopback:
    nothing is reachable from the network; a LAN address to reach the dashboard from elsewhere (Ray then also
    listens on all interfaces)."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    """SLURM settings (partition, time limit, array, requeues); status_dir/log_dir default into --workdir."""
    job_cpus: float = 1.0
    """CPUs each person's training reserves: Ray num_cpus (fractions allowed); SLURM cpus-per-task, rounded up to
    whole CPUs. The local backend reserves nothing (said at launch)."""
    job_gpus: float | None = None
    """GPUs each training reserves: Ray num_gpus (fractions share a GPU); SLURM gpus-per-node, rounded up to whole
    GPUs (0.5 is 1). None: 1 when this machine has CUDA, else 0. The local backend reserves nothing: its trainings
    use this machine's GPU when it has one, also with 0 (said at launch)."""
    job_memory_gb: float | None = None
    """Host memory each training reserves (GiB): Ray memory; SLURM mem, rounded up to whole GiB. None: no
    reservation. The local backend reserves nothing (said at launch)."""
    max_retries: int = 1
    """Retries of a failed person's training before it is reported as failed."""
    evaluate: bool = True
    """Render the evaluation set of every trained person and write the nightly report."""
    eval_inference_steps: int = 20
    """Sampling steps of the evaluation renders (DDPM; the paper's 20)."""
    eval_max_frames_per_clip: int | None = None
    """The evaluation scores at most this many frames of each sequence, its first ones (render_eval
    --max-frames-per-clip: a cheaper nightly check; the nights are recorded as another evaluation format); None:
    every frame, the paper's protocol."""
    eval_parallel_persons: int = 2
    """Persons the evaluation renders at the same time, and replicas of its one Serve renderer
    application (each replica loads the persons it is sent): one person thread more runs, so while a
    person's metrics are computed the next person's frames already render on the replica it left
    and both cores of a small machine stay busy (on a GPU node: replicas sharing the GPU)."""
    eval_metrics_port: int | None = None
    """First port of each evaluation renderer replica's Prometheus exporter (render_eval's --renderer.metrics-port:
    1 to 65472, a replica takes the first free one of the 64 from it up; 0: a free port the system picks); its
    file_sd target goes where the trainings' go (--train.metrics-targets-dir, else <workdir>/monitoring/targets).
    None: no exporter."""
    eval_metrics_host: str = "127.0.0.1"
    """Address the renderer replicas' exporters listen on (with --eval-metrics-port): loopback by default; the
    node's address (or 0.0.0.0) when a Prometheus on another machine scrapes them."""
    force: bool = False
    """Evaluate every person again, even those whose stored evaluation is up to date (same
    model, base, data and evaluation settings): their numbers and videos are otherwise reused."""
    min_free_gb: float = 1.0
    """Refuse to start (exit code 2) when the work directory has less free space than this (GiB)."""
    verbose: bool = False
    """Let the training workers print here (library notices, per-worker progress bars) instead of
    into <workdir>/logs/<person>.log, and show no overall progress line."""
    dry_run: bool = False
    """Print what this run would do and why, per stage and person (what is up to date and reused, what is generated,
    ingested, sharded, pretrained, trained, resumed or rendered again), with a count per stage, and exit 0 without
    doing or writing anything (no Ray, no SLURM, no lock; 2 on bad options, as a run). Allowed while a run holds
    the work directory: the plan then says so."""


#: Held in the work directory for the whole run (``common.locks``): a second main job on it (last night's still
#: running at the next night's start, a user's run beside it) is refused naming the first.
LOCK_FILE = ".launch_all.lock"
#: The main job per training preset: name -> (description, complete arguments).
PRESETS = {name: (text, LaunchAllArgs(train=options)) for name, (text, options) in TRAIN_PRESETS.items()}


def _needs_tiny_base(args: LaunchAllArgs) -> bool:
    return args.train.base_model is None and not args.train.model.requires_pretrained_base


def _data(args: LaunchAllArgs, persons: str | None = None,
          clock: ProcessTreeClock | None = None) -> tuple[list[str], dict[str, str]]:
    """Prepare the shards of `persons` (default: --persons); returns (ready persons, {failed person: reason})."""
    stage = clock.stage if clock is not None else (lambda name: contextlib.nullcontext())
    persons = args.persons if persons is None else persons
    captures = args.captures
    if captures is None:
        captures = args.workdir / "captures"
        with stage("synthetic data"):
            make_synthetic.main(make_synthetic.MakeSyntheticArgs(out=captures, synthetic=args.synthetic,
                                                                 workers=args.workers))
    with stage("ingest"):
        ingested, errors = ingest_job.main(ingest_job.IngestArgs(captures=captures, out=args.workdir / "zarr",
                                                                 persons=persons, ingest=args.ingest,
                                                                 workers=args.workers,
                                                                 item_timeout_s=args.data_item_timeout_s))
    failed = {p: f"ingest: {e}" for p, e in errors.items()}
    if not ingested:
        return [], failed
    with stage("shards"):
        shards = preprocess_job.main(preprocess_job.PreprocessArgs(
            stores=args.workdir / "zarr", out=args.workdir / "shards", persons=",".join(ingested),
            shards=args.shards, workers=args.workers, item_timeout_s=args.data_item_timeout_s))
    failed.update({p: f"preprocess: {e}" for p, e in shards.failed.items()})
    return [p for p in ingested if p not in failed], failed


def _base_model(args: LaunchAllArgs, base_persons: list[str], **settings) -> Path | None:
    """The frozen base every avatar trains on: --train.base-model, or the tiny base pretrained on
    `base_persons` (every person of the data set, whatever --persons is) into
    `<workdir>/base/tiny-<key>`, the key being the hash of its settings and data: a base is
    never replaced, so avatars trained on it keep it, and a subset run reuses the full run's.
    `settings` replace BasePretrainConfig defaults (the ablation benchmark's longer UNet prior)."""
    if not _needs_tiny_base(args):
        return args.train.base_model
    from avatars.training.base_pretraining import pretrain_base

    config = tiny_base_config(args, base_persons, **settings)
    pretrain_base(config)
    return config.output


def tiny_base_config(args: LaunchAllArgs, base_persons: list[str], **settings):
    """The BasePretrainConfig of the tiny base of `base_persons`, its output folder named by its key (reads the
    persons' shard manifests: raises FileNotFoundError when a person has none)."""
    from avatars.training.base_pretraining import BasePretrainConfig, base_key

    config = BasePretrainConfig(shard_root=args.workdir / "shards", persons=",".join(base_persons),
                                num_workers=min(2, args.workers), **settings)
    return dataclasses.replace(config, output=args.workdir / "base" / f"tiny-{base_key(config)[:16]}")


def _check_bases(args: LaunchAllArgs, persons: list[str], base_model: Path | None) -> dict[str, str]:
    """Persons whose avatar was trained on another base than this run's, each with why.

    With the tiny base the main job manages, such an avatar's run folder is cleared here (said
    once per person) and it retrains from scratch; its old base is kept. A base given with
    --train.base-model is the user's: the person is refused with the reason (returned) instead,
    so that no long training is thrown away by a mistyped path."""
    from avatars.training.base_record import base_fingerprint

    refused = {}
    for p, problem in base_mismatches(args, persons, base_fingerprint(base_model)).items():
        run = args.workdir / "runs" / p
        if not _needs_tiny_base(args):
            refused[p] = refused_base(problem)
            continue
        print(f"{p}: retraining from scratch on this run's base ({base_model}): {problem}")
        shutil.rmtree(run)
    return refused


def refused_base(problem: str) -> str:
    """Why a person trained on another base than --train.base-model is refused (``problem``: the mismatch)."""
    return (f"{problem}; pass that base with --train.base-model, or --train.resume never to retrain every person on "
            "this one")


def base_mismatches(args: LaunchAllArgs, persons: list[str], fingerprint: str | None) -> dict[str, str]:
    """Persons whose avatar holds training state of another base than the one of ``fingerprint``, each with why
    (``avatars.training.base_record.mismatch``); none with --train.resume never, which starts every person over."""
    from avatars.training.base_record import BaseMismatch, mismatch

    if args.train.resume == "never":
        return {}
    found = {}
    for p in persons:
        try:
            problem = mismatch(args.workdir / "runs" / p, fingerprint)
        except BaseMismatch as e:  # an unreadable base.json: the base it was trained on is unknown
            problem = str(e)
        if problem is not None:
            found[p] = problem
    return found


def _check_resumable(args: LaunchAllArgs, persons: list[str]) -> dict[str, str]:
    """Persons whose checkpoints were trained with other values of the options that define the training state
    (avatars.training.config.RESUMABLE_FIELDS: the model, seed, learning rates, ...), each with why. Their
    trainer would refuse to resume them; said here, before any job starts, and an avatar already trained to
    its steps is not taken as this run's (its options differ)."""
    from avatars.training.checkpoint import saved_options
    from avatars.training.config import TRAIN_DATA, TrainConfig, resume_conflicts
    from common.configs import to_jsonable

    if args.train.resume == "never":
        return {}
    refused = {}
    for p in persons:
        run = args.workdir / "runs" / p
        try:
            saved = saved_options(run / "checkpoints")
        except (DataError, OSError) as e:  # a damaged checkpoint: the trainer says what to do with it
            refused[p] = str(e)
            continue
        now = to_jsonable(TrainConfig.for_person(args.train, person=p))
        try:
            now[TRAIN_DATA] = _train_data(args, p)  # the options a checkpoint saves (config.state_options)
        except (DataError, OSError):  # no complete shards: its training fails on them, saying so
            pass
        conflicts = resume_conflicts(saved[1], now) if saved is not None else []
        if conflicts:
            refused[p] = (f"{run} was trained with other values of options that define the training state "
                          f"({'; '.join(conflicts)}); pass its values, or --train.resume never to retrain it")
    return refused


def _train_data(args: LaunchAllArgs, person: str) -> str:
    """The digest of the training data ``person``'s trainer reads (shards.writer.split_digest)."""
    from shards.writer import split_digest

    return split_digest(args.workdir / "shards", person, "train")


def _trained(args: LaunchAllArgs, persons: list[str], base_model: Path | None) -> dict[str, dict]:
    """Persons whose avatar is already trained to this run's steps on this run's base and on the training data
    of this run's shards (result.json and the model are there): their training would resume at its last step and
    train nothing, so it is not started at all (no Ray, no DeepSpeed); {person: its result.json}. An avatar trained
    before the data changed (another held-out split: frames it trained on are now evaluated) is not, nor one whose
    result.json holds a NaN or infinite number (written by a run that diverged, before the trainer refused to): its
    training runs and says what is wrong with its checkpoints."""
    from avatars.training.base_record import base_fingerprint

    return trained_on(args, persons, base_fingerprint(base_model))


def trained_on(args: LaunchAllArgs, persons: list[str], fingerprint: str | None) -> dict[str, dict]:
    """`_trained` for the base of ``fingerprint``."""
    import json
    import math

    from avatars.training.config import TRAIN_DATA

    def finite(text: str) -> float:  # json.loads takes a bare NaN / Infinity, and 1e999 as inf
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"non-finite number {text}")
        return value

    if args.train.resume == "never":
        return {}
    steps = args.train.steps
    done = {}
    for p in persons:
        run = args.workdir / "runs" / p
        try:
            result = json.loads((run / "result.json").read_text(), parse_float=finite, parse_constant=finite)
        except (OSError, ValueError):  # no result, an unreadable one, or one of a run that diverged
            continue
        if (isinstance(result, dict) and result.get("steps") == steps and "base_fingerprint" in result
                and result["base_fingerprint"] == fingerprint and (run / "model" / "config.json").is_file()):
            try:
                if result.get(TRAIN_DATA) == _train_data(args, p):
                    done[p] = result
            except (DataError, OSError):  # no complete shards: not trained on them
                pass
    return done


def status_dir(args: LaunchAllArgs) -> Path:
    """Where the per-person status files of this run go (what jobs/status.py reads)."""
    if args.backend == "slurm" and args.slurm.status_dir is not None:
        return Path(args.slurm.status_dir)
    return args.workdir / "status"


def _backend_config(args: LaunchAllArgs, status_dir: Path):
    if args.backend == "local":
        from cluster.local_backend import LocalConfig

        return LocalConfig(status_dir=status_dir)
    if args.backend == "ray":
        from cluster.preflight import resolve_ray_address
        from cluster.ray_backend import RayConfig

        embedded = resolve_ray_address(args.ray_address) is None
        return RayConfig(status_dir=status_dir.resolve(), address=args.ray_address,
                         node_ip_address=args.ray_bind_host if embedded else None)
    slurm = args.slurm
    return dataclasses.replace(slurm, status_dir=slurm.status_dir or status_dir.resolve(),
                               log_dir=(args.workdir / "slurm").resolve() if slurm.log_dir is None else slurm.log_dir)


def _serve_notice_filter(record) -> bool:
    """What of Serve's own log reaches a non-verbose run's terminal: warnings and errors, except
    the router's "Failed to get queue length from Replica ... within 0.1s" (a replica busy loading
    a model on a loaded machine answers late; the request is routed anyway)."""
    import logging

    return record.levelno >= logging.WARNING and not record.getMessage().startswith("Failed to get queue length")


def _ray_session(args: LaunchAllArgs) -> RaySession:
    """The one Ray of this run: the training (``--backend ray``) starts or joins it and the
    evaluation renders on it, so an embedded Ray is started once. Worker and replica output
    reaches this terminal only with ``--verbose`` (trainers write theirs to their log files)."""
    from cluster.ray_connect import EmbeddedRay, RaySession

    return RaySession(args.ray_address, EmbeddedRay(bind_host=args.ray_bind_host), log_to_driver=args.verbose)


def _train(args: LaunchAllArgs, persons: list[str], base_model: Path | None, ray_session: RaySession | None = None):
    import torch

    from cluster.orchestrate import run_all
    from cluster.person_job import DEFAULT_TARGET, PersonJob, Resources

    gpus = args.job_gpus if args.job_gpus is not None else (1.0 if torch.cuda.is_available() else 0.0)
    resume = args.train.resume
    if resume == "never":  # starts over once, here: a retry or a SLURM requeue continues what this launch trained
        from avatars.training.checkpoint import clear_run

        for p in persons:
            clear_run(args.workdir / "runs" / p)
        resume = "auto"
    # Typed configs cross the job boundary (pickled by Ray / submitit); absolute paths, since
    # workers may run elsewhere.
    options = dataclasses.replace(args.train, resume=resume, base_model=base_model.resolve() if base_model else None,
                                  lpips_weights=Path(args.train.lpips_weights).resolve(),
                                  # with --compile only the first job of a torch version and GPU kind compiles
                                  compile_cache=Path(args.train.compile_cache
                                                     or args.workdir / "compile-cache" / "train").resolve(),
                                  # with --train.metrics-port each training's exporter is found by Prometheus'
                                  # file_sd (cluster/monitoring/prometheus.yml) in <workdir>/monitoring/targets
                                  metrics_targets_dir=_metrics_targets_dir(args, args.train.metrics_port))
    kwargs = {"options": options, "shards": (args.workdir / "shards").resolve(),
              "out": (args.workdir / "runs").resolve()}
    logs = None if args.verbose else (args.workdir / "logs").resolve()
    jobs = [PersonJob(person=p, target=DEFAULT_TARGET,
                      kwargs={**kwargs, "log_file": str(logs / f"{p}.log")} if logs else kwargs,
                      resources=Resources(cpus=args.job_cpus, gpus=gpus, memory_gb=args.job_memory_gb),
                      max_retries=args.max_retries) for p in persons]
    _stage(3, f"training {len(persons)} persons on {args.backend}"
              + (f" (worker output: {logs}/<person>.log)" if logs else ""))
    if args.backend == "ray" and ray_session is not None:
        ray_session.connect()  # kept for the evaluation; the backend uses it and leaves it open
    if args.verbose:
        return run_all(jobs, _backend_config(args, status_dir(args)))
    from jobs._console import TrainingProgress

    with TrainingProgress(status_dir(args), persons):
        return run_all(jobs, _backend_config(args, status_dir(args)))


def _metrics_targets_dir(args: LaunchAllArgs, metrics_port: int | None) -> Path | None:
    """Where an exporter started on ``metrics_port`` (the trainings': --train.metrics-port; the renderer's:
    --eval-metrics-port) writes its file_sd target: --train.metrics-targets-dir as given, else
    <workdir>/monitoring/targets; None without an exporter."""
    if metrics_port is None:
        return None
    if args.train.metrics_targets_dir is not None:
        return Path(args.train.metrics_targets_dir).resolve()
    return (args.workdir / "monitoring" / "targets").resolve()


def _sweep_metrics_targets(args: LaunchAllArgs) -> None:
    """Removes the target files of exporters whose process is gone (killed trainings and replicas: see
    cluster.monitoring.targets.sweep) from the folder this run's exporters write to, at the start and at the end
    of the run: nothing registers after the night's last exporter stops."""
    folder = _metrics_targets_dir(args, args.train.metrics_port) or _metrics_targets_dir(args, args.eval_metrics_port)
    if folder is not None:
        from cluster.monitoring.targets import sweep

        sweep(folder)


def _stage(number: int, text: str) -> None:
    print(f"[{number}/4] {text}", flush=True)


def _evaluate(args: LaunchAllArgs, persons: list[str]):
    from cluster.eval_driver.driver import run_evaluation

    return run_evaluation(eval_config(args, persons))


def eval_config(args: LaunchAllArgs, persons: list[str]):
    """The evaluation driver's config of `persons` for this run."""
    from avatars.configs import RenderOptions
    from cluster.eval_driver.driver import EvalDriverConfig
    from cluster.serve.renderer import RendererConfig

    return EvalDriverConfig(runs=args.workdir / "runs", shards=args.workdir / "shards",
                            stores=args.workdir / "zarr", reports_root=args.workdir / "reports",
                            persons=tuple(persons), ray_address=args.ray_address,
                            parallel_persons=args.eval_parallel_persons,
                            ray_bind_host=args.ray_bind_host,
                            renderer=RendererConfig(
                                num_inference_steps=args.eval_inference_steps,
                                num_replicas=args.eval_parallel_persons,
                                metrics_port=args.eval_metrics_port, metrics_host=args.eval_metrics_host,
                                metrics_targets_dir=_metrics_targets_dir(args, args.eval_metrics_port),
                                # the training's precision (its validation renders in it): "auto" is bf16 on
                                # CUDA for both, and --train.precision fp32 is scored on fp32 renders too;
                                # compiled code (CUDA) shared by every replica and night
                                pipeline=RenderOptions(precision=args.train.precision,
                                                       compile_cache=(args.workdir / "compile-cache").resolve())),
                            lpips_weights=Path(args.train.lpips_weights), force=args.force,
                            max_frames_per_clip=args.eval_max_frames_per_clip)


def resource_warnings(args: LaunchAllArgs) -> list[str]:
    """What the backend does not reserve as --job-cpus / --job-gpus / --job-memory-gb say, said at launch: the local
    backend reserves nothing (it runs each training in this process: a --job-gpus 0 training still finds this
    machine's GPU, which the trainer takes when there is one), SLURM reserves whole CPUs, GPUs and GiB."""
    if args.backend == "local":
        flags = (("--job-cpus", args.job_cpus, 1.0), ("--job-gpus", args.job_gpus, None),
                 ("--job-memory-gb", args.job_memory_gb, None))
        given = [flag for flag, value, default in flags if value != default]
        if not given:
            return []
        gpu = (" (a --job-gpus 0 training uses this machine's GPU all the same when it has one)"
               if args.job_gpus == 0 else "")
        return [f"--backend local reserves no resources: it runs each training in this process, one after the other, "
                f"so {', '.join(given)} limit nothing{gpu}; --backend ray or slurm reserves them"]
    if args.backend == "slurm":
        from cluster.person_job import Resources
        from cluster.slurm_backend import _resource_params

        asked = {"cpus_per_task": ("--job-cpus", args.job_cpus, "CPUs"),
                 "gpus_per_node": ("--job-gpus", args.job_gpus, "GPUs"),
                 "mem_gb": ("--job-memory-gb", args.job_memory_gb, "GiB")}
        params = _resource_params(Resources(cpus=args.job_cpus, gpus=args.job_gpus or 0.0,
                                            memory_gb=args.job_memory_gb))
        rounded = [f"{flag} {value:g} is {params[key]} {unit}" for key, (flag, value, unit) in asked.items()
                   if value is not None and key in params and params[key] != value]
        if rounded:
            return [f"SLURM reserves whole CPUs, GPUs and GiB, rounded up: {', '.join(rounded)} per job"]
    return []


def requested_persons(args: LaunchAllArgs) -> list[str]:
    """The persons this run is for (known before any data is written)."""
    if args.persons != "all":
        return [p.strip() for p in args.persons.split(",") if p.strip()]
    if args.captures is None:
        return list(args.synthetic.person_ids)
    return find_persons(args.captures)


def _finite(value: float, low: float, strict: bool) -> bool:
    return math.isfinite(value) and (value > low if strict else value >= low)


def check_options(args: LaunchAllArgs) -> str | None:
    """The first invalid value among the options used only after hours of work (job resources and
    retries at the training, renderer settings at the evaluation), as an error naming its flag; None
    when all are valid. Checked before any work, so a typo costs no data stage or pretraining."""
    checks = [
        (args.eval_parallel_persons >= 1,
         f"--eval-parallel-persons must be at least 1, got {args.eval_parallel_persons}"),
        (args.eval_inference_steps >= 1, f"--eval-inference-steps must be at least 1, got {args.eval_inference_steps}"),
        (args.eval_max_frames_per_clip is None or args.eval_max_frames_per_clip >= 1,
         f"--eval-max-frames-per-clip must be at least 1 (leave it out for every frame), got "
         f"{args.eval_max_frames_per_clip}"),
        (args.eval_metrics_port is None or 0 <= args.eval_metrics_port <= MAX_METRICS_PORT,
         f"--eval-metrics-port must be 1 to {MAX_METRICS_PORT} (each renderer replica's exporter tries "
         f"{EXPORTER_PORTS} ports from it up) or 0 (a free port the system picks), got {args.eval_metrics_port}"),
        (host_problem(args.eval_metrics_host) is None,
         f"--eval-metrics-host {args.eval_metrics_host!r}: {host_problem(args.eval_metrics_host)}"),
        (args.eval_metrics_port is not None or args.eval_metrics_host == "127.0.0.1",
         "--eval-metrics-host needs --eval-metrics-port: without it the renderer starts no exporter"),
        (args.max_retries >= 0, f"--max-retries must be 0 or more, got {args.max_retries}"),
        (_finite(args.job_cpus, 0, strict=True), f"--job-cpus must be a positive number, got {args.job_cpus}"),
        (args.job_gpus is None or _finite(args.job_gpus, 0, strict=False),
         f"--job-gpus must be 0 or more, got {args.job_gpus}"),
        (args.job_memory_gb is None or _finite(args.job_memory_gb, 0, strict=True),
         f"--job-memory-gb must be a positive number of GiB, got {args.job_memory_gb}"),
        (args.workers >= 1, f"--workers must be at least 1, got {args.workers}"),
        (_finite(args.data_item_timeout_s, 0, strict=True),
         f"--data-item-timeout-s must be a positive number of seconds, got {args.data_item_timeout_s}"),
        (args.train.base_model is None or Path(args.train.base_model).is_dir(),
         f"--train.base-model {args.train.base_model} is not a directory (a local diffusers folder with unet/ and "
         "vae/)"),
    ]
    return next((message for ok, message in checks if not ok), None) or _lpips_problem(args) or _base_problem(args)


def _lpips_problem(args: LaunchAllArgs) -> str | None:
    """The evaluation scores LPIPS (the driver's default metrics) with --train.lpips-weights: a missing file
    failed the whole evaluation after every person had trained."""
    from avatars.evaluation.metric_names import DEFAULT_METRICS

    weights = Path(args.train.lpips_weights)
    if not args.evaluate or not {"lpips", "lpips_face"} & set(DEFAULT_METRICS) or weights.is_file():
        return None
    from avatars.evaluation.lpips_weights import HOW_TO_GET

    return (f"--train.lpips-weights {weights}: the LPIPS weights the evaluation scores with are missing; "
            f"{HOW_TO_GET.format(path=weights)}, or pass --no-evaluate")


def _base_problem(args: LaunchAllArgs) -> str | None:
    """Why the base this run would train on cannot be the one its model options describe, naming the flags."""
    from avatars.configs import tiny_config

    model = args.train.model
    if model.requires_pretrained_base and args.train.base_model is None:
        return "--train.base-model is required: this preset trains on a pretrained base (a local SD2.1 directory)"
    if not _needs_tiny_base(args):
        return None
    tiny = tiny_config()  # what avatars.training.base_pretraining pretrains the main job's base with
    changed = [f"--train.model.{name}" for name in ("unet", "vae", "scheduler", "resolution")
               if getattr(model, name) != getattr(tiny, name)]
    if changed:
        return (f"{', '.join(changed)}: the main job pretrains its tiny base with the tiny preset's layout, whose "
                "UNet, VAE, noise schedule and resolution the avatar then takes over; for another layout pass a base "
                "of it with --train.base-model")
    return None


def check_persons(args: LaunchAllArgs) -> str | None:
    """What is wrong with --persons, naming it, or None: an id that is no valid person id, one given
    twice, none at all, or one that is not in the data set (no folder of that name under --captures,
    not one of the synthetic persons) would otherwise be dropped without a word."""
    from cluster.person_job import PERSON_RE
    from common.names import PERSON_ID_RULE

    if args.persons == "all":
        return None
    persons = requested_persons(args)
    if not persons:
        return f"--persons {args.persons!r} names no person (give 'all' or comma-separated ids, e.g. 017,018)"
    bad = [p for p in persons if not PERSON_RE.match(p)]
    if bad:
        return f"--persons: {', '.join(map(repr, bad))} is not a person id ({PERSON_ID_RULE})"
    twice = sorted({p for p in persons if persons.count(p) > 1})
    if twice:
        return f"--persons names {', '.join(twice)} more than once"
    if args.captures is None:
        where, known = "the synthetic data set", set(args.synthetic.person_ids)
    else:  # a folder that is there but broken is the data stage's to report, with the file it lacks
        where, known = f"the capture root {args.captures}", {p for p in persons if (args.captures / p).is_dir()}
    unknown = [p for p in persons if p not in known]
    if unknown:
        return f"--persons: {', '.join(unknown)} not in {where}"
    return None


def _stopping_error(e: OSError) -> tuple[str, str]:
    """(what kind, what happened) of an OSError that stops a stage. A ConnectionError is an OSError too, but
    no disk error: Ray raises one when it cannot join a cluster (down, or refusing this process's auth token),
    and its own message hides the reason in its cause."""
    if isinstance(e, ConnectionError):
        cause = f" ({type(e.__cause__).__name__}: {e.__cause__})" if e.__cause__ is not None else ""
        return "connection error", f"{e}{cause}"
    return "I/O error", str(e)


def _with_article(kind: str) -> str:
    return f"an {kind}" if kind[0] in "AEIOU" else f"a {kind}"


def main(args: LaunchAllArgs) -> int:
    """Run the whole pipeline; returns the exit code.

    An I/O error (full or read-only disk) that stops a stage does not end in a traceback:
    every person that had not finished is reported failed with the error (naming the path),
    the summary is printed and written (to a fallback path when the work directory cannot
    take it), and a re-run after freeing space continues where this one stopped.
    """
    if args.dry_run:  # read-only: no Ray session, no lock, no work directory check that writes
        from jobs._plan import dry_run

        return dry_run(args)
    with _ray_session(args) as ray_session:  # one Ray for the training and the evaluation
        return _main(args, ray_session)


def preflight(args: LaunchAllArgs, dry_run: bool = False) -> bool:
    """The checks before any work, up front instead of after hours of data and training: the options and
    --persons, the work directory (not in a dry run: `check_workdir` writes a probe file; an unusable one raises
    OSError) and the backends (a backend that is not there is named with how to get it). Prints the error or the
    warnings; False when the run must not start (exit code 2)."""
    from cluster.orchestrate import check_workdir
    from cluster.preflight import BackendUnavailable, check_backend

    problem = check_options(args) or check_persons(args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return False
    if not dry_run:
        check_workdir(args.workdir, args.min_free_gb)
    try:
        for warning in check_backend(args.backend, args.ray_address, args.slurm.partition, args.evaluate,
                                     args.ray_bind_host):
            print(f"warning: {warning}", file=sys.stderr)
        for warning in resource_warnings(args):
            print(f"warning: {warning}", file=sys.stderr)
    except BackendUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return False
    return True


def no_capture(person: str) -> str:
    """Why a requested person of a subset run on the tiny base fails: its folder is no capture of the data set."""
    return f"no capture of {person} in the data set (--persons)"


def _main(args: LaunchAllArgs, ray_session: RaySession) -> int:
    t0 = time.time()
    if not preflight(args):
        return 2
    try:
        with exclusive(args.workdir / LOCK_FILE, "the main job (jobs/launch_all.py)"):
            return _run(args, ray_session, t0)
    except AlreadyRunning as e:  # two runs would train the same persons into the same folders
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args: LaunchAllArgs, ray_session: RaySession, t0: float) -> int:
    """The run, holding the work directory's lock."""
    from cluster.orchestrate import exit_code, format_summary, write_summary_json
    from cluster.person_job import JobResult
    from cluster.status import write_state

    if not args.verbose:  # Serve's start / deploy / delete notices; warnings and errors still show
        import logging

        # a filter, not only the level: importing Serve (later) sets its logger's level to INFO again
        serve_log = logging.getLogger("ray.serve")
        serve_log.setLevel(logging.WARNING)
        serve_log.addFilter(_serve_notice_filter)
    _sweep_metrics_targets(args)  # what the exporters of killed runs left (the night's first exporter sweeps too)
    clock = ProcessTreeClock()
    requested = requested_persons(args)
    results: list[JobResult] = []
    data_failed: dict[str, str] = {}
    stage = "data"
    try:
        _stage(1, "data: captures -> zarr -> shards")
        if _needs_tiny_base(args) and args.persons != "all":
            # The tiny base is made of every person's data, so that a subset run uses the full run's base.
            prepared, data_failed = _data(args, "all", clock)
            persons = [p for p in prepared if p in requested]
            for p in sorted(set(data_failed) - set(requested)):
                print(f"note: {p} is not in the tiny base (its data could not be prepared: {data_failed.pop(p)})")
            for p in requested:  # a folder without a capture (no calibration) is no person of "all"
                if p not in prepared and p not in data_failed:
                    data_failed[p] = f"ingest: {no_capture(p)}"
        else:
            prepared, data_failed = _data(args, clock=clock)
            persons = prepared
        if persons:
            stage = "base model"
            _stage(2, "base model: " + (f"the tiny base, pretrained on {len(prepared)} persons"
                                        if _needs_tiny_base(args) else str(args.train.base_model)))
            with clock.stage("base model"):
                base_model = _base_model(args, prepared)
            stage = "training"
            refused = _check_bases(args, persons, base_model)
            refused.update(_check_resumable(args, [p for p in persons if p not in refused]))
            results = [JobResult(person=p, ok=False, attempts=0, error=reason) for p, reason in refused.items()]
            trained = _trained(args, [p for p in persons if p not in refused], base_model)
            if trained:
                print(f"training: {len(trained)} persons already trained to their steps on this base, not run again "
                      f"({', '.join(trained)}; --train.resume never retrains)")
            results += [JobResult(person=p, ok=True, attempts=0, result=r) for p, r in trained.items()]
            for p, r in trained.items():  # as its run would have: a run killed before its verdict left `running`
                write_state(status_dir(args), p, "succeeded", step=r["steps"], total_steps=r["steps"],
                            message="already trained to its steps on this base; not run again")
            todo = [p for p in persons if p not in refused and p not in trained]
            if todo:
                with clock.stage("training"):
                    results += _train(args, todo, base_model, ray_session)
    except OSError as e:
        kind, reason = _stopping_error(e)
        print(f"error: the {stage} stage stopped on {_with_article(kind)}: {reason}", file=sys.stderr)
        done = {r.person for r in results} | set(data_failed)
        results += [JobResult(person=p, ok=False, attempts=0, error=f"{stage}: {kind}: {reason}")
                    for p in requested if p not in done]
    except TrainingDiverged as e:  # the tiny base's pretraining: no avatar can train on its NaN weights
        print(f"error: the {stage} stage stopped: {e}", file=sys.stderr)
        done = {r.person for r in results} | set(data_failed)
        results += [JobResult(person=p, ok=False, attempts=0, error=f"{stage}: {e}")
                    for p in requested if p not in done]
    # Persons whose data could not be prepared fail alone, listed with the others.
    results += [JobResult(person=p, ok=False, attempts=0, error=reason) for p, reason in data_failed.items()]
    for r in results:  # persons that never reached a backend get a status file too (jobs/status.py lists them)
        if not r.ok and r.attempts == 0:
            write_state(status_dir(args), r.person, "failed", attempt=0, restarts=0, message=r.error or "")
    print(format_summary(results))
    summary_path = args.workdir / "runs" / "summary.json"
    written = write_summary_json(results, summary_path)
    print(f"summary: {written}" if written else "summary: could not be written anywhere (see warnings)")
    code = exit_code(results)
    trained = [r.person for r in results if r.ok]
    evaluation, evaluation_failed = None, None
    if args.evaluate and trained:
        _stage(4, f"evaluation of {len(trained)} persons on the Ray Serve renderer")
        try:
            with clock.stage("evaluation"):
                try:
                    summary = evaluation = _evaluate(args, trained)  # on the training's Ray, if it started one
                finally:
                    ray_session.close()
        except Exception as e:  # a full disk, a renderer that does not deploy: the avatars stand, the run says so
            if isinstance(e, OSError):
                kind, why = _stopping_error(e)
                print(f"error: the evaluation stopped on {_with_article(kind)}: {why}", file=sys.stderr)
                reason = f"{kind}: {why}"
            else:
                reason = f"{type(e).__name__}: {e}"
                traceback.print_exc()
                print(f"error: the evaluation stopped: {reason}", file=sys.stderr)
            evaluation_failed = dict.fromkeys(trained, f"evaluation: {reason}")
            code = code or 1
        else:
            evaluation_failed = dict(summary.failed)
            for person, reason in summary.failed.items():
                print(f"evaluation of {person} failed: {reason}")
            if summary.failed:
                code = code or 1
            reused = f" ({len(summary.reused)} up to date, not rendered again; --force redoes them)" \
                if summary.reused else ""
            print(f"evaluation: {len(summary.persons)} persons{reused}, {summary.frames_rendered} frames in "
                  f"{summary.seconds:.0f} s -> {summary.results_path}")
    ray_session.close()  # the training's Ray when nothing was evaluated
    _sweep_metrics_targets(args)  # what this night's killed trainings and replicas left: no exporter registers now
    if evaluation_failed is not None or code != exit_code(results):  # summary.json says what the process exits with
        rewritten = write_summary_json(results, written or summary_path, code, evaluation_failed=evaluation_failed)
        if rewritten is not None and rewritten != written:
            print(f"summary: {rewritten}")
    from jobs._console import final_summary

    try:
        print(final_summary(results, evaluation, None if args.verbose else args.workdir / "logs"))
    except (OSError, DataError) as e:  # the numbers are in results.json; the summary is a courtesy
        print(f"warning: no final summary: {e}", file=sys.stderr)
    clock.close()
    _report_stages(args, clock.rows())
    print(f"pipeline finished in {time.time() - t0:.1f} s (exit code {code})")
    return code


def _report_stages(args: LaunchAllArgs, rows: list[dict]) -> None:
    """Prints where the time went (wall and CPU seconds of this process and all it started, per
    stage) and writes it to <workdir>/runs/stages.json (benchmarks/bench_first_run.py reads it)."""
    if not rows:
        return
    print(format_stage_table(rows))
    try:
        atomic_write_json(args.workdir / "runs" / "stages.json",
                          {"stages": rows, "cpus": os.cpu_count(), "loadavg_1m_at_end": os.getloadavg()[0]})
    except OSError as e:  # a full disk must not turn a finished run into a traceback
        print(f"warning: could not write the stage times: {e}", file=sys.stderr)


if __name__ == "__main__":
    try:
        sys.exit(main(preset_cli(PRESETS, default="tiny", description=__doc__)))
    except (DataError, OSError) as e:  # bad input or an unusable work directory: nothing was run
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
