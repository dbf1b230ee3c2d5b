"""Sequential backend for debugging: runs every person's target in this process, one
after the other (breakpoints and tracebacks work as usual). A crash that kills the
process (segfault, SIGKILL) ends the whole run; use the Ray or SLURM backend for isolation."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from cluster import status as _status
from cluster.person_job import JobResult, PersonJob, check_jobs, format_exception, run_attempt

log = logging.getLogger(__name__)


@dataclass
class LocalConfig:
    """Configuration of :class:`LocalBackend`."""

    #: Directory of per-person status files (``cluster.status``); None writes none.
    status_dir: Path | None = None


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
                _status.write_state(sdir, job.person, "queued", attempt=1, restarts=0, message="")
        return [self._run_one(job) for job in jobs]

    def _run_one(self, job: PersonJob) -> JobResult:
        t0 = time.time()
        error = None
        for attempt in range(1, job.max_retries + 2):
            try:
                result = run_attempt(job, attempt, self.config.status_dir)
            except Exception as e:
                error = format_exception(e)
                log.warning("person %s attempt %d/%d failed: %s", job.person, attempt, job.max_retries + 1,
                            error.splitlines()[0])
                continue
            return JobResult(job.person, True, attempt, result=result, duration_s=time.time() - t0)
        return JobResult(job.person, False, job.max_retries + 1, error=error, duration_s=time.time() - t0)
