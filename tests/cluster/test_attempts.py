"""The retry loop the backends share (cluster/attempts.py), with a scripted backend."""

from __future__ import annotations

import contextlib
import logging
from types import SimpleNamespace

import pytest

from cluster.attempts import AttemptFailed, run_attempts, submit_first
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


class RefusesSubmissions(Scripted):
    """``refuse``: the (person, attempt) submissions that raise, as sbatch does at a QOS limit."""

    def __init__(self, fail, refuse):
        super().__init__(fail)
        self.refuse = refuse

    def submit(self, job, attempt):
        if (job.person, attempt) in self.refuse:
            raise RuntimeError(f"sbatch: error: Batch job submission failed ({job.person} {attempt})")
        return super().submit(job, attempt)


def test_a_submission_that_raises_is_a_failed_attempt_of_that_person_alone(tmp_path):
    """A retry (or a first attempt) whose submission raises fails or retries its person; the others run on
    and nothing is cancelled. The loop writes that verdict even with mark_failed off: no attempt ran."""
    jobs = [PersonJob("bad", "m:f", max_retries=1), PersonJob("late", "m:f", max_retries=2),
            PersonJob("good", "m:f"), PersonJob("first", "m:f", max_retries=1)]
    runner = RefusesSubmissions({("bad", 1): "ValueError: bad data", ("late", 1): "OSError: node"},
                                refuse={("bad", 2), ("late", 2), ("first", 1)})
    started, unsubmitted = submit_first(jobs, runner)
    assert [j.person for j, _ in unsubmitted] == ["first"]
    assert unsubmitted[0][1].startswith("submission failed: RuntimeError: sbatch: error")
    results = run_attempts(started, runner, str(tmp_path), mark_failed=False, unsubmitted=unsubmitted)
    assert runner.cancelled == []
    assert (results["good"].ok, results["late"].ok, results["late"].attempts) == (True, True, 3)
    assert (results["first"].ok, results["first"].attempts) == (True, 2)
    bad = results["bad"]
    assert (bad.ok, bad.attempts) == (False, 2) and bad.error.startswith("submission failed: RuntimeError")
    status = {s.person: s for s in read_status(tmp_path)}
    assert status["bad"].state == "failed" and status["bad"].message.startswith("submission failed")


def test_an_interrupt_while_submitting_cancels_what_was_submitted():
    class Interrupted(Scripted):
        def submit(self, job, attempt):
            if job.person == "c":
                raise KeyboardInterrupt
            return super().submit(job, attempt)

    runner = Interrupted({})
    with pytest.raises(KeyboardInterrupt):
        submit_first([PersonJob(p, "m:f") for p in "abcd"], runner)
    assert runner.cancelled == [("a", 1), ("b", 1)]


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


class _FakeSlurmJob:
    """What SlurmBackend uses of a submitit Job: finished at once with the runner's result."""

    def __init__(self, job_id: str, runner, cancelled: list[str]):
        self.job_id, self.runner, self.cancelled = job_id, runner, cancelled
        self.watcher = SimpleNamespace(update=lambda: None)

    def done(self) -> bool:
        return True

    def result(self) -> dict:
        return {"result": {"person": self.runner.job.person, "attempt": self.runner.attempt}, "restarts": 0}

    def cancel(self, check: bool = True) -> None:
        self.cancelled.append(self.job_id)


class _FakeExecutor:
    """submitit's executor where sbatch refuses the first submission of each person in ``refuse``."""

    def __init__(self, refuse: set[str], jobs: list, cancelled: list[str]):
        self.refuse, self.jobs, self.cancelled = refuse, jobs, cancelled

    def submit(self, runner):
        if runner.job.person in self.refuse:
            self.refuse.discard(runner.job.person)
            raise RuntimeError("sbatch: error: Batch job submission failed: Socket timed out on send/recv")
        self.jobs.append(_FakeSlurmJob(str(1000 + len(self.jobs)), runner, self.cancelled))
        return self.jobs[-1]

    @contextlib.contextmanager
    def batch(self):
        yield


@pytest.mark.parametrize("array", [False, True])
def test_slurm_submission_that_fails_is_retried_for_that_person_alone(tmp_path, array):
    """sbatch refusing one person's first submission (array: that resources group's array) neither
    stops the persons after it nor leaves the jobs already submitted without a driver."""
    from cluster.person_job import Resources
    from cluster.slurm_backend import SlurmBackend, SlurmConfig

    submitted, cancelled = [], []
    backend = SlurmBackend(SlurmConfig(array=array, status_dir=tmp_path, poll_interval_s=0.01))
    executor = _FakeExecutor({"p3"}, submitted, cancelled)
    backend._executor = lambda resources, name: executor
    jobs = [PersonJob(p, "m:f", resources=Resources(cpus=2 if p == "p3" else 1)) for p in ("p1", "p2", "p3", "p4")]
    results = backend.run_all(jobs)
    assert [(r.person, r.ok, r.attempts) for r in results] == [("p1", True, 1), ("p2", True, 1), ("p3", True, 2),
                                                                ("p4", True, 1)]
    assert cancelled == [] and len(submitted) == 4 and backend.job_ids["p3"] == [submitted[-1].job_id]


class _Unprintable(RuntimeError):
    def __str__(self) -> str:
        raise ValueError("no text")


def loud_or_unprintable(person: str) -> dict:
    if person == "loud":
        raise RuntimeError("x" * 5_000_000)
    raise _Unprintable()


def test_a_huge_or_unprintable_error_fails_its_person_alone_in_a_few_kilobytes(tmp_path):
    """A target's exception with a 5 MB message was copied uncut into its status file, JobResult.error, summary.json
    and the log line; one whose __str__ raises failed inside the formatting, so its status file stayed 'running'
    (local backend) and the other persons' results were never reached. Both fail their person alone now, in a few
    kilobytes, on the local backend and through the loop every backend shares (AttemptFailed)."""
    target = f"{__name__}:loud_or_unprintable"
    jobs = [PersonJob("loud", target, max_retries=0), PersonJob("odd", target, max_retries=0),
            PersonJob("c", f"{__name__}:flaky")]
    results = {r.person: r for r in LocalBackend(LocalConfig(status_dir=tmp_path)).run_all(jobs)}
    assert results["c"].ok and not results["loud"].ok and not results["odd"].ok
    assert len(results["loud"].error) < 10_000 and "... (5000014 characters)" in results["loud"].error
    assert results["odd"].error.startswith("_Unprintable: <str() of this _Unprintable raised ValueError>")
    status = {s.person: s for s in read_status(tmp_path)}
    assert status["loud"].state == status["odd"].state == "failed"
    assert max(p.stat().st_size for p in tmp_path.glob("*.json")) < 10_000
    assert len(AttemptFailed("y" * 5_000_000 + "\ntraceback").error) < 2_000


def test_a_slurm_array_larger_than_slurms_limit_is_split(tmp_path, monkeypatch):
    """SLURM's default MaxArraySize (1001) refused an array of more persons whole: every person's first attempt
    failed and each was resubmitted alone. The arrays are split at MAX_ARRAY_TASKS (here 2, for 5 persons)."""
    from cluster import slurm_backend
    from cluster.slurm_backend import SlurmBackend, SlurmConfig

    class Counting(_FakeExecutor):
        arrays: list[int] = []

        @contextlib.contextmanager
        def batch(self):
            before = len(self.jobs)
            yield
            self.arrays.append(len(self.jobs) - before)

    monkeypatch.setattr(slurm_backend, "MAX_ARRAY_TASKS", 2)
    submitted, cancelled = [], []
    backend = SlurmBackend(SlurmConfig(array=True, status_dir=tmp_path, poll_interval_s=0.01))
    executor = Counting(set(), submitted, cancelled)
    backend._executor = lambda resources, name: executor
    results = backend.run_all([PersonJob(f"p{i}", "m:f") for i in range(5)])
    assert [(r.ok, r.attempts) for r in results] == [(True, 1)] * 5
    assert Counting.arrays == [2, 2, 1]
