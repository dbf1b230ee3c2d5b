"""Local backend, job descriptions, status files and the summary (no daemons needed)."""

from __future__ import annotations

import json
import os
import sys

import pytest
from workloads import count_steps, expected_digest, read_runs, write_input

from cluster.local_backend import LocalBackend, LocalConfig
from cluster.orchestrate import EXIT_SOME_FAILED, exit_code, format_summary, make_backend, run_all, write_summary_json
from cluster.person_job import JobResult, PersonJob, Resources, resolve_target, run_attempt, takes_status
from cluster.status import read_status

TARGET = "workloads:count_steps"


def make_jobs(tmp_path, persons, corrupt=(), steps=3, max_retries=1, **kw):
    for p in persons:
        write_input(tmp_path / "data", p, corrupt=p in corrupt)
    return [PersonJob(p, TARGET, dict(data_dir=str(tmp_path / "data"), work_dir=str(tmp_path / "work"),
                                      steps=steps, **kw), max_retries=max_retries) for p in persons]


def test_local_corrupt_person_fails_alone(tmp_path):
    jobs = make_jobs(tmp_path, ["017", "018", "019"], corrupt={"018"}, steps=3, max_retries=2)
    results = run_all(jobs, LocalConfig(status_dir=tmp_path / "status"))

    assert [r.person for r in results] == ["017", "018", "019"]
    ok = {r.person: r for r in results}
    assert ok["017"].ok and ok["019"].ok and not ok["018"].ok
    assert ok["017"].result["digest"] == expected_digest("017", 3)
    assert ok["017"].attempts == 1
    assert ok["018"].attempts == 3  # 1 + max_retries, then given up
    assert "ValueError" in ok["018"].error and "018.json" in ok["018"].error
    assert exit_code(results) == EXIT_SOME_FAILED != 0
    summary = format_summary(results)
    assert "FAILED: 018" in summary and "2/3 persons succeeded" in summary

    st = {s.person: s for s in read_status(tmp_path / "status")}
    assert st["017"].state == "succeeded" and st["017"].step == 3 and st["017"].total_steps == 3
    assert st["018"].state == "failed" and st["018"].attempt == 3 and "corrupt" in st["018"].message


def test_local_all_ok_exit_zero_and_resume(tmp_path):
    jobs = make_jobs(tmp_path, ["a", "b"], steps=4, max_retries=0)
    results = LocalBackend(LocalConfig(status_dir=None)).run_all(jobs)
    assert exit_code(results) == 0 and "all 2 persons succeeded" in format_summary(results)
    assert not (tmp_path / "status").exists()  # status_dir=None writes nothing
    # a second launch resumes from the checkpoint instead of redoing the steps
    results = run_all(jobs, LocalConfig())
    assert all(r.ok for r in results)
    assert [r["start_step"] for r in read_runs(tmp_path / "work", "a")] == [0, 4]
    assert results[0].result["digest"] == expected_digest("a", 4)


def test_retries_are_bounded_zero(tmp_path):
    jobs = make_jobs(tmp_path, ["x"], corrupt={"x"}, max_retries=0)
    (r,) = run_all(jobs, LocalConfig(status_dir=tmp_path / "s"))
    assert not r.ok and r.attempts == 1


def test_target_must_return_dict(tmp_path):
    job = PersonJob("p", "workloads:returns_list", max_retries=0)
    (r,) = run_all([job], LocalConfig(status_dir=tmp_path))
    assert not r.ok and "expected a dict" in r.error


def exits_for_bad(person: str) -> dict:
    if person == "bad":
        sys.exit("tyro: error: unrecognized arguments")  # a library calling sys.exit inside the target
    return {"person": person}


def test_a_target_that_calls_sys_exit_fails_its_person_alone(tmp_path):
    """sys.exit in one person's target is a failed attempt (retried, then failed in its status file); the
    persons after it still run and the run is not ended."""
    jobs = [PersonJob(p, f"{__name__}:exits_for_bad", max_retries=1) for p in ("a", "bad", "c")]
    results = run_all(jobs, LocalConfig(status_dir=tmp_path))
    assert [(r.person, r.ok, r.attempts) for r in results] == [("a", True, 1), ("bad", False, 2), ("c", True, 1)]
    assert results[1].error.startswith("SystemExit: tyro: error: unrecognized arguments")
    status = {s.person: s for s in read_status(tmp_path)}
    assert status["bad"].state == "failed" and status["bad"].attempt == 2 and "SystemExit" in status["bad"].message
    assert status["c"].state == "succeeded"


def test_child_process_reports_through_the_status_argument(tmp_path):
    """A target passes its status reporter's fields to a child process, which reports progress."""
    job = PersonJob("p", "workloads:report_from_child", dict(step=3, total_steps=10), max_retries=0)
    (r,) = run_all([job], LocalConfig(status_dir=tmp_path))
    assert r.ok
    (s,) = read_status(tmp_path)
    assert (s.state, s.step, s.total_steps) == ("succeeded", 3, 10)
    # the reporter travels as an argument: nothing is left in the environment
    assert not [k for k in os.environ if k.startswith("DA_")]


def test_status_reaches_the_targets_status_parameter(tmp_path):
    """``run_attempt`` hands the attempt's reporter to a target's ``status`` parameter (None without
    a status dir); a target without one is called without it (``returns_list`` above)."""
    r = run_attempt(PersonJob("p", "workloads:echo_status"), 2, tmp_path, restarts=1)
    assert r == {"status": [str(tmp_path), "p", 2, 1]}
    assert run_attempt(PersonJob("q", "workloads:echo_status"), 1, None) == {"status": None}
    assert takes_status(count_steps) and not takes_status(expected_digest) and not takes_status(lambda p, **kw: {})
    with pytest.raises(ValueError, match="must not contain 'status'"):
        PersonJob("p", "m:f", {"status": None})


def test_job_validation():
    with pytest.raises(ValueError, match="package.module:function"):
        PersonJob("p", "no_colon")
    with pytest.raises(ValueError, match="invalid person id"):
        PersonJob("../etc", "m:f")
    with pytest.raises(ValueError, match="max_retries"):
        PersonJob("p", "m:f", max_retries=-1)
    with pytest.raises(ValueError, match="cpus"):
        Resources(cpus=0)
    with pytest.raises(ValueError, match="gpus"):
        Resources(gpus=-1)
    with pytest.raises(ValueError, match="memory_gb"):
        Resources(memory_gb=0)
    with pytest.raises(ValueError, match="twice"):
        LocalBackend().run_all([PersonJob("p", "m:f"), PersonJob("p", "m:f")])
    with pytest.raises(ValueError, match="no jobs"):
        run_all([], LocalConfig())
    with pytest.raises(ImportError, match="no_such_module"):
        resolve_target("no_such_module:f")
    with pytest.raises(AttributeError, match="no function 'nope'"):
        resolve_target("workloads:nope")
    with pytest.raises(TypeError, match="unknown backend config"):
        make_backend(object())


def test_summary_json(tmp_path):
    results = [JobResult("a", True, 1, result={"x": 1}, duration_s=2.0), JobResult("b", False, 2, error="boom")]
    write_summary_json(results, tmp_path / "summary.json")
    data = json.loads((tmp_path / "summary.json").read_text())
    assert data["exit_code"] == 1
    assert [r["person"] for r in data["results"]] == ["a", "b"] and data["results"][1]["error"] == "boom"
    assert exit_code([]) != 0  # nothing ran is not success


def test_summary_wraps_long_reasons_at_word_boundaries():
    reason = ("ingest: /data/captures/017/sequences/EXP-2/timesteps/frame_00042/images/cam_222200037.png: "
              "image size 20x48 does not match the camera's 48x48 (calibration or first image)")
    table = format_summary([JobResult("017", False, 0, error=reason + "\nTraceback ..."),
                            JobResult("018", True, 1)], error_width=60)
    lines = table.splitlines()
    start = lines[0].index("ERROR")
    pieces = [ln[start:] for ln in lines[1:-2]]
    assert " ".join(pieces) == reason  # every word, none cut
    assert all(len(p) <= 60 or " " not in p for p in pieces) and len(pieces) > 2
    assert lines[-2].startswith("018") and "FAILED: 017" in lines[-1]


def test_status_and_summary_writes_survive_an_unwritable_directory(tmp_path, capsys, monkeypatch):
    """A status or summary that cannot be written never fails the job or the driver: the status
    update is skipped with a warning, the summary goes to the fallback folder."""
    from cluster.status import StatusReporter, write_state

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where a folder should be")
    write_state(blocker / "status", "017", "queued")  # no exception
    rep = StatusReporter(blocker / "status", "017")
    rep.set_state("running")
    assert rep.progress(5, 10) is False
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    results = [JobResult("017", False, 1, error="boom")]
    written = write_summary_json(results, blocker / "runs" / "summary.json")
    assert written is not None and written.parent == tmp_path / "tmp" / "diffusion-avatars"
    assert json.loads(written.read_text())["results"][0]["person"] == "017"
    assert f"cannot write the run summary to {blocker / 'runs' / 'summary.json'}" in capsys.readouterr().err
