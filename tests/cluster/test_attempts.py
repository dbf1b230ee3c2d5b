"""The retry loop the backends share (cluster/attempts.py), with a scripted backend."""

from __future__ import annotations

import logging

import pytest

from cluster.attempts import AttemptFailed, run_attempts
from cluster.local_backend import LocalBackend, LocalConfig
from cluster.person_job import PersonJob
from cluster.status import read_status, write_state


class Scripted:
    """Attempts finish in submission order; ``fail[(person, attempt)]`` is the error of a failing one."""

    def __init__(self, fail: dict[tuple[str, int], str], interrupt_after: int | None = None):
        self.fail, self.interrupt_after = fail, interrupt_after
        self.submitted: list[tuple[str, int]] = []
        self.cancelled: list[tuple[str, int]] = []
        self.waits = 0

    def submit(self, job: PersonJob, attempt: int):
        self.submitted.append((job.person, attempt))
        return (job.person, attempt)

    def wait(self, handles):
        self.waits += 1
        if self.interrupt_after is not None and self.waits > self.interrupt_after:
            raise KeyboardInterrupt
        return [min(handles, key=self.submitted.index)]

    def outcome(self, job, handle):
        if handle in self.fail:
            raise AttemptFailed(self.fail[handle], restarts=handle[1])
        return {"person": job.person, "attempt": handle[1]}, 7

    def cancel(self, handle):
        self.cancelled.append(handle)

    def start_time(self, handle):
        return None


def _start(runner, jobs):
    return [(job, runner.submit(job, 1)) for job in jobs]


def test_failed_attempts_are_retried_up_to_max_retries(tmp_path, caplog):
    jobs = [PersonJob("a", "m:f", max_retries=2), PersonJob("b", "m:f", max_retries=1), PersonJob("c", "m:f")]
    runner = Scripted({("a", 1): "OSError: a1", ("a", 2): "OSError: a2", ("b", 1): "ValueError: b1",
                       ("b", 2): "ValueError: b2\ntraceback"})
    for job in jobs:
        write_state(tmp_path, job.person, "running", attempt=1)
    with caplog.at_level(logging.INFO, logger="cluster.attempts"):
        results = run_attempts(_start(runner, jobs), runner, str(tmp_path))
    assert runner.submitted == [("a", 1), ("b", 1), ("c", 1), ("a", 2), ("b", 2), ("a", 3)]
    a, b, c = results["a"], results["b"], results["c"]
    assert (a.ok, a.attempts, a.result, a.restarts) == (True, 3, {"person": "a", "attempt": 3}, 7)
    assert (b.ok, b.attempts, b.error, b.restarts) == (False, 2, "ValueError: b2\ntraceback", 2)
    assert (c.ok, c.attempts) == (True, 1)
    assert all(r.duration_s >= 0 for r in results.values())
    status = {s.person: s for s in read_status(tmp_path)}
    assert status["b"].state == "failed" and status["b"].attempt == 2 and "ValueError: b2" in status["b"].message
    assert status["a"].state == "running"  # a succeeded: its own worker writes that, not the loop
    assert "person b attempt 1/2 failed, retrying: ValueError: b1" in caplog.text
    assert "person b failed after 2 attempt(s): ValueError: b2" in caplog.text


def test_mark_failed_off_leaves_the_status_file_to_the_attempt(tmp_path):
    runner = Scripted({("a", 1): "OSError: disk"})
    write_state(tmp_path, "a", "failed", attempt=1, message="written by the attempt")
    results = run_attempts(_start(runner, [PersonJob("a", "m:f", max_retries=0)]), runner, str(tmp_path),
                           mark_failed=False)
    assert not results["a"].ok and results["a"].attempts == 1
    assert read_status(tmp_path)[0].message == "written by the attempt"


def test_an_interrupt_cancels_every_attempt_still_running():
    jobs = [PersonJob(p, "m:f", max_retries=1) for p in "abc"]
    runner = Scripted({("a", 1): "boom"}, interrupt_after=1)
    with pytest.raises(KeyboardInterrupt):
        run_attempts(_start(runner, jobs), runner, None)
    assert sorted(runner.cancelled) == [("a", 2), ("b", 1), ("c", 1)]


def test_a_known_start_time_is_where_a_duration_begins():
    class Started(Scripted):
        def start_time(self, handle):
            return 0.0 if handle == ("b", 1) else None  # the epoch: b's duration is the clock itself

    runner = Started({})
    results = run_attempts(_start(runner, [PersonJob("a", "m:f"), PersonJob("b", "m:f")]), runner, None)
    assert results["a"].duration_s < 60 and results["b"].duration_s > 1e9


_RUNS: list[tuple[str, int]] = []


def flaky(person: str, fail_first: int = 0) -> dict:
    attempt = sum(1 for p, _ in _RUNS if p == person) + 1
    _RUNS.append((person, attempt))
    if attempt <= fail_first:
        raise RuntimeError(f"{person} attempt {attempt}")
    return {"attempt": attempt}


def test_local_backend_runs_each_persons_attempts_back_to_back(tmp_path):
    """The local backend through the shared loop: the jobs' order, retries at once, durations per
    person (not since the run began)."""
    _RUNS.clear()
    target = f"{__name__}:flaky"
    jobs = [PersonJob("a", target, {"fail_first": 1}, max_retries=1),
            PersonJob("b", target, {"fail_first": 2}, max_retries=1), PersonJob("c", target)]
    results = LocalBackend(LocalConfig(status_dir=tmp_path)).run_all(jobs)
    assert _RUNS == [("a", 1), ("a", 2), ("b", 1), ("b", 2), ("c", 1)]
    assert [(r.person, r.ok, r.attempts) for r in results] == [("a", True, 2), ("b", False, 2), ("c", True, 1)]
    assert results[0].result == {"attempt": 2} and results[1].error.startswith("RuntimeError: b attempt 2")
    status = {s.person: s for s in read_status(tmp_path)}
    # the attempt's own verdict (format_exception with the traceback's tail), not the loop's
    assert status["b"].state == "failed" and status["b"].attempt == 2 and "Traceback" in status["b"].message
