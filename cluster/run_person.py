"""Run one attempt of one person's job in this process (thin CLI over ``run_attempt``).

Used by the sbatch templates in ``slurm/`` (no submitit needed on the node)::

    python -m cluster.run_person --person 017 [--target jobs.train_person:run] \\
        --kwargs-json '{"preset": "paper", "options": {"base_model": "/models/sd21"}}' --status-dir runs/status

Exit code 0 on success, 1 when the target raised (the error is in the status file and on
stderr), 2 for a bad argument (a person id, target or attempt number that is no such thing,
named in one usage line), 143 when SIGTERM stopped it. The target's result is printed as one
JSON line and optionally written to ``--result-json``. ``SLURM_RESTART_COUNT`` (set by SLURM
after a requeue) is recorded as the restart count.

SIGTERM (``scancel``, the time limit, a preemption, a requeue by ``slurm/run_requeueable.sh`` or
anyone) ends the attempt with its status file saying so: ``queued`` when SLURM requeued the job (its
``Restarts`` count, asked of ``scontrol``, is past ``SLURM_RESTART_COUNT``), else ``failed``.
Before, the process died where it stood and the file said ``running`` for good.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from cluster import status as _status
from cluster.person_job import DEFAULT_TARGET, PERSON_RE, PersonJob, parse_target, run_attempt
from cluster.slurm_backend import slurm_restart_count
from common.io import atomic_write_json
from common.names import PERSON_ID_RULE

#: Exit code after SIGTERM, as a shell reports a process it ended (128 + 15).
EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(BaseException):
    """SIGTERM reached the attempt. A BaseException, as KeyboardInterrupt: no ``except Exception`` in the
    target takes it for an error of its own and carries on."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated` in this process (a child forked meanwhile, such as a
    data-loader worker, keeps the default: it just ends). A second SIGTERM is ignored, so that the status
    file is written; SLURM's SIGKILL follows anyway."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread (an in-process call from a test thread)
        return
    pid = os.getpid()

    def handler(signum: int, frame: object) -> None:
        if os.getpid() != pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        signal.signal(signum, signal.SIG_IGN)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _requeued(restarts: int) -> bool | None:
    """Whether SLURM requeued the job this process runs in (None: it could not be asked). At the requeue's
    SIGTERM ``scontrol`` already counts the restart to come; a cancelled job's count is the one it started
    with (checked against a real SLURM)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=20,
                             check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"\bRestarts=(\d+)", out)
    return None if found is None else int(found.group(1)) > restarts


def _record_termination(args: argparse.Namespace, restarts: int) -> None:
    """The status file after SIGTERM: ``queued`` for a requeued job (it runs again), else ``failed``."""
    requeued = _requeued(restarts)
    if requeued:
        print(f"person {args.person}: stopped by SIGTERM; SLURM requeued the job, it runs again", file=sys.stderr)
        if args.status_dir is not None:
            _status.write_state(args.status_dir, args.person, "queued", attempt=args.attempt, restarts=restarts + 1,
                                message=f"requeued by SLURM (restart {restarts + 1})",
                                dies_with_writer=False)  # this process ends; SLURM runs the job again
        return
    message = "stopped by SIGTERM: the job was cancelled, reached its time limit or was preempted"
    if requeued is None:
        message += " (scontrol could not say whether SLURM requeued it; if so, it shows running again)"
    print(f"person {args.person}: {message}", file=sys.stderr)
    if args.status_dir is not None:
        _status.write_state(args.status_dir, args.person, "failed", attempt=args.attempt, restarts=restarts,
                            message=message)


def _job(ap: argparse.ArgumentParser, args: argparse.Namespace, kwargs: dict) -> PersonJob:
    """The job the arguments describe; a bad one is a usage error naming its option (exit code 2),
    not a traceback, and no status file is written for it."""
    if not PERSON_RE.match(args.person):
        ap.error(f"--person {args.person!r} is not a person id ({PERSON_ID_RULE})")
    try:
        parse_target(args.target)
    except ValueError as e:
        ap.error(f"--target: {e}")
    if args.attempt < 1:
        ap.error(f"--attempt must be 1 or more, got {args.attempt}")
    try:
        return PersonJob(args.person, args.target, kwargs, max_retries=0)
    except ValueError as e:  # what is left to refuse: a reserved key in the kwargs
        ap.error(f"--kwargs-json: {e}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--person", required=True, help="person id")
    ap.add_argument("--target", default=DEFAULT_TARGET,
                    help="importable 'package.module:function' (default: %(default)s)")
    ap.add_argument("--kwargs-json", default="{}", help="keyword arguments for the target, as a JSON object")
    ap.add_argument("--status-dir", type=Path, default=None, help="directory of per-person status files")
    ap.add_argument("--attempt", type=int, default=1, help="attempt number recorded in the status file")
    ap.add_argument("--result-json", type=Path, default=None, help="also write the target's result here")
    args = ap.parse_args(argv)
    try:
        kwargs = json.loads(args.kwargs_json)
    except ValueError as e:
        ap.error(f"--kwargs-json is not valid JSON: {e}")
    if not isinstance(kwargs, dict):
        ap.error("--kwargs-json must be a JSON object")
    job = _job(ap, args, kwargs)
    restarts = slurm_restart_count()
    try:
        with _sigterm_raises():
            try:
                result = run_attempt(job, args.attempt, args.status_dir, restarts=restarts)
            except Terminated:  # recorded while SIGTERM is still ignored: SLURM and the wrapper both send one
                _record_termination(args, restarts)
                return EXIT_TERMINATED
    except Exception as e:
        print(f"person {args.person} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if args.result_json is not None:
        atomic_write_json(args.result_json, result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
