"""Trainer callbacks of the cluster side: the status file and the Prometheus exporter.

``jobs/train_person.py`` attaches them (:func:`training_callbacks`) next to the ones every run
gets (``avatars.training.default_callbacks``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry

from avatars.training import TrainConfig, TrainerCallback, default_callbacks
from cluster.monitoring.metrics import Exporter, TrainingMetrics, start_exporter_in_range
from cluster.monitoring.targets import register, unregister
from cluster.status import StatusReporter


def memory_bytes() -> dict[str, float]:
    """Resident host memory of this process and, with CUDA, allocated / peak device memory."""
    import psutil

    mem = {"cpu_rss": float(psutil.Process().memory_info().rss)}
    if torch.cuda.is_available():
        mem["gpu_allocated"] = float(torch.cuda.memory_allocated())
        mem["gpu_peak"] = float(torch.cuda.max_memory_allocated())
    return mem


class PrometheusCallback(TrainerCallback):
    """Serves ``da_train_*`` gauges labelled by person on ``host`` (loopback unless told otherwise) at
    the first free port from ``first_port``, until the run ends or fails.

    The bound port is logged as a ``{"step", "metrics_port"}`` record (``{"step", "metrics_error"}`` without one).
    A registry per run: a Ray worker process may train several persons one after another.
    With ``targets_dir`` the bound exporter is written there as Prometheus target ``training-<person>.json``
    (``training-<person>-rank<r>.json`` for each process of a data-parallel run; :mod:`cluster.monitoring.targets`,
    labels person, component and rank) and removed as the exporter stops (a killed run's at the next sweep).
    """

    def __init__(self, first_port: int, host: str = "127.0.0.1", targets_dir: Path | None = None):
        self.first_port = first_port
        self.host = host
        self.targets_dir = targets_dir
        self.target_name: str | None = None
        self.registry = CollectorRegistry()
        self.metrics = TrainingMetrics(self.registry)
        self.exporter: Exporter | None = None

    def on_train_start(self, trainer) -> None:
        """An exporter that cannot start (every port of the range taken, an address the node does not have) is said
        in the run's log and metrics.jsonl, and the training goes on without it: monitoring must not fail hours of
        training on every retry."""
        try:
            self.exporter = start_exporter_in_range(self.first_port, self.registry, addr=self.host)
        except OSError as e:
            print(f"{trainer.config.person}: WARNING: training without its Prometheus exporter: {e}", file=sys.stderr,
                  flush=True)
            trainer.log({"step": trainer.state.step, "metrics_error": str(e)})
            return
        trainer.log({"step": trainer.state.step, "metrics_port": self.exporter.port})
        if self.targets_dir is not None:
            person = trainer.config.person
            labels = {"person": person, "component": "training"}
            name = f"training-{person}"
            if trainer.world_size > 1:  # an exporter per process: one target file each
                name, labels["rank"] = f"{name}-rank{trainer.rank}", str(trainer.rank)
            registered = register(self.targets_dir, name, self.host, self.exporter.port, labels)  # warns when it cannot
            if registered is not None:
                self.target_name = name

    def on_log(self, trainer, record: dict) -> None:
        if "loss" in record:
            self.metrics.observe_step(trainer.config.person, record["step"], record["loss"], record["samples_per_s"],
                                      learning_rates=record["lr"], memory_bytes=memory_bytes())

    def on_train_end(self, trainer, result: dict) -> None:
        self._stop()

    def on_train_error(self, trainer, error: BaseException) -> None:
        self._stop()  # a failed attempt's gauges must not stay scrapeable, nor its port taken

    def _stop(self) -> None:
        """The port is freed with the run: a Ray worker that trains the next person (or the next
        attempt) reuses it."""
        if self.target_name is not None:  # first: Prometheus stops scraping before the port closes
            unregister(self.targets_dir, self.target_name)
            self.target_name = None
        if self.exporter is not None:
            self.exporter.stop()
            self.exporter = None


class StatusCallback(TrainerCallback):
    """Reports every step into the status file of the attempt that runs the training, through the
    reporter the job boundary (:func:`cluster.person_job.run_attempt`) created for it."""

    def __init__(self, reporter: StatusReporter):
        self.reporter = reporter

    def on_step_end(self, trainer, step: int) -> None:
        self.reporter.progress(step, trainer.config.steps)


def training_callbacks(config: TrainConfig, status: StatusReporter | None = None) -> list[TrainerCallback]:
    """metrics.jsonl, progress bar, with ``status`` the status file and, with
    ``config.metrics_port``, Prometheus."""
    callbacks = default_callbacks(config.run_dir)
    if status is not None:
        callbacks.append(StatusCallback(status))
    if config.metrics_port is not None:
        callbacks.append(PrometheusCallback(config.metrics_port, config.metrics_host, config.metrics_targets_dir))
    return callbacks
