"""Fixtures shared by every test package."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from common.fingerprint import tree_fingerprint
from shards.testing import build_tiny

pytest_plugins = ["suite_watchdog"]  # tests/suite_watchdog.py: a stuck test fails by name, never hangs the suite

# Engines a test session starts once and shares between its tests, by fixture: run in pytest-xdist workers
# (`-n 2 --dist loadgroup`), each group of tests stays on one worker, so no second SLURM starts on the same
# ports and directory and no second Ray head (whose dashboard agent would find its port taken) starts at all.
ENGINE_GROUPS = {"slurm_cluster": "slurm", "ray_head": "ray-head"}
_UNGROUPED = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    """In each of the suite's xdist workers torch computes on one thread: two workers of two threads each on the
    2-core machine spun in OpenMP's waits (a base-pretraining test: 4.6 CPU s in one process, 25 beside a second
    worker). So do the processes the tests start (OMP_NUM_THREADS=1, which they inherit; a test may still give its
    own): beside the other worker a two-thread child spun the same way. Measured 2026-11-29, back to back on the
    loaded 2-core machine: test_precision, test_validation and test_init_distributed (each a child that trains or
    renders) 55 and 64 s with 41 and 44 CPU s of children, against 69 and 103 s with 61 and 79 without; the
    bench_gpu smoke run 18-19 s against 16-85 s. (It was once left out as saving 4%, one run each; the other
    reason then, `nproc` in slurm/local/start-slurm.sh honouring it, is fixed and tested.) The whole suite with it,
    idle, as CI runs it: 1169 s at a81d5f8 (2026-11-30). Ray's workers keep it (Ray sets a worker's to its CPUs only
    when it is unset); the Serve renderer sets its replicas' threads itself."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]):
    """Marks each engine's tests with its `xdist_group` before xdist reads the marks, and checks after
    that xdist applied them: it does so by suffixing the test's id with "@<group>", which pytest 9.2
    ignores (pytest-dev/pytest-xdist#1386), and tests of one group would then run on both workers."""
    for item in items:
        groups = [group for fixture, group in ENGINE_GROUPS.items() if fixture in item.fixturenames]
        if len(groups) > 1:
            raise pytest.UsageError(f"{item.nodeid} uses two shared engines ({groups}); xdist keeps a test in one "
                                    "group, so their sessions could start twice")
        for group in groups:
            item.add_marker(pytest.mark.xdist_group(group))
    result = yield
    if config.getoption("loadgroup", default=False):  # an xdist worker of a --dist loadgroup run
        for item in items:
            if any(item.iter_markers("xdist_group")) and "@" not in item.nodeid:
                item.stash[_UNGROUPED] = (
                    f"pytest-xdist did not keep {item.nodeid} in its group (this pytest and pytest-xdist do not "
                    "work together: pytest-dev/pytest-xdist#1386); run with -n 0 or install the pinned pytest")
    return result


@pytest.hookimpl(tryfirst=True)  # before the test's fixtures start an engine a second time
def pytest_runtest_setup(item: pytest.Item) -> None:
    if _UNGROUPED in item.stash:
        pytest.fail(item.stash[_UNGROUPED], pytrace=False)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(captures, stores, shards) of the tiny synthetic data set (``shards.testing.TINY``), built
    once for the whole session (seconds of CPU each time) and shared read-only: a test that breaks
    or rebuilds data works on a copy. Checked at the end of the session: had a test written into
    it, the tests after it would have run on other data than they think."""
    root = tmp_path_factory.mktemp("tiny-shared")
    data = build_tiny(root)
    before = tree_fingerprint(root)
    yield data
    assert tree_fingerprint(root) == before, f"a test changed the shared tiny data set under {root}"
