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


def map_persons(fn: Callable[[str], T], persons: list[str], workers: int, desc: str) -> dict[str, T]:
    """Apply `fn` to each person, `workers` at a time; re-raises the first error after the others finish."""
    results: dict[str, T] = {}
    errors: dict[str, BaseException] = {}
    workers = max(1, min(workers, len(persons)))
    if workers == 1:
        for p in tqdm(persons, desc=desc, unit="person"):
            results[p] = fn(p)
        return results
    with ProcessPoolExecutor(workers, initializer=_init_worker) as pool:
        futures = {pool.submit(fn, p): p for p in persons}
        for fut in tqdm(as_completed(futures), total=len(futures), desc=desc, unit="person"):
            p = futures[fut]
            try:
                results[p] = fut.result()
            except BaseException as e:  # keep going: the other persons are independent
                errors[p] = e
    if errors:
        first = next(iter(errors.values()))
        raise first
    return {p: results[p] for p in persons}


def default_workers() -> int:
    return max(1, (os.cpu_count() or 1))
