"""Ray backend against a real local Ray cluster (`ray start --head` on 127.0.0.1) and
against an embedded `ray.init`."""

from __future__ import annotations

from pathlib import Path

import pytest
from workloads import expected_digest, read_runs, write_input

from cluster.orchestrate import exit_code, format_summary, run_all
from cluster.person_job import PersonJob, Resources
from cluster.ray_backend import RayBackend, RayConfig
from cluster.status import read_status

HERE = Path(__file__).resolve().parent  # workloads.py lives here
ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]
RUNTIME_ENV = {"env_vars": {"PYTHONPATH": str(HERE)}}


def _jobs(tmp_path, persons, corrupt=(), crash_once=(), steps=6, step_seconds=0.25, cpus=1.0, max_retries=1):
    for p in persons:
        write_input(tmp_path / "data", p, corrupt=p in corrupt)
    return [PersonJob(p, "workloads:count_steps",
                      dict(data_dir=str(tmp_path / "data"), work_dir=str(tmp_path / "work"), steps=steps,
                           step_seconds=step_seconds, crash_once=p in crash_once),
                      Resources(cpus=cpus), max_retries=max_retries) for p in persons]


def test_ray_cluster_three_persons(tmp_path, ray_env, ray_head):
    # 3 persons x 1 CPU on a 2-CPU cluster: one must queue. "b" is corrupt (fails alone after
    # its retry), "c" kills its own worker once (retried, resumes from its checkpoint).
    jobs = _jobs(tmp_path, ["a", "b", "c"], corrupt={"b"}, crash_once={"c"})
    backend = RayBackend(RayConfig(address=ray_head.address, status_dir=tmp_path / "status",
                                   runtime_env=RUNTIME_ENV, task_prefix="da-"))
    results = backend.run_all(jobs)
    assert backend.connected and not ray.is_initialized()  # joined, then disconnected (head still up)

    r = {x.person: x for x in results}
    assert r["a"].ok and r["a"].attempts == 1 and r["a"].result["digest"] == expected_digest("a", 6)
    assert not r["b"].ok and r["b"].attempts == 2 and "corrupt" in r["b"].error
    assert r["c"].ok and r["c"].attempts == 2 and r["c"].result["digest"] == expected_digest("c", 6)
    assert [x["start_step"] for x in read_runs(tmp_path / "work", "c")] == [0, 1]  # resumed, not redone
    assert exit_code(results) == 1 and "FAILED: b" in format_summary(results)

    # resources were reserved: never more than 2 workloads ran at once
    spans = []
    for p in ("a", "c"):
        starts, ends = read_runs(tmp_path / "work", p), read_runs(tmp_path / "work", p, "end")
        spans.append((starts[-1]["time"], ends[-1]["time"]))
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    assert max(__import__("itertools").accumulate(d for _, d in events)) <= 2

    st = {s.person: s for s in read_status(tmp_path / "status")}
    assert st["a"].state == "succeeded" and st["a"].step == 6
    assert st["b"].state == "failed" and st["b"].attempt == 2
    assert st["c"].state == "succeeded" and st["c"].attempt == 2

    # the dashboard / state API lists one task per person attempt, named after the person
    from ray.util.state import list_tasks
    names = {t.name for t in list_tasks(address=ray_head.dashboard_url, limit=1000)}
    assert {"da-a", "da-b", "da-b-a2", "da-c", "da-c-a2"} <= names


def test_ray_infeasible_job_fails_fast(tmp_path, ray_env, ray_head):
    jobs = _jobs(tmp_path, ["g"], steps=1)
    jobs = [PersonJob("g", jobs[0].target, jobs[0].kwargs, Resources(cpus=1, gpus=1), max_retries=3)]
    (r,) = run_all(jobs, RayConfig(address=ray_head.address, status_dir=tmp_path / "status", runtime_env=RUNTIME_ENV))
    assert not r.ok and r.attempts == 0 and "needs 1 GPU" in r.error
    (s,) = read_status(tmp_path / "status")
    assert s.state == "failed" and "GPU" in s.message


def test_ray_embedded(tmp_path, ray_env, monkeypatch):
    # embedded Ray workers are children of this process: PYTHONPATH is inherited
    monkeypatch.setenv("PYTHONPATH", str(HERE))
    jobs = _jobs(tmp_path, ["e1", "e2"], steps=3, step_seconds=0.05, cpus=0.5)
    jobs += _jobs(tmp_path, ["big"], steps=1, cpus=2)
    backend = RayBackend(RayConfig(status_dir=tmp_path / "status", num_cpus=1, num_gpus=0,
                                   object_store_memory_mb=80, node_ip_address="127.0.0.1"))
    results = backend.run_all(jobs)
    assert backend.connected and not ray.is_initialized()  # started and shut down its own Ray
    e1, e2, big = results
    assert e1.ok and e2.ok and e2.result["digest"] == expected_digest("e2", 3)
    # the embedded node offered exactly num_cpus=1: two 0.5-CPU persons fit, a 2-CPU one never can
    assert not big.ok and big.attempts == 0 and "needs 2 CPU but the largest Ray node offers 1" in big.error
    assert exit_code(results) == 1


def test_ray_config_rejects_embedded_options_with_address():
    with pytest.raises(ValueError, match="num_cpus, object_store_memory_mb only apply to an embedded Ray"):
        RayConfig(address="127.0.0.1:6379", num_cpus=2, object_store_memory_mb=100)


def test_processes_a_test_starts_hold_the_token_of_the_heads_it_starts(ray_head):
    """The `ray_head` fixture starts its head with conftest's RAY_ENV; drivers a test starts inherit
    os.environ. In an xdist worker whose controller had loaded that conftest (`pytest tests/cluster/...`)
    the two held different token paths and every driver joining the head was refused (InvalidAuthToken)."""
    import os

    head = dict(line.split("=", 1) for line in Path(f"/proc/{ray_head.proc.pid}/environ").read_text().split("\0")
                if "=" in line)
    keys = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")
    assert {k: os.environ.get(k) for k in keys} == {k: head.get(k) for k in keys}
    assert head["RAY_AUTH_MODE"] == "token" and Path(head["RAY_AUTH_TOKEN_PATH"]).read_text()
