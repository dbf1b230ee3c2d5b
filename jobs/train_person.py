"""Train one person's avatar from its shards (DeepSpeed; resumable with --resume auto).

    python jobs/train_person.py [tiny|paper] --person 000 [--base-model PATH] [--steps N ...]

The first argument picks a complete preset (default tiny); ``paper --help`` shows every value the
paper preset uses. Several processes (torchrun / the deepspeed launcher / Ray / srun) train one
person data-parallel: each reads RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT from the
environment. The run reports to metrics.jsonl, a progress bar, the orchestrator's status file
and, with --metrics-port, Prometheus (cluster.monitoring.training).
"""

from __future__ import annotations

from typing import Any

from avatars.training import PRESETS, TrainConfig, TrainOptions
from cluster.status import StatusReporter
from common.configs import from_jsonable, merge, to_jsonable
from jobs._presets import preset_cli


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
        return train(TrainConfig.for_person(options, person=person, **fields), status)
    data = merge(to_jsonable(PRESETS[preset][1]), options or {})
    return train(from_jsonable(TrainConfig, {**data, **to_jsonable(fields), "person": person}), status)


def main(args: list[str] | None = None) -> dict:
    presets = {name: (text, TrainConfig.for_person(options)) for name, (text, options) in PRESETS.items()}
    return train(preset_cli(presets, default="tiny", description=__doc__, args=args))


if __name__ == "__main__":
    print(main())
