"""common/process_pool.py: an item that hangs (a read from a file system that does not answer) fails alone after its
time limit, its process killed; the other items finish. Before, it held its stage, and the main job, forever."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from common import process_pool
from common.process_pool import ItemTimedOut, map_tolerant


def _no_thread_setting() -> None:
    """Stands in for the workers' torch thread setting (a module function: a worker imports it by name)."""


@pytest.fixture(autouse=True)
def _no_torch_in_workers(monkeypatch):
    monkeypatch.setattr(process_pool, "_init_worker", _no_thread_setting)


def _work(item: str) -> str:
    """"hangs@<folder>" writes its pid into the folder and sleeps far longer than the test (the folder comes with the
    item: the workers' fork server keeps the environment of the test that started it); the others are quick."""
    if item.startswith("hangs@"):
        (Path(item.split("@", 1)[1]) / "hangs.pid").write_text(str(os.getpid()))
        time.sleep(600)
    time.sleep(0.1)
    return item.upper()


def _ended(pid: int, within_s: float = 10.0) -> bool:
    """Process `pid` has ended (gone, or a zombie nobody reaped yet) within `within_s`."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in "ZX":
            return True
        time.sleep(0.1)
    return False


def _run(items: list[str], workers: int, timeout_s: float) -> tuple[dict, dict, list, float]:
    results, errors, reruns = {}, {}, []

    def done(item, result, error):
        (errors if error is not None else results)[item] = error if error is not None else result

    start = time.monotonic()
    map_tolerant(_work, items, workers, done, name=lambda item: f"person {item}", on_rerun=reruns.append,
                 timeout_s=timeout_s)
    return results, errors, reruns, time.monotonic() - start


@pytest.mark.timeout(120)
def test_an_item_that_hangs_fails_alone_after_its_time_limit(tmp_path):
    """On the shared pool (2 workers) nothing finishes for the limit once the quick items are done: the pool's
    processes are killed, the unfinished item runs again in a process of its own and is killed at its limit. (With
    one worker the items run one process each from the start, a limit needing a process to kill:
    tests/jobs/test_data_stage_time_limits.py.)"""
    workers = 2
    map_tolerant(_work, ["warm", "up"], 2, lambda *a: None)  # the fork server's start (torch) is no item's time
    hangs = f"hangs@{tmp_path}"
    results, errors, reruns, seconds = _run(["a", hangs, "b", "c"], workers, timeout_s=6)  # starts under load: s
    assert results == {"a": "A", "b": "B", "c": "C"}
    assert list(errors) == [hangs] and isinstance(errors[hangs], ItemTimedOut)
    assert str(errors[hangs]).startswith(f"person {hangs}: still running after the time limit of 6 s")
    assert reruns == [[hangs]]
    assert seconds < 45, seconds  # the stall limit, then the item's own limit (and process starts)
    assert _ended(int((tmp_path / "hangs.pid").read_text()))  # the last process that ran it was killed


@pytest.mark.timeout(120)
def test_items_slower_than_the_limit_together_are_not_a_stall():
    """The shared pool's limit counts from the last item that finished: many quick items one after another take
    longer than the limit in all, and none of them is killed."""
    map_tolerant(_work, ["warm", "up"], 2, lambda *a: None)  # the fork server's start is no item's
    items = [f"q{i}" for i in range(40)]  # 40 x 0.1 s on 2 workers: ~2 s against a 1.5 s limit
    results, errors, reruns, seconds = _run(items, 2, timeout_s=1.5)
    assert seconds > 1.5
    assert errors == {} and reruns == [] and len(results) == 40


@pytest.mark.parametrize("limit", [0, -1, float("nan"), float("inf")])
def test_a_time_limit_that_is_no_positive_number_is_refused(limit):
    with pytest.raises(ValueError, match="an item's time limit must be positive seconds"):
        map_tolerant(_work, ["a"], 1, lambda *a: None, timeout_s=limit)
