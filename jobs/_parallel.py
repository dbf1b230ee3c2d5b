"""Run one function per person in worker processes with a progress bar."""

from __future__ import annotations

import os
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, as_completed, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def _init_worker() -> None:
    # Each worker owns one core: torch's own thread pool would oversubscribe the machine.
    import torch

    torch.set_num_threads(1)


class WorkerDied(RuntimeError):
    """The process running this person ended abruptly (a segfault, the OOM killer, ``os._exit``)."""


def _pool(workers: int) -> ProcessPoolExecutor:
    """Worker processes that own one core each."""
    return ProcessPoolExecutor(workers, initializer=_init_worker)


def _take(fut: Future, person: str, results: dict, errors: dict) -> None:
    """Record a finished person's result or error; its own process dying is :class:`WorkerDied`."""
    try:
        results[person] = fut.result()
    except BrokenProcessPool as e:
        errors[person] = WorkerDied(f"{person}: its worker process died (crashed or killed, e.g. out of memory): {e}")
    except Exception as e:  # keep going: the other persons are independent
        errors[person] = e


def _run_shared(fn: Callable[[str], T], persons: list[str], workers: int, bar: tqdm,
                results: dict, errors: dict) -> list[str]:
    """All persons on one pool of ``workers`` processes; returns the persons left unfinished when a
    worker died (that breaks the whole pool: every person still in it fails with BrokenProcessPool,
    whichever one killed it)."""
    with _pool(workers) as pool:
        futures: dict[Future, str] = {}
        for p in persons:
            try:
                futures[pool.submit(fn, p)] = p
            except BrokenProcessPool:
                break
        for fut in as_completed(futures):
            if fut.cancelled() or isinstance(fut.exception(), BrokenProcessPool):
                continue
            _take(fut, futures[fut], results, errors)
            bar.update()
    return [p for p in persons if p not in results and p not in errors]


def _run_isolated(fn: Callable[[str], T], persons: list[str], workers: int, bar: tqdm,
                  results: dict, errors: dict) -> None:
    """Each person in a fresh process of its own, ``workers`` at a time: a worker that dies now takes
    only its own person down (:class:`WorkerDied`)."""
    queue, running = list(persons), {}
    try:
        while queue or running:
            while queue and len(running) < workers:
                person, pool = queue.pop(0), _pool(1)
                running[pool.submit(fn, person)] = (person, pool)
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                person, pool = running.pop(fut)
                pool.shutdown()
                _take(fut, person, results, errors)
                bar.update()
    finally:
        for _, pool in running.values():
            pool.shutdown(cancel_futures=True)


def map_persons_tolerant(fn: Callable[[str], T], persons: list[str], workers: int,
                         desc: str) -> tuple[dict[str, T], dict[str, Exception]]:
    """Apply `fn` to each person, `workers` at a time; a failing person does not stop the others.

    With several workers, a worker process that dies (segfault, OOM kill) breaks the shared pool:
    the persons it left unfinished run again, each in a fresh process of its own, so that only the
    one whose process dies again fails (:class:`WorkerDied`). Returns (results, errors), both keyed
    by person.
    """
    results: dict[str, T] = {}
    errors: dict[str, Exception] = {}
    workers = max(1, min(workers, len(persons)))
    with tqdm(total=len(persons), desc=desc, unit="person") as bar:
        if workers == 1:
            for p in persons:
                try:
                    results[p] = fn(p)
                except Exception as e:
                    errors[p] = e
                bar.update()
        else:
            unfinished = _run_shared(fn, persons, workers, bar, results, errors)
            if unfinished:
                bar.write(f"{desc}: a worker process died; running {', '.join(unfinished)} again, one process each")
                _run_isolated(fn, unfinished, workers, bar, results, errors)
    return {p: results[p] for p in persons if p in results}, {p: errors[p] for p in persons if p in errors}


def map_persons(fn: Callable[[str], T], persons: list[str], workers: int, desc: str) -> dict[str, T]:
    """Like `map_persons_tolerant`, but re-raises the first person's error after the others finish."""
    results, errors = map_persons_tolerant(fn, persons, workers, desc)
    if errors:
        raise next(iter(errors.values()))
    return results


def default_workers() -> int:
    return max(1, (os.cpu_count() or 1))
