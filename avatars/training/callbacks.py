"""Training callbacks: what watches a run, kept out of the :class:`~avatars.training.trainer.Trainer`.

The trainer calls every callback's hooks in list order, on rank 0 only (see the Trainer's
docstring for when each hook runs). This module holds the callbacks every run uses
(:func:`default_callbacks`: ``metrics.jsonl`` and the progress bar); the cluster side adds the
status file (``cluster.monitoring.training.StatusCallback``) and Prometheus
(``cluster.monitoring.training.PrometheusCallback``), which ``jobs/train_person.py`` attaches.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from common.io import DataError, atomic_write_bytes, naming

if TYPE_CHECKING:
    from .trainer import Trainer

METRICS_FILE = "metrics.jsonl"


class TrainerCallback:
    """Base class: every hook does nothing; override the ones you need."""

    def on_train_start(self, trainer: Trainer) -> None:
        """After set-up and resume, before the first step (``trainer.state.step`` = resumed step)."""

    def on_step_end(self, trainer: Trainer, step: int) -> None:
        """After every optimizer step."""

    def on_log(self, trainer: Trainer, record: dict) -> None:
        """For every record the run logs (training windows, validations, records added by callbacks)."""

    def on_validation(self, trainer: Trainer, step: int, metrics: dict) -> None:
        """After a validation render, with its metrics (val_psnr, val_lpips)."""

    def on_checkpoint(self, trainer: Trainer, step: int, path: Path) -> None:
        """After a complete checkpoint was written to ``path``."""

    def on_train_end(self, trainer: Trainer, result: dict) -> None:
        """After the final model and result.json were written."""

    def on_train_error(self, trainer: Trainer, error: BaseException) -> None:
        """The run raised instead of ending (possibly before ``on_train_start``): release what the
        callback holds, as ``on_train_end`` would; the error is raised on afterwards."""


def truncate_jsonl(path: Path, after_step: int, records: int | None = None) -> int:
    """Drop what a run logged after the checkpoint it resumes from: lines past ``after_step`` and, when given,
    every line after the first ``records`` (the end-of-run lines of a run that is resumed at its last step, to
    log them again). A last line that does not parse is what a process killed mid-write left: it is dropped with
    a warning; any other line that does not parse is an error naming the file and line. Returns the lines kept."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    last = max((number for number, line in enumerate(lines, 1) if line), default=0)
    keep = []
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            step = json.loads(line).get("step", 0)
        except (json.JSONDecodeError, AttributeError) as e:
            if number < last:
                raise DataError(path, f"line {number} is not a JSON object ({e}); the metrics log is damaged: "
                                      "repair or remove that line, or start over with --resume never") from None
            warnings.warn(f"{path}: dropped its last line, cut off mid-write: {line[:80]!r}", stacklevel=2)
            continue
        if step <= after_step:
            keep.append(line)
    if records is not None:
        keep = keep[:records]
    atomic_write_bytes(path, "".join(line + "\n" for line in keep).encode())
    return len(keep)


class MetricsLog(TrainerCallback):
    """``<run>/metrics.jsonl``: one JSON line per logged record.

    On start it drops what a killed run logged past the checkpoint it resumes from (with
    ``--resume never``, the whole file), so the file reads as one uninterrupted run. A run resumed at
    its last step to end it again drops the end-of-run lines it will log again; one extended with a
    larger ``--steps`` keeps them (they measured the weights of that step, which it does not validate
    again), and the checkpointed count of records then counts them.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_train_start(self, trainer: Trainer) -> None:
        if trainer.config.resume == "never":
            self.path.unlink(missing_ok=True)
        state = trainer.state
        ends_again = state.step >= trainer.config.steps
        kept = truncate_jsonl(self.path, state.step, state.records if ends_again else None)
        if state.records is not None:
            state.records = kept  # what the next checkpoint counts on from: the lines in the file

    def on_log(self, trainer: Trainer, record: dict) -> None:
        with naming(self.path), self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class ProgressBar(TrainerCallback):
    """A tqdm bar over the optimizer steps, showing the latest logged loss."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def on_train_start(self, trainer: Trainer) -> None:
        cfg = trainer.config
        self.bar = tqdm(total=cfg.steps, initial=trainer.state.step, desc=f"train {cfg.person}", unit="step")

    def on_step_end(self, trainer: Trainer, step: int) -> None:
        self.bar.update()

    def on_log(self, trainer: Trainer, record: dict) -> None:
        if "loss" in record:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}")

    def on_train_end(self, trainer: Trainer, result: dict) -> None:
        self.bar.close()

    def on_train_error(self, trainer: Trainer, error: BaseException) -> None:
        if self.bar is not None:
            self.bar.close()


def default_callbacks(run_dir: Path) -> list[TrainerCallback]:
    """What every run gets: ``metrics.jsonl`` in ``run_dir`` and a progress bar."""
    return [MetricsLog(Path(run_dir) / METRICS_FILE), ProgressBar()]
