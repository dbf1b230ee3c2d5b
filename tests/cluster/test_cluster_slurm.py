"""SLURM backend against a real single-node SLURM started by the test suite
(slurm/local/start-slurm.sh): a job array, retries, requeue after a signal and after a
real time-limit timeout, resuming from the workload's checkpoint."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pipeline_helpers import TINY_DATA, TINY_TRAIN, free_port, random_tiny_base
from slurm_helpers import sbatch_wait
from workloads import expected_digest, read_runs, write_input

from cluster.orchestrate import exit_code, format_summary
from cluster.person_job import PersonJob, Resources
from cluster.slurm_backend import SlurmBackend, SlurmConfig
from cluster.status import read_status

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]


def test_the_node_has_every_cpu_whatever_omp_num_threads_says(slurm_cluster):
    """start-slurm.sh ran with OMP_NUM_THREADS=1 (conftest), which `nproc` honours: the node got 1 CPU and a job
    asking for 2 stayed PENDING with Reason=PartitionConfig until its test timed out."""
    node = subprocess.run(["scontrol", "show", "node", "localhost"], capture_output=True, text=True, check=True)
    assert f"CPUTot={len(os.sched_getaffinity(0))} " in node.stdout, node.stdout


def _jobs(tmp_path, persons, corrupt=(), steps=4, step_seconds=0.2, resources=Resources(cpus=1), max_retries=1):
    for p in persons:
        write_input(tmp_path / "data", p, corrupt=p in corrupt)
    return [PersonJob(p, "workloads:count_steps",
                      dict(data_dir=str(tmp_path / "data"), work_dir=str(tmp_path / "work"), steps=steps,
                           step_seconds=step_seconds),
                      resources, max_retries=max_retries) for p in persons]


def _sbatch_scripts(log_dir) -> list[str]:
    """The sbatch scripts submitit wrote (an array's lies beside the per-task folders)."""
    return [p.read_text() for p in sorted(log_dir.rglob("*_submission.sh"))]


def test_slurm_array_corrupt_person_fails_alone(tmp_path, slurm_cluster, workload_env, monkeypatch):
    monkeypatch.setenv("DA_TEST_MARK", "from-env")
    jobs = _jobs(tmp_path, ["a", "b", "c"], corrupt={"b"}, resources=Resources(cpus=1, gpus=1, memory_gb=1))
    cfg = SlurmConfig(status_dir=tmp_path / "status", log_dir=tmp_path / "logs", partition="debug", time_min=5,
                      array=True, array_parallelism=2, setup=["export DA_TEST_MARK=from-setup"],
                      additional_parameters={"comment": "da-test"}, job_prefix="da-", poll_interval_s=0.5)
    backend = SlurmBackend(cfg)
    results = backend.run_all(jobs)

    r = {x.person: x for x in results}
    assert r["a"].ok and r["c"].ok and not r["b"].ok
    assert r["a"].result["digest"] == expected_digest("a", 4) and r["c"].result["digest"] == expected_digest("c", 4)
    assert r["b"].attempts == 2 and "ValueError" in r["b"].error.splitlines()[0] and "corrupt" in r["b"].error
    assert exit_code(results) == 1 and "FAILED: b" in format_summary(results)

    # one array for the first attempt, a single job for b's retry
    array_id = backend.job_ids["a"][0].split("_")[0]
    assert [backend.job_ids[p][0] for p in "abc"] == [f"{array_id}_{i}" for i in range(3)]
    assert len(backend.job_ids["b"]) == 2 and "_" not in backend.job_ids["b"][1]
    (script,) = [t for t in _sbatch_scripts(tmp_path / "logs") if "--array" in t]
    for opt in ("--array=0-2%2", "--partition=debug", "--time=5", "--gpus-per-node=1", "--cpus-per-task=1",
                "--mem=1GB", "--comment=da-test", "--job-name=da-array", "--signal=USR2@90",
                "export DA_TEST_MARK=from-setup"):
        assert opt in script, opt
    assert read_runs(tmp_path / "work", "a")[0]["mark"] == "from-setup"  # setup lines ran in the job
    # each task got one (fake) GPU from the GRES: SLURM exported its index
    assert read_runs(tmp_path / "work", "a")[0]["cuda_visible_devices"] in {"0", "1"}
    # SLURM's accounting agrees on the array tasks' outcomes (slurmdbd is updated asynchronously)
    deadline = time.time() + 30
    while True:
        sacct = subprocess.run(["sacct", "-n", "-X", "-P", "-j", array_id, "-o", "JobID,State"],
                               capture_output=True, text=True, check=True).stdout
        if (sacct.count("COMPLETED"), sacct.count("FAILED")) == (2, 1) or time.time() > deadline:
            break
        time.sleep(1)
    assert sacct.count("COMPLETED") == 2 and sacct.count("FAILED") == 1, sacct

    st = {s.person: s for s in read_status(tmp_path / "status")}
    assert st["a"].state == "succeeded" and st["a"].step == 4 and st["b"].state == "failed"


def _run_in_thread(backend, jobs):
    out: dict = {}
    th = threading.Thread(target=lambda: out.setdefault("results", backend.run_all(jobs)), daemon=True)
    th.start()
    return th, out


def _running_at(statuses: dict, person: str, step: int) -> bool:
    """Whether the status files show `person` running at `step` or later."""
    return person in statuses and statuses[person].state == "running" and (statuses[person].step or 0) >= step


def _wait_step(status_dir, person, step, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if _running_at({s.person: s for s in read_status(status_dir)}, person, step):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{person} never reached step {step}")


def _signal_each_at_step(status_dir, backends: dict, step: int, timeout: float = 120) -> None:
    """USR2 each person's job as soon as it reaches `step`, each on its own: on a loaded machine one job
    can start seconds after the other, and one waited for in turn could have finished first."""
    waiting = dict(backends)
    deadline = time.time() + timeout
    while waiting:
        st = {s.person: s for s in read_status(status_dir)}
        for person in [p for p in waiting if _running_at(st, p, step)]:
            subprocess.run(["scancel", "--signal=USR2", waiting.pop(person).job_ids[person][0]], check=True)
        if waiting and time.time() > deadline:
            raise TimeoutError(f"{sorted(waiting)} never reached step {step}")
        time.sleep(0.2)


def _lingering_scontrol(tmp_path, monkeypatch) -> None:
    """Put a `scontrol` first on the PATH (sbatch passes it to the jobs) that runs the real one and, after a
    requeue, lingers until the requeue's SIGTERM to the job's processes ends it."""
    import shutil

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\n"{shutil.which("scontrol")}" "$@" || exit $?\n'
                                      '[ "$1" = requeue ] && sleep 60\nexit 0\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_slurm_requeue_after_signal_resumes(tmp_path, slurm_cluster, workload_env, monkeypatch):
    # USR2 is what SLURM sends before the time limit or on preemption: submitit calls
    # PersonRunner.checkpoint, requeues the same call, and the workload resumes.
    # "keep" may be requeued (max_requeues=2); "drop" may not (max_requeues=0) and fails.
    # `scontrol requeue`, run by submitit inside the job, is one of the processes the requeue ends: when the
    # SIGTERM reached it before it exited (a race CI lost), submitit raised CalledProcessError into the training
    # and "keep" was reported failed while SLURM ran it again. A lingering stand-in makes that race certain here.
    _lingering_scontrol(tmp_path, monkeypatch)
    keep = _jobs(tmp_path, ["keep"], steps=14, step_seconds=0.4, max_retries=0)
    drop = _jobs(tmp_path, ["drop"], steps=14, step_seconds=0.4, max_retries=0)
    common = dict(status_dir=tmp_path / "status", log_dir=tmp_path / "logs", time_min=5, array=False,
                  poll_interval_s=0.5)
    b_keep = SlurmBackend(SlurmConfig(max_requeues=2, **common))
    b_drop = SlurmBackend(SlurmConfig(max_requeues=0, **common))
    th1, out1 = _run_in_thread(b_keep, keep)
    th2, out2 = _run_in_thread(b_drop, drop)
    _signal_each_at_step(tmp_path / "status", {"keep": b_keep, "drop": b_drop}, 3)
    th1.join(150)
    th2.join(150)
    (rk,), (rd,) = out1["results"], out2["results"]

    assert rk.ok and rk.attempts == 1 and rk.restarts == 1
    runs = read_runs(tmp_path / "work", "keep")
    assert len(runs) == 2 and runs[1]["start_step"] >= 3  # resumed, not redone from 0
    assert runs[1]["restarts"] == 1
    assert rk.result["digest"] == expected_digest("keep", 14)
    job_log = "".join(p.read_text() for p in (tmp_path / "logs").rglob(f"{b_keep.job_ids['keep'][0]}_*_log.err"))
    assert "was ended by signal 15" in job_log, job_log[-3000:]  # the race was run, and taken as a requeue
    assert len(b_keep.job_ids["keep"]) == 1  # the same SLURM job was requeued, not resubmitted
    scripts = _sbatch_scripts(tmp_path / "logs")
    assert any("--job-name=train-keep" in t and "--array" not in t for t in scripts)

    assert not rd.ok and "timed-out too many times" in rd.error
    (s,) = [s for s in read_status(tmp_path / "status") if s.person == "drop"]
    assert s.state == "failed"


def test_killed_job_is_noticed_within_the_poll_interval(tmp_path, slurm_cluster, workload_env):
    """A job killed from outside (scancel, a node that dies) leaves no result: the backend asks sacct
    every poll_interval_s instead of waiting for submitit's own refresh, which backs off to half the
    job's age (up to a minute: ~4 min to notice was measured on a long job)."""
    jobs = _jobs(tmp_path, ["victim"], steps=400, step_seconds=0.5, max_retries=0)
    backend = SlurmBackend(SlurmConfig(status_dir=tmp_path / "status", log_dir=tmp_path / "logs", time_min=5,
                                       array=False, poll_interval_s=1.0, result_wait_s=2.0))
    submitted = time.time()
    th, out = _run_in_thread(backend, jobs)
    _wait_step(tmp_path / "status", "victim", 2)
    time.sleep(max(0.0, submitted + 40 - time.time()))  # submitit alone would now refresh every >= 20 s
    from submitit.slurm.slurm import SlurmJob

    calls = SlurmJob.watcher.num_calls
    while SlurmJob.watcher.num_calls == calls:  # kill right after a sacct call: the worst case
        time.sleep(0.05)
    killed = time.time()
    subprocess.run(["scancel", backend.job_ids["victim"][0]], check=True)
    th.join(120)
    noticed = time.time() - killed
    (r,) = out["results"]
    assert not r.ok and "CANCELLED" in r.error, r.error
    # KillWait (5 s) + sacct lag (slurmdbd) + the 2 s result wait + one poll; submitit alone: >= 20 + 2 s
    assert noticed < 15, f"noticed {noticed:.0f} s after the kill"


def test_scontrol_requeue_is_counted_as_a_restart(tmp_path, slurm_cluster, workload_env):
    """`scontrol requeue` restarts the job from its first pickle (no USR2, no checkpoint call):
    SLURM_RESTART_COUNT is what records it, in the status file and the result."""
    # 30 steps of 0.4 s: the requeued run lasts ~10 s, so a poll on a loaded machine sees it running
    jobs = _jobs(tmp_path, ["rq"], steps=30, step_seconds=0.4, max_retries=0)
    backend = SlurmBackend(SlurmConfig(status_dir=tmp_path / "status", log_dir=tmp_path / "logs", time_min=5,
                                       array=False, poll_interval_s=0.5))
    th, out = _run_in_thread(backend, jobs)
    _wait_step(tmp_path / "status", "rq", 3)
    subprocess.run(["scontrol", "requeue", backend.job_ids["rq"][0]], check=True)
    deadline = time.time() + 150
    while time.time() < deadline:  # while it runs again, the status file says so
        st = {s.person: s for s in read_status(tmp_path / "status")}
        if st["rq"].state == "running" and st["rq"].restarts == 1:
            break
        time.sleep(0.2)
    assert st["rq"].restarts == 1 and st["rq"].attempt == 1 and "restart 1" in st["rq"].message, st["rq"]
    th.join(150)
    (r,) = out["results"]
    assert r.ok and r.attempts == 1 and r.restarts == 1, r
    runs = read_runs(tmp_path / "work", "rq")
    assert len(runs) == 2 and runs[1]["start_step"] >= 3 and runs[1]["restarts"] == 1
    (s,) = read_status(tmp_path / "status")
    assert s.state == "succeeded" and s.restarts == 1


#: The real-timeout run (test_slurm_requeue_after_real_timeout): its backend in a child process, which pickles what
#: run_all returned into argv[1]/results.pickle.
REAL_TIMEOUT_RUN = """
import pickle, sys
from pathlib import Path
from cluster.person_job import PersonJob, Resources
from cluster.slurm_backend import SlurmBackend, SlurmConfig
from workloads import write_input
root = Path(sys.argv[1])
write_input(root / "data", "slow")
# 1-minute limit, USR2 50 s before it (SLURM sends it on a ~30 s grid: 10-40 s into the
# run); the workload needs 45 s, so the first run is always cut short and requeued.
jobs = [PersonJob("slow", "workloads:count_steps", dict(data_dir=str(root / "data"), work_dir=str(root / "work"),
                                                        steps=45, step_seconds=1.0), Resources(cpus=1), max_retries=0)]
cfg = SlurmConfig(status_dir=root / "status", log_dir=root / "logs", time_min=1, signal_delay_s=50,
                  max_requeues=3, array=False, poll_interval_s=1.0)
(root / "results.pickle").write_bytes(pickle.dumps(SlurmBackend(cfg).run_all(jobs)))
"""


class _RealTimeoutRun:
    """The real-timeout test's run, which waits out SLURM's real time limit (~60-70 s of a mostly idle node): started
    ahead of its test, beside the tests that wait on one job of their own (the killed job's 40 s, the scontrol
    requeue), so that its minute passes while they run. Its backend runs in a child process: test_killed_job...
    counts the sacct calls of submitit's watcher, one per process, which a second backend in this process would
    share (and its polls would refresh the victim's state for the backend under test)."""

    def __init__(self, root: Path):
        self.root, self.proc = root, None

    def start(self) -> None:
        if self.proc is None:
            import sys

            # the job inherits this environment (sbatch): SLURM_CONF, and `workloads` on the path (workload_env)
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                                                os.environ.get("PYTHONPATH")]))}
            self.log = open(self.root / "backend.log", "w")
            self.proc = subprocess.Popen([sys.executable, "-c", REAL_TIMEOUT_RUN, str(self.root)], env=env,
                                         stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO)

    def results(self, timeout: float = 250):
        import pickle

        self.start()
        self.proc.wait(timeout)
        assert self.proc.returncode == 0, (self.root / "backend.log").read_text()[-3000:]
        return pickle.loads((self.root / "results.pickle").read_bytes())

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:  # its test did not wait for it (failed or interrupted before)
                self.proc.kill()
                self.proc.wait()
                subprocess.run(["scancel", "--name", "train-slow"], capture_output=True, timeout=60)
            self.log.close()


REAL_TIMEOUT_TEST = "test_slurm_requeue_after_real_timeout"
#: The tests whose start starts the real-timeout run (when its test is to run): each waits on a single job of its own
#: (the node has 2 CPUs: the run takes the other).
REAL_TIMEOUT_STARTS_WITH = {"test_killed_job_is_noticed_within_the_poll_interval",
                            "test_scontrol_requeue_is_counted_as_a_restart", REAL_TIMEOUT_TEST}


@pytest.fixture(scope="module")
def real_timeout_run(slurm_cluster, tmp_path_factory):
    run = _RealTimeoutRun(tmp_path_factory.mktemp("real-timeout"))
    yield run
    run.stop()


@pytest.fixture(autouse=True)
def _real_timeout_run_starts_early(request):
    if (request.node.name in REAL_TIMEOUT_STARTS_WITH
            and any(item.name == REAL_TIMEOUT_TEST for item in request.session.items)):
        request.getfixturevalue("real_timeout_run").start()


@pytest.mark.slow
def test_slurm_requeue_after_real_timeout(real_timeout_run):
    """A real time-limit timeout (REAL_TIMEOUT_RUN, started by an earlier test when it runs with them)."""
    (r,) = real_timeout_run.results()
    tmp_path = real_timeout_run.root
    assert r.ok and r.restarts >= 1, r
    runs = read_runs(tmp_path / "work", "slow")
    assert len(runs) == r.restarts + 1
    assert all(b["start_step"] > a["start_step"] for a, b in zip(runs, runs[1:]))  # never redone from 0
    assert r.result["digest"] == expected_digest("slow", 45)


def _template_env(tmp_path, **extra):
    import json
    import os
    import sys

    kwargs = dict(data_dir=str(tmp_path / "data"), work_dir=str(tmp_path / "work"), steps=extra.pop("steps", 4),
                  step_seconds=extra.pop("step_seconds", 0.2))
    return {**os.environ, "REPO": str(REPO), "PYTHON": sys.executable, "TARGET": "workloads:count_steps",
            "KWARGS_JSON": json.dumps(kwargs), "STATUS_DIR": str(tmp_path / "status"), **extra}


SMALL = ["--cpus-per-task=1", "--gpus-per-node=1", "--mem=1G", "--time=5"]


def test_sbatch_array_template(tmp_path, slurm_cluster, workload_env):
    for p, bad in (("t1", False), ("t2", True), ("t3", False)):
        write_input(tmp_path / "data", p, corrupt=bad)
    (tmp_path / "persons.txt").write_text("t1\nt2\n\nt3\n")  # blank lines are ignored
    env = _template_env(tmp_path, PERSONS_FILE=str(tmp_path / "persons.txt"))
    proc = sbatch_wait(["--array=0-2", *SMALL, f"--chdir={tmp_path}", str(REPO / "slurm/train_array.sbatch")], env=env)
    assert proc.returncode != 0  # the failed array task
    st = {s.person: s for s in read_status(tmp_path / "status")}
    assert st["t1"].state == "succeeded" and st["t3"].state == "succeeded" and st["t1"].step == 4
    assert st["t2"].state == "failed" and "corrupt" in st["t2"].message


def test_sbatch_person_template_requeues_on_usr2(tmp_path, slurm_cluster, workload_env):
    write_input(tmp_path / "data", "tp")
    env = _template_env(tmp_path, PERSON="tp", steps=14, step_seconds=0.4)
    job_id = subprocess.run(["sbatch", "--parsable", *SMALL, f"--chdir={tmp_path}",
                             str(REPO / "slurm/train_person.sbatch")],
                            env=env, capture_output=True, text=True, check=True).stdout.strip()
    _wait_step(tmp_path / "status", "tp", 3)
    subprocess.run(["scancel", "--batch", "--signal=USR2", job_id], check=True)  # what --signal=B:USR2@90 sends
    deadline = time.time() + 120
    seen = []
    while time.time() < deadline:
        (s,) = read_status(tmp_path / "status")
        seen.append((s.state, s.restarts, s.message))
        if s.state in ("succeeded", "failed") and s.restarts >= 1:
            break
        time.sleep(0.5)
    assert s.state == "succeeded" and s.restarts == 1 and s.step == 14, s
    # the trainer stopped by the requeue's SIGTERM asked SLURM and left its status `queued`, not `running`
    job_out = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert "stopped by SIGTERM; SLURM requeued the job, it runs again" in job_out, (job_out[-3000:], sorted(set(seen)))
    runs = read_runs(tmp_path / "work", "tp")
    assert len(runs) == 2 and runs[1]["start_step"] >= 3
    assert json_result(tmp_path, "tp") == expected_digest("tp", 14)


def json_result(tmp_path, person):
    import json
    return json.loads((tmp_path / "work" / person / "ckpt.json").read_text())["digest"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ray_on_slurm_template_runs_the_main_job(tmp_path, slurm_cluster):
    """slurm/ray_on_slurm.sbatch as shipped (only sizes overridden on the sbatch command line): a Ray
    head on the allocation, launch_all against it, Ray stopped by PID at the end. Under a per-job TMPDIR too
    long for Ray's sockets (a cluster's, e.g. /scratch/local/slurm_job_<id>/tmp), which made `ray start` fail."""
    import json
    import shutil
    import socket
    import sys
    import tempfile

    port = free_port()
    base = random_tiny_base(tmp_path / "base")
    job_tmp = tempfile.mkdtemp(prefix="da-slurm-job-tmp-" + "x" * 24 + "-", dir="/tmp")  # ~55 bytes
    assert 39 < len(job_tmp) < 60, job_tmp  # too long for Ray, not for the data stage's fork server
    env = {k: v for k, v in os.environ.items() if k != "RAY_TMPDIR"}
    env.update(REPO=str(REPO), PYTHON=sys.executable, RAY_PORT=str(port), HEAD_IP="127.0.0.1", TMPDIR=job_tmp)
    args = ["--workdir", str(tmp_path / "work"), "--synthetic.persons", "2", *TINY_DATA, *TINY_TRAIN,
            "--train.base-model", str(base), "--job-cpus", "1", "--max-retries", "0", "--no-evaluate",
            "--min-free-gb", "0"]
    try:
        proc = sbatch_wait(["--nodes=1", "--cpus-per-task=2", "--gpus-per-node=1", "--time=15", f"--chdir={tmp_path}",
                            f"--output={tmp_path}/ray-slurm-%j.out", str(REPO / "slurm/ray_on_slurm.sbatch"), *args],
                           env=env, timeout=880)
    finally:
        shutil.rmtree(job_tmp, ignore_errors=True)
    (out_file,) = tmp_path.glob("ray-slurm-*.out")
    out = out_file.read_text()
    assert proc.returncode == 0, proc.stderr + out[-4000:]
    assert "ray head on" in out and f"127.0.0.1:{port}" in out and "1 Ray node(s) alive" in out
    assert f"TMPDIR ({job_tmp}) is too long a path for Ray's sockets" in out
    summary = json.loads((tmp_path / "work" / "runs" / "summary.json").read_text())
    assert [(r["person"], r["ok"]) for r in summary["results"]] == [("000", True), ("001", True)]
    with socket.socket() as s:  # the head was stopped with the job
        assert s.connect_ex(("127.0.0.1", port)) != 0
