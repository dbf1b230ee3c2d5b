"""One entry point for every backend, plus the end-of-run summary and exit code.

``run_all(jobs, config)`` picks the backend from the config's type::

    LocalConfig -> LocalBackend   (sequential, in-process, for debugging)
    RayConfig   -> RayBackend     (Ray tasks named per person, resources reserved)
    SlurmConfig -> SlurmBackend   (submitit jobs or a job array, requeue on timeout)
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from cluster.local_backend import LocalBackend, LocalConfig
from cluster.person_job import JobResult, PersonJob
from common.io import atomic_write_json

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


def format_summary(results: list[JobResult], error_width: int = 80) -> str:
    """Fixed-width table (person, result, attempts, duration, error) and a verdict line
    naming the failed persons. The error's first line is shown whole, wrapped at
    `error_width` columns on word boundaries."""
    from cluster.status import format_duration

    header = ("PERSON", "RESULT", "ATTEMPTS", "RESTARTS", "DURATION", "ERROR")
    rows, reasons = [], []
    for r in results:
        err = (r.error or "").strip().splitlines()
        rows.append((r.person, "ok" if r.ok else "FAILED", str(r.attempts), str(r.restarts),
                     format_duration(r.duration_s), ""))
        # The whole first line of the error, wrapped at word boundaries (never cut mid-word).
        reasons.append(textwrap.wrap(err[0], error_width, break_long_words=False, break_on_hyphens=False)
                       if err else [""])
    widths = [max(len(x[i]) for x in [header, *rows]) for i in range(len(header) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths + [0])).rstrip()]
    indent = " " * (sum(widths) + 2 * len(widths))
    for row, reason in zip(rows, reasons):
        lines.append(("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + "  " + reason[0]).rstrip())
        lines += [indent + more for more in reason[1:]]
    failed = [r.person for r in results if not r.ok]
    ok = len(results) - len(failed)
    if failed:
        lines.append(f"{ok}/{len(results)} persons succeeded; FAILED: {', '.join(failed)}")
    else:
        lines.append(f"all {len(results)} persons succeeded")
    return "\n".join(lines)


def fallback_dir() -> Path:
    """Where the driver's own records go when the work directory cannot take them (full or
    read-only): the system temporary directory, usually another file system."""
    return Path(tempfile.gettempdir()) / "diffusion-avatars"


def write_summary_json(results: list[JobResult], path: Path, code: int | None = None,
                       evaluation_failed: dict[str, str] | None = None) -> Path | None:
    """Atomically write the results (one object per person) and the exit code as JSON; with
    ``evaluation_failed`` also the persons whose evaluation failed, with why (``evaluation_failed``).

    Best effort: when `path` cannot be written (a full or read-only disk), the summary goes
    to `fallback_dir()` instead, with a warning naming both paths. Returns the path written,
    or None when neither could be (the caller has printed the table anyway).
    """
    payload = {"exit_code": exit_code(results) if code is None else code, "results": [r.to_json() for r in results]}
    if evaluation_failed is not None:
        payload["evaluation_failed"] = dict(evaluation_failed)
    path = Path(path)
    fallback = fallback_dir() / f"summary-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"
    for target in (path, fallback):
        try:
            atomic_write_json(target, payload)
            return target
        except OSError as e:
            print(f"warning: cannot write the run summary to {target}: {e}", file=sys.stderr)
    return None


def check_workdir(path: Path, min_free_gb: float = 0.0) -> None:
    """Fail early, before any work, when `path` cannot hold the run: it must be creatable, a
    file must be writable and removable in it, and at least `min_free_gb` GiB must be free.
    Raises OSError naming the directory."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=path)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise OSError(e.errno, f"work directory {path} is not writable: {e.strerror}") from None
    free = shutil.disk_usage(path).free
    if free < min_free_gb * 2**30:
        raise OSError(errno.ENOSPC, f"work directory {path} has {free / 2**30:.2f} GiB free, less than the "
                                    f"{min_free_gb:g} GiB asked for (--min-free-gb)")
