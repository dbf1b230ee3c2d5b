"""Train one person's avatar from its shards (DeepSpeed; resumable with --resume auto).

    python jobs/train_person.py [tiny|paper] --person 000 [--base-model PATH] [--steps N ...]

The first argument picks a complete preset (default tiny); ``paper --help`` shows every value the
paper preset uses. Several processes (torchrun / the deepspeed launcher / Ray / srun) train one
person data-parallel: each reads RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT from the
environment. The run reports to metrics.jsonl, a progress bar, the orchestrator's status file
and, with --metrics-port, Prometheus (cluster.monitoring.training).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from avatars.training import PRESETS, TrainConfig, TrainOptions
from avatars.training.base_record import BaseMismatch
from avatars.training.config import ResumeMismatch, TrainingDiverged
from cluster.status import StatusReporter
from common.configs import from_jsonable, merge, to_jsonable
from common.io import DataError
from jobs._presets import UsageError, preset_cli


def train(config: TrainConfig, status: StatusReporter | None = None) -> dict:
    """Train with every callback a cluster run has (the status file with ``status``)."""
    # imported here: the options are parsed (and refused, or --help printed) before diffusers' ~10 s import
    from avatars.training import train_person
    from cluster.monitoring.training import training_callbacks

    return train_person(config, training_callbacks(config, status))


def run(person: str, options: TrainOptions | dict[str, Any] | None = None, preset: str = "tiny",
        log_file: str | None = None, status: StatusReporter | None = None, **fields: Any) -> dict:
    """Cluster entry point (``jobs.train_person:run``, the default target of every backend and
    sbatch template): train ``person`` with ``options`` and the per-person ``fields`` of
    :class:`TrainConfig` (shards, out, random_base).

    The orchestrator passes a :class:`TrainOptions` and typed fields (``Path``), used as they are;
    a JSON caller (``cluster.run_person --kwargs-json``, the sbatch templates) passes a dict of
    overrides of preset ``preset``'s options (nested, e.g. ``{"steps": 100, "model":
    {"use_expression": false}}``) and paths as strings: they are typed and checked like any
    config. With ``log_file``, everything the training prints (library notices, the progress
    bar, a traceback) goes to the end of that file instead of the worker's terminal
    (launch_all's ``<workdir>/logs/<person>.log``). ``status``: the attempt's status reporter,
    which ``cluster.person_job.run_attempt`` passes; the run reports its steps through it."""
    if log_file is not None:
        from jobs._console import output_to

        with output_to(log_file):
            return run(person, options, preset, status=status, **fields)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if isinstance(options, TrainOptions):  # typed in, typed through: no JSON round trip
        config = TrainConfig.for_person(options, person=person, **fields)
    else:
        data = merge(to_jsonable(PRESETS[preset][1]), options or {})
        config = from_jsonable(TrainConfig, {**data, **to_jsonable(fields), "person": person})
    check_base_choice(config)
    return train(_continue_a_requeued_run(config, status), status)


def _continue_a_requeued_run(config: TrainConfig, status: StatusReporter | None) -> TrainConfig:
    """``--resume never`` starts over on the first run only: a SLURM requeue of the job (a time limit, a
    preemption; the same call again) continues from the checkpoints that run wrote, instead of deleting them
    at every requeue and never finishing. (launch_all clears once itself and passes 'auto'.)"""
    from cluster.slurm_backend import slurm_restart_count

    restarts = max(slurm_restart_count(), status.restarts if status is not None else 0)
    if config.resume == "never" and restarts > 0:
        print(f"{config.person}: --resume never, requeued (restart {restarts}): continuing from the checkpoints "
              "of this run", flush=True)
        return dataclasses.replace(config, resume="auto")
    return config


def check_base_choice(config: TrainConfig) -> None:
    """A :class:`UsageError` naming --base-model when the model needs a pretrained base and none is given, checked
    before the trainer: its set-up clears the run folder for --resume never before it builds the model, which then
    refused the run, so a forgotten --base-model deleted the person's avatar."""
    if (problem := config.base_problem()) is not None:
        raise UsageError(problem)


def check_inputs(config: TrainConfig) -> None:
    """What the run reads, checked before the model's import (~10 s): the person's complete shard manifest, which
    lists 'train' shards, and the --base-model directory (with unet/ and vae/); a DataError naming the file if not."""
    from shards.integrity import MANIFEST
    from shards.writer import shard_paths

    if not shard_paths(config.shards, config.person, "train"):  # a missing or incomplete manifest: DataError
        raise DataError(Path(config.shards) / config.person / MANIFEST,
                        f"lists no 'train' shards of person {config.person}")
    if config.base_model is not None:
        base = Path(config.base_model)
        if not base.is_dir():
            raise DataError(base, "no such directory (--base-model: a local diffusers directory, e.g. Stable "
                                  "Diffusion 2.1 saved with save_pretrained)")
        missing = [f"{sub}/config.json" for sub in ("unet", "vae") if not (base / sub / "config.json").is_file()]
        if missing:
            raise DataError(base, f"lacks {' and '.join(missing)}: not a diffusers base model (--base-model)")


def parse_args(args: list[str] | None = None) -> TrainConfig:
    """The command line (default: ``sys.argv[1:]``) as a config: a preset name first, then its overrides."""
    presets = {name: (text, TrainConfig.for_person(options)) for name, (text, options) in PRESETS.items()}
    return preset_cli(presets, default="tiny", description=__doc__, args=args)


def main(args: list[str] | None = None) -> dict:
    config = parse_args(args)
    check_base_choice(config)
    check_inputs(config)
    return train(config)


if __name__ == "__main__":
    try:
        print(main())
    # bad input (a missing --base-model, a missing file), or checkpoints this run must not resume
    except (UsageError, DataError, BaseMismatch, ResumeMismatch) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as e:  # a failed run (nothing of it saved), said in one line with what to try
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
