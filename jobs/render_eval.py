"""Render and evaluate every trained person, write results.json, videos and the nightly report.

    python -m jobs.render_eval --runs runs --shards data/shards --stores data/zarr \
        --reports-root /data/nightly [--renderer.num-gpus 1] [--parallel-persons 4]

Tasks: self-reenactment (held-out sequences, held-out frontal camera), novel views (training
sequences, held-out camera), cross-reenactment (person A's avatar with the next person's
expression codes; synthetic captures only). Output: `<reports-root>/runs/<date>/results.json`,
`videos/<person>/<task>-<key>.mp4` and `<reports-root>/site/<date>/index.html`. Exit code 0 when
every person rendered every task, 1 when a person or a task failed (see results.json), 2 on
invalid input (naming the flag or the file; a metric network that does not load stops the run
before any person renders), 143 when stopped by SIGTERM (a SLURM time limit or scancel: the
persons finished by then are saved first, and the next run renders only the others).
"""

from __future__ import annotations

import logging
import signal
import sys

import tyro

from cluster.eval_driver import EvalDriverConfig, run_evaluation
from cluster.eval_driver.person import MetricsUnavailable
from common.io import DataError


class Stopped(SystemExit):
    """SIGTERM (a SLURM time limit, scancel) as an exception: the night's finished persons are saved on the way
    out (Python's default for SIGTERM ends the process at once: everything since the last periodic save was lost)."""


def _stop(signum: int, frame) -> None:
    raise Stopped(128 + signum)


def main(config: EvalDriverConfig) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _stop)
    try:
        summary = run_evaluation(config)
    except (DataError, MetricsUnavailable) as e:  # bad input found before anything rendered
        print(f"render_eval: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except Stopped as e:
        print("render_eval: stopped by SIGTERM; the persons finished by then are saved in results.json, the next "
              "run renders the others", file=sys.stderr)
        return int(e.code)
    print(f"results: {summary.results_path}")
    if summary.report_index:
        print(f"report:  {summary.report_index}")
    print(f"{len(summary.persons) - len(summary.failed)}/{len(summary.persons)} persons, "
          f"{summary.frames_rendered} frames in {summary.seconds:.1f} s")
    for person, reason in sorted(summary.failed.items()):
        print(f"FAILED {person}: {reason}", file=sys.stderr)
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(EvalDriverConfig, description=__doc__)))
