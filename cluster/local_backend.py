"""Sequential backend for debugging: runs every person's target in this process, one
after the other (breakpoints and tracebacks work as usual). A target that raises or calls
``sys.exit`` fails its attempt only; a crash that kills the process (segfault, SIGKILL) ends
the whole run; use the Ray or SLURM backend for isolation. Nothing is reserved: a job's ``resources``
are not applied (a job with 0 GPUs still finds this machine's GPU, which the trainer takes); jobs/launch_all.py
says so at launch when its --job-cpus / --job-gpus / --job-memory-gb are given."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from cluster import status as _status
from cluster.attempts import AttemptFailed, run_attempts
from cluster.person_job import JobResult, PersonJob, check_jobs, format_exception, run_attempt

log = logging.getLogger(__name__)


@dataclass
class LocalConfig:
    """Configuration of :class:`LocalBackend`."""

    status_dir: Path | None = None
    """Directory of per-person status files (``cluster.status``); None writes none."""


class LocalBackend:
    """Runs jobs sequentially in the calling process, retrying each up to ``max_retries``."""

    name = "local"

    def __init__(self, config: LocalConfig | None = None):
        self.config = config or LocalConfig()

    def run_all(self, jobs: list[PersonJob]) -> list[JobResult]:
        check_jobs(jobs)
        sdir = self.config.status_dir
        if sdir is not None:
            for job in jobs:
                # the persons run in this process: killed, it takes every queued one with it
                _status.write_state(sdir, job.person, "queued", attempt=1, restarts=0, message="",
                                    dies_with_writer=True)
        runner = _InProcessAttempts(jobs, sdir)
        # run_attempt has written each failed attempt's error into the status file already
        results = run_attempts([(job, runner.submit(job, 1)) for job in jobs], runner, sdir, mark_failed=False)
        return [results[j.person] for j in jobs]


@dataclass(eq=False)  # hashed by identity: the handle of one attempt
class _Attempt:
    order: int
    job: PersonJob
    number: int
    result: dict | None = None
    error: str | None = None
    started: float | None = None


class _InProcessAttempts:
    """:class:`cluster.attempts.AttemptRunner` that runs an attempt when it is waited for, the
    earliest person first: each person's attempts run back to back, in the order of the jobs."""

    def __init__(self, jobs: list[PersonJob], status_dir: Path | None):
        self.order = {job.person: i for i, job in enumerate(jobs)}
        self.status_dir = status_dir

    def submit(self, job: PersonJob, attempt: int) -> _Attempt:
        return _Attempt(self.order[job.person], job, attempt)

    def wait(self, handles: list[_Attempt]) -> list[_Attempt]:
        attempt = min(handles, key=lambda a: a.order)
        attempt.started = time.time()
        try:
            attempt.result = run_attempt(attempt.job, attempt.number, self.status_dir)
        except Exception as e:
            attempt.error = format_exception(e)
        except SystemExit as e:  # sys.exit in the target (or a library it calls) ends its attempt, not the run
            attempt.error = format_exception(e)
            if self.status_dir is not None:  # run_attempt leaves SystemExit alone (submitit's requeue exit)
                _status.write_state(self.status_dir, attempt.job.person, "failed", attempt=attempt.number,
                                    message=format_exception(e, limit_chars=1500))
        return [attempt]

    def outcome(self, job: PersonJob, attempt: _Attempt) -> tuple[dict, int]:
        if attempt.error is not None:
            raise AttemptFailed(attempt.error)
        return attempt.result, 0

    def cancel(self, attempt: _Attempt) -> None:
        """Nothing runs in the background."""

    def start_time(self, attempt: _Attempt) -> float | None:
        return attempt.started
