"""The retry loop every backend shares: attempts of each person until one succeeds or its
``max_retries`` are used up.

A backend only says how to start an attempt, how to wait for attempts, what a finished one
returned and how to cancel one (:class:`AttemptRunner`); :func:`run_attempts` does the rest the
same way on every backend: any failed attempt (the target raised, the worker, node or job died)
is started again at once with the next attempt number, up to ``1 + max_retries`` attempts; a
person whose attempts are used up is reported failed (and, where the worker may have died
without writing it, marked failed in its status file); one person's failure never stops the
others; an interrupt (Ctrl-C, a signal) cancels every attempt still running.

No failure is treated as permanent and there is no back-off: the per-person targets resume from
their checkpoints, so a retry costs only the steps since the last one, and a failure that repeats
(bad data, a bug) fails every attempt with the same error, which the result then shows.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Hashable, Protocol

from cluster import status as _status
from cluster.person_job import JobResult, PersonJob

log = logging.getLogger(__name__)


class AttemptFailed(Exception):
    """A finished attempt without a result: ``error`` is the text for the status file and the
    :class:`JobResult`; ``restarts`` the SLURM requeues of the attempt (0 elsewhere)."""

    def __init__(self, error: str, restarts: int = 0):
        super().__init__(error)
        self.error = error
        self.restarts = restarts


class AttemptRunner(Protocol):
    """What a backend tells :func:`run_attempts`. A handle is whatever the backend uses for one
    running attempt (a Ray ObjectRef, a submitit Job)."""

    def submit(self, job: PersonJob, attempt: int) -> Hashable:
        """Start attempt ``attempt`` (1-based) of ``job``."""

    def wait(self, handles: list[Hashable]) -> list[Hashable]:
        """Block until at least one of ``handles`` has finished; return the finished ones."""

    def outcome(self, job: PersonJob, handle: Hashable) -> tuple[Any, int]:
        """(the target's result, SLURM restarts) of a finished attempt of ``job``; raises AttemptFailed."""

    def cancel(self, handle: Hashable) -> None:
        """Stop an attempt that is still running (best effort)."""

    def start_time(self, handle: Hashable) -> float | None:
        """When a finished attempt began to run (``time.time()``), where the backend knows it; None:
        a person's duration counts from the submission of its first attempt (queueing included)."""


def run_attempts(started: list[tuple[PersonJob, Hashable]], runner: AttemptRunner, status_dir: str | None,
                 mark_failed: bool = True) -> dict[str, JobResult]:
    """Wait for the first attempts ``started`` (already submitted, e.g. as one SLURM array) and
    retry failed ones; returns the results by person.

    ``mark_failed``: write ``failed`` with the error into the status file of a person whose last
    attempt failed (a killed Ray worker or SLURM job could not write it itself)."""
    t0 = time.time()
    pending: dict[Hashable, tuple[PersonJob, int, float]] = {h: (job, 1, t0) for job, h in started}
    results: dict[str, JobResult] = {}
    try:
        while pending:
            for handle in runner.wait(list(pending)):
                job, attempt, t_first = pending.pop(handle)
                started = runner.start_time(handle) if attempt == 1 else None
                if started is not None:
                    t_first = started
                try:
                    value, restarts = runner.outcome(job, handle)
                except AttemptFailed as e:
                    headline = e.error.splitlines()[0] if e.error else ""
                    if attempt <= job.max_retries:
                        log.warning("person %s attempt %d/%d failed, retrying: %s", job.person, attempt,
                                    job.max_retries + 1, headline)
                        pending[runner.submit(job, attempt + 1)] = (job, attempt + 1, t_first)
                        continue
                    log.error("person %s failed after %d attempt(s): %s", job.person, attempt, headline)
                    if mark_failed and status_dir is not None:
                        _status.write_state(status_dir, job.person, "failed", attempt=attempt, message=e.error[:1500])
                    results[job.person] = JobResult(job.person, False, attempt, error=e.error,
                                                    duration_s=time.time() - t_first, restarts=e.restarts)
                    continue
                log.info("person %s succeeded (attempt %d)", job.person, attempt)
                results[job.person] = JobResult(job.person, True, attempt, result=value,
                                                duration_s=time.time() - t_first, restarts=restarts)
    except BaseException:
        for handle in pending:
            try:
                runner.cancel(handle)
            except Exception:  # best effort while interrupted
                log.debug("could not cancel an attempt", exc_info=True)
        raise
    return results
