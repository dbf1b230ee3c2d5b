"""One entry point for every backend, plus the end-of-run summary and exit code.

``run_all(jobs, config)`` picks the backend from the config's type::

    LocalConfig -> LocalBackend   (sequential, in-process, for debugging)
    RayConfig   -> RayBackend     (Ray tasks named per person, resources reserved)
    SlurmConfig -> SlurmBackend   (submitit jobs or a job array, requeue on timeout)
"""

from __future__ import annotations

from pathlib import Path

from cluster.jobs import JobResult, PersonJob
from cluster.local_backend import LocalBackend, LocalConfig
from shards.contract import atomic_write_json

#: Exit code when at least one person failed (0 when all succeeded).
EXIT_SOME_FAILED = 1


def make_backend(config):
    """The backend object for a config instance (imports Ray/submitit only when needed)."""
    if isinstance(config, LocalConfig):
        return LocalBackend(config)
    from cluster.ray_backend import RayBackend, RayConfig
    if isinstance(config, RayConfig):
        return RayBackend(config)
    from cluster.slurm_backend import SlurmBackend, SlurmConfig
    if isinstance(config, SlurmConfig):
        return SlurmBackend(config)
    raise TypeError(f"unknown backend config {type(config).__name__}; expected LocalConfig, RayConfig or SlurmConfig")


def run_all(jobs: list[PersonJob], config) -> list[JobResult]:
    """Run every job on the backend ``config`` selects; one JobResult per job, in order.

    A failing person never stops the others: it is retried up to its ``max_retries`` and
    then reported as failed in its JobResult.
    """
    return make_backend(config).run_all(jobs)


def exit_code(results: list[JobResult]) -> int:
    """0 when every person succeeded, ``EXIT_SOME_FAILED`` otherwise."""
    return 0 if results and all(r.ok for r in results) else EXIT_SOME_FAILED


def format_summary(results: list[JobResult]) -> str:
    """Fixed-width table (person, result, attempts, duration, error) and a verdict line
    naming the failed persons."""
    from cluster.status import format_duration

    header = ("PERSON", "RESULT", "ATTEMPTS", "RESTARTS", "DURATION", "ERROR")
    rows = []
    for r in results:
        err = (r.error or "").strip().splitlines()
        rows.append((r.person, "ok" if r.ok else "FAILED", str(r.attempts), str(r.restarts),
                     format_duration(r.duration_s), (err[0][:80] if err else "")))
    widths = [max(len(x[i]) for x in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(x, widths)).rstrip() for x in [header, *rows]]
    failed = [r.person for r in results if not r.ok]
    ok = len(results) - len(failed)
    if failed:
        lines.append(f"{ok}/{len(results)} persons succeeded; FAILED: {', '.join(failed)}")
    else:
        lines.append(f"all {len(results)} persons succeeded")
    return "\n".join(lines)


def write_summary_json(results: list[JobResult], path: Path) -> None:
    """Atomically write the results (one object per person) and the exit code as JSON."""
    atomic_write_json(Path(path), {"exit_code": exit_code(results), "results": [r.to_json() for r in results]})
