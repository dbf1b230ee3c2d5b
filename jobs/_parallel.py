"""Run one function per person in worker processes with a progress bar."""

from __future__ import annotations

import os
from typing import Callable, TypeVar

from tqdm import tqdm

from common.process_pool import WorkerDied, map_tolerant

T = TypeVar("T")
__all__ = ["ITEM_TIMEOUT_S", "WorkerDied", "check_item_timeout", "check_workers", "default_workers", "map_persons",
           "map_persons_tolerant"]

#: The data stages' default time limit of one item (one person's ingest, one shard): far above what a real person's
#: item takes (an ingest of ~200k images: minutes), and a hung read ends there instead of holding the night.
ITEM_TIMEOUT_S = 4 * 3600.0


def check_workers(workers: int) -> None:
    """Refuses ``--workers`` below 1 (it was taken as 1 without a word), as launch_all does: the commands call it
    from their options' ``__post_init__``, so tyro refuses it when the command line is parsed (exit code 2)."""
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")


def check_item_timeout(seconds: float, flag: str = "--item-timeout-s") -> None:
    """Refuses a data-stage item time limit that is no positive number of seconds (when the options are parsed)."""
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{flag} must be a positive number of seconds, got {seconds}")


def map_persons_tolerant(fn: Callable[[str], T], persons: list[str], workers: int,
                         desc: str, timeout_s: float | None = None) -> tuple[dict[str, T], dict[str, Exception]]:
    """Apply `fn` to each person, `workers` at a time; a failing person does not stop the others.

    With several workers, a worker process that dies (segfault, OOM kill) breaks the shared pool:
    the persons it left unfinished run again, each in a fresh process of its own, so that only the
    one whose process dies again fails (:class:`WorkerDied`). A person still running after
    `timeout_s` fails with :class:`~common.process_pool.ItemTimedOut`, its process killed (see
    :func:`~common.process_pool.map_tolerant`; with a limit the persons always run in worker
    processes). Returns (results, errors), both keyed by person.
    """
    results: dict[str, T] = {}
    errors: dict[str, Exception] = {}
    check_workers(workers)
    workers = max(1, min(workers, len(persons)))  # no more processes than persons (and one when there are none)
    with tqdm(total=len(persons), desc=desc, unit="person") as bar:
        def done(person: str, result: T, error: Exception | None) -> None:
            if error is None:
                results[person] = result
            else:
                errors[person] = error
            bar.update()

        def rerun(unfinished: list[str]) -> None:
            bar.write(f"{desc}: a worker process died or none finished within the time limit; running "
                      f"{', '.join(unfinished)} again, one process each")

        map_tolerant(fn, persons, workers, done, on_rerun=rerun, timeout_s=timeout_s)
    return {p: results[p] for p in persons if p in results}, {p: errors[p] for p in persons if p in errors}


def map_persons(fn: Callable[[str], T], persons: list[str], workers: int, desc: str) -> dict[str, T]:
    """Like `map_persons_tolerant`, but re-raises the first person's error after the others finish."""
    results, errors = map_persons_tolerant(fn, persons, workers, desc)
    if errors:
        raise next(iter(errors.values()))
    return results


def default_workers() -> int:
    return max(1, (os.cpu_count() or 1))
