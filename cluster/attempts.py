"""The retry loop every backend shares: attempts of each person until one succeeds or its
``max_retries`` are used up.

A backend only says how to start an attempt, how to wait for attempts, what a finished one
returned and how to cancel one (:class:`AttemptRunner`); :func:`run_attempts` does the rest the
same way on every backend: any failed attempt (the target raised, the worker, node or job died,
or its submission raised: sbatch refused it, the controller did not answer) is started again at
once with the next attempt number, up to ``1 + max_retries`` attempts; a person whose attempts
are used up is reported failed (and, where the worker may have died without writing it or the
attempt was never submitted, marked failed in its status file); one person's failure never
stops the others; an interrupt (Ctrl-C, a signal) cancels every attempt still running.

No failure is treated as permanent and there is no back-off: the per-person targets resume from
their checkpoints, so a retry costs only the steps since the last one, and a failure that repeats
(bad data, a bug) fails every attempt with the same error, which the result then shows.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Hashable, Protocol, Sequence

from cluster import status as _status
from cluster.person_job import JobResult, PersonJob, short_error

log = logging.getLogger(__name__)


class AttemptFailed(Exception):
    """A finished attempt without a result: ``error`` is the text for the status file and the
    :class:`JobResult`; ``restarts`` the SLURM requeues of the attempt (0 elsewhere)."""

    def __init__(self, error: str, restarts: int = 0):
        error = short_error(error)  # every backend's: a megabyte message is not copied into each summary and log
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


def submission_error(exc: Exception) -> str:
    """The error of an attempt that could not be submitted (sbatch refused it, the controller did not
    answer): it counts as a failed attempt of its person only."""
    return f"submission failed: {type(exc).__name__}: {exc}"


def submit_first(jobs: list[PersonJob], runner: AttemptRunner) -> tuple[list[tuple[PersonJob, Hashable]],
                                                                        list[tuple[PersonJob, str]]]:
    """Submit attempt 1 of every job: (the submitted ones with their handle, the ones whose submission
    raised with its error) for :func:`run_attempts`. An interrupt cancels what was already submitted, so
    no job is left running without a driver."""
    started: list[tuple[PersonJob, Hashable]] = []
    unsubmitted: list[tuple[PersonJob, str]] = []
    try:
        for job in jobs:
            try:
                started.append((job, runner.submit(job, 1)))
            except Exception as e:  # this person's submission only: the others go on
                unsubmitted.append((job, submission_error(e)))
    except BaseException:
        cancel_all(runner, [h for _, h in started])
        raise
    return started, unsubmitted


def cancel_all(runner: AttemptRunner, handles: list[Hashable]) -> None:
    """Cancel every attempt of ``handles`` (best effort: one that cannot be cancelled does not stop the rest)."""
    for handle in handles:
        try:
            runner.cancel(handle)
        except Exception:  # best effort while interrupted
            log.debug("could not cancel an attempt", exc_info=True)


class _Loop:
    """The state of one :func:`run_attempts`: the attempts running and the persons decided."""

    def __init__(self, runner: AttemptRunner, status_dir: str | None, mark_failed: bool):
        self.runner, self.status_dir, self.mark_failed = runner, status_dir, mark_failed
        self.pending: dict[Hashable, tuple[PersonJob, int, float]] = {}
        self.results: dict[str, JobResult] = {}

    def failed(self, job: PersonJob, attempt: int, error: AttemptFailed, t_first: float,
               submitted: bool = True) -> None:
        """Attempt ``attempt`` of ``job`` failed: submit the next one while attempts are left (a
        submission that raises is itself a failed attempt), else record the person as failed."""
        while attempt <= job.max_retries:
            headline = error.error.splitlines()[0] if error.error else ""
            log.warning("person %s attempt %d/%d failed, retrying: %s", job.person, attempt,
                        job.max_retries + 1, headline)
            attempt += 1
            try:
                self.pending[self.runner.submit(job, attempt)] = (job, attempt, t_first)
                return
            except Exception as e:
                error, submitted = AttemptFailed(submission_error(e)), False
        log.error("person %s failed after %d attempt(s): %s", job.person, attempt,
                  error.error.splitlines()[0] if error.error else "")
        # no attempt ran to write a failed submission's verdict: the loop writes it on every backend
        if (self.mark_failed or not submitted) and self.status_dir is not None:
            _status.write_state(self.status_dir, job.person, "failed", attempt=attempt, message=error.error[:1500])
        self.results[job.person] = JobResult(job.person, False, attempt, error=error.error,
                                             duration_s=time.time() - t_first, restarts=error.restarts)

    def finished(self, handle: Hashable) -> None:
        """Take the outcome of a finished attempt."""
        job, attempt, t_first = self.pending.pop(handle)
        started = self.runner.start_time(handle) if attempt == 1 else None
        if started is not None:
            t_first = started
        try:
            value, restarts = self.runner.outcome(job, handle)
        except AttemptFailed as e:
            self.failed(job, attempt, e, t_first)
            return
        log.info("person %s succeeded (attempt %d)", job.person, attempt)
        self.results[job.person] = JobResult(job.person, True, attempt, result=value,
                                             duration_s=time.time() - t_first, restarts=restarts)


def run_attempts(started: list[tuple[PersonJob, Hashable]], runner: AttemptRunner, status_dir: str | None,
                 mark_failed: bool = True, unsubmitted: Sequence[tuple[PersonJob, str]] = ()) -> dict[str, JobResult]:
    """Wait for the first attempts ``started`` (already submitted, e.g. as one SLURM array) and
    retry failed ones; returns the results by person.

    ``mark_failed``: write ``failed`` with the error into the status file of a person whose last
    attempt failed (a killed Ray worker or SLURM job could not write it itself). ``unsubmitted``:
    persons whose first attempt could not be submitted, with the error (:func:`submit_first`); like
    a retry whose submission raises, that is a failed attempt of the person alone."""
    t0 = time.time()
    loop = _Loop(runner, status_dir, mark_failed)
    loop.pending.update({h: (job, 1, t0) for job, h in started})
    try:
        for job, error in unsubmitted:
            loop.failed(job, 1, AttemptFailed(error), t0, submitted=False)
        while loop.pending:
            for handle in runner.wait(list(loop.pending)):
                loop.finished(handle)
    except BaseException:
        cancel_all(runner, list(loop.pending))
        raise
    return loop.results
