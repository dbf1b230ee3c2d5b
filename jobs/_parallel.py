"""Run one function per person in worker processes with a progress bar."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Callable, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def _init_worker() -> None:
    # Each worker owns one core: torch's own thread pool would oversubscribe the machine.
    import torch

    torch.set_num_threads(1)


def map_persons_tolerant(fn: Callable[[str], T], persons: list[str], workers: int,
                         desc: str) -> tuple[dict[str, T], dict[str, Exception]]:
    """Apply `fn` to each person, `workers` at a time; a failing person does not stop the others.

    Returns (results, errors), both keyed by person.
    """
    results: dict[str, T] = {}
    errors: dict[str, Exception] = {}
    workers = max(1, min(workers, len(persons)))
    if workers == 1:
        for p in tqdm(persons, desc=desc, unit="person"):
            try:
                results[p] = fn(p)
            except Exception as e:
                errors[p] = e
    else:
        with ProcessPoolExecutor(workers, initializer=_init_worker) as pool:
            futures = {pool.submit(fn, p): p for p in persons}
            for fut in tqdm(as_completed(futures), total=len(futures), desc=desc, unit="person"):
                try:
                    results[futures[fut]] = fut.result()
                except Exception as e:  # keep going: the other persons are independent
                    errors[futures[fut]] = e
    return {p: results[p] for p in persons if p in results}, {p: errors[p] for p in persons if p in errors}


def map_persons(fn: Callable[[str], T], persons: list[str], workers: int, desc: str) -> dict[str, T]:
    """Like `map_persons_tolerant`, but re-raises the first person's error after the others finish."""
    results, errors = map_persons_tolerant(fn, persons, workers, desc)
    if errors:
        raise next(iter(errors.values()))
    return results


def default_workers() -> int:
    return max(1, (os.cpu_count() or 1))
