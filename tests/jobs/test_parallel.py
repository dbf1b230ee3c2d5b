"""jobs/_parallel.py: one function per person in worker processes, one person's failure its own."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from common import process_pool
from jobs import _parallel

#: Set by a test in this (the parent) process; a worker that was forked from it would see the change.
PARENT_STATE = "as imported"


def _parent_state(_: str) -> str:
    return PARENT_STATE


def _origin(_: str) -> tuple[int, bool]:
    return os.getppid(), "torch" in sys.modules


def _no_thread_setting() -> None:
    """Stands in for the workers' torch thread setting (a module function: a worker imports it by name)."""


def _work(person: str) -> str:
    if person == "dies":
        os._exit(139)  # what a segfault or the OOM killer looks like to the pool
    if person == "raises":
        raise ValueError(f"bad data of {person}")
    time.sleep(0.2)  # still running in the other worker when the pool breaks
    return person.upper()


@pytest.fixture(autouse=True)
def _no_torch_in_workers(monkeypatch):
    """The workers' torch thread setting costs an import of torch per process; nothing here uses it."""
    monkeypatch.setattr(process_pool, "_init_worker", _no_thread_setting)


def test_a_worker_that_dies_fails_only_its_own_person():
    persons = ["dies", "a", "raises", "b", "c"]
    results, errors = _parallel.map_persons_tolerant(_work, persons, workers=2, desc="test")
    assert results == {"a": "A", "b": "B", "c": "C"}
    assert sorted(errors) == ["dies", "raises"]
    assert isinstance(errors["dies"], _parallel.WorkerDied) and "dies: its worker process died" in str(errors["dies"])
    assert isinstance(errors["raises"], ValueError)


def test_one_worker_runs_in_process_with_errors_per_person():
    results, errors = _parallel.map_persons_tolerant(_work, ["raises", "a"], workers=1, desc="test")
    assert results == {"a": "A"} and list(errors) == ["raises"]


def test_workers_are_not_forks_of_this_process(monkeypatch):
    """A child forked from a process whose other threads or OpenMP pool had run can wait forever on a lock
    nobody in it releases (a shard worker hung so in libgomp): the workers fork from a fresh fork server, so
    they see this module as imported, not as the parent changed it."""
    monkeypatch.setattr(sys.modules[__name__], "PARENT_STATE", "changed in the parent")
    results, errors = _parallel.map_persons_tolerant(_parent_state, ["a", "b"], workers=2, desc="test")
    assert errors == {} and results == {"a": "as imported", "b": "as imported"}


def test_workers_fork_from_one_server_that_imported_torch():
    """Not a fresh interpreter each (importing torch cost ~4 CPU s per worker): every pool's workers are children
    of the one fork server of this process, which imported torch before forking them."""
    origins = [_parallel.map_persons_tolerant(_origin, ["a", "b"], workers=2, desc="test")[0] for _ in range(2)]
    parents = {parent for results in origins for parent, _ in results.values()}
    assert len(parents) == 1 and os.getpid() not in parents, origins
    assert all(torch for results in origins for _, torch in results.values())


def test_a_temporary_directory_too_long_for_the_fork_servers_socket_spawns_the_workers(tmp_path):
    """Python before 3.14 puts the fork server's Unix socket under TMPDIR as it is: a long one (pytest's own, a
    cluster's per-job folder) failed every item with 'AF_UNIX path too long'. The workers are spawned instead,
    with a warning that says why. In a fresh interpreter: this one's fork server already runs."""
    tmpdir = tmp_path / ("t" * 100)
    tmpdir.mkdir()
    script = textwrap.dedent("""
        import operator, os
        from common import process_pool
        process_pool._init_worker = os.getpid  # a spawned worker would import torch for the real one (seconds)
        out = {}
        process_pool.map_tolerant(operator.neg, [1, 2, 3], 2, lambda item, res, err: out.update({item: (res, err)}))
        print(sorted(out.items()))
        """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TMPDIR": str(tmpdir)}, cwd=Path(process_pool.__file__).parents[1])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[(1, (-1, None)), (2, (-2, None)), (3, (-3, None))]", proc.stdout + proc.stderr
    assert f"the temporary directory {tmpdir}/pymp-" in proc.stderr, proc.stderr
    assert "too long a path for the fork server's Unix socket" in proc.stderr and "spawned instead" in proc.stderr


def test_a_temporary_directory_that_cannot_be_made_spawns_the_workers(monkeypatch):
    """A full or unwritable temporary file system: no fork server socket, so spawned workers, and a warning."""
    def full(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(process_pool.util, "get_temp_dir", full)
    with pytest.warns(RuntimeWarning, match=r"cannot make its temporary directory \(.*No space left on device"):
        context = process_pool._fork_server_context()
    assert context.get_start_method() == "spawn"
