"""Run one attempt of one person's job in this process (thin CLI over ``run_attempt``).

Used by the sbatch templates in ``slurm/`` (no submitit needed on the node)::

    python -m cluster.run_person --person 017 [--target jobs.train_person:run] \\
        --kwargs-json '{"preset": "paper", "options": {"base_model": "/models/sd21"}}' --status-dir runs/status

Exit code 0 on success, 1 when the target raised (the error is in the status file and on
stderr), 2 for a bad argument (a person id, target or attempt number that is no such thing,
named in one usage line). The target's result is printed as one JSON line and optionally
written to ``--result-json``. ``SLURM_RESTART_COUNT`` (set by SLURM after a requeue) is
recorded as the restart count.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cluster.person_job import DEFAULT_TARGET, PERSON_RE, PersonJob, parse_target, run_attempt
from cluster.slurm_backend import slurm_restart_count
from common.io import atomic_write_json


def _job(ap: argparse.ArgumentParser, args: argparse.Namespace, kwargs: dict) -> PersonJob:
    """The job the arguments describe; a bad one is a usage error naming its option (exit code 2),
    not a traceback, and no status file is written for it."""
    if not PERSON_RE.match(args.person):
        ap.error(f"--person {args.person!r} is not a person id (letters, digits, '.', '_', '-')")
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
        result = run_attempt(job, args.attempt, args.status_dir, restarts=restarts)
    except Exception as e:
        print(f"person {args.person} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if args.result_json is not None:
        atomic_write_json(args.result_json, result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
