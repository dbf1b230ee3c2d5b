"""Train one person's avatar from its shards (DeepSpeed; resumable with --resume auto).

    python jobs/train_person.py --person 000 [--preset tiny] [--base-model PATH]

Several processes (torchrun / the deepspeed launcher / Ray / srun) train one person
data-parallel: each reads RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT from the
environment. The run reports to metrics.jsonl, a progress bar, the orchestrator's status
file and, with --metrics-port, Prometheus (cluster.monitoring.training).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import tyro

from avatars.training import TrainConfig, train_person
from cluster.monitoring.training import training_callbacks


def train(config: TrainConfig) -> dict:
    """Train with every callback a cluster run has."""
    return train_person(config, training_callbacks(config))


def run(person: str, **overrides) -> dict:
    """Cluster entry point (`jobs.train_person:run`): train `person` with config overrides."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f"unknown training options: {sorted(unknown)}")
    paths = {k: Path(v) for k, v in overrides.items() if k in ("shards", "out", "base_model", "lpips_weights") and v}
    return train(TrainConfig(person=person, **{**overrides, **paths}))


if __name__ == "__main__":
    result = train(tyro.cli(TrainConfig))
    print(result)
