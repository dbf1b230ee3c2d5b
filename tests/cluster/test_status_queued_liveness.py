"""A `queued` status file is only as alive as the launch that queued it where the person's job dies with it (local
and Ray backends): a driver killed outright (SIGKILL, the OOM killer, a lost node) before the person started left
`queued` for good, and jobs/status.py and the console counted it as waiting forever. A SLURM job outlives its
driver: its `queued` stays `queued`; files of older versions (no queuer recorded) too."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from test_status_liveness import _rows, _status_cli

from cluster import status as cs
from cluster.person_job import PersonJob
from cluster.status import StatusReporter, read_status, write_state

ROOT = Path(__file__).resolve().parents[2]

#: A launch_all-like driver: the local backend, whose first person's target holds the process (it runs in the
#: driver) while the others wait `queued`, written by the backend's own code.
_DRIVER = """
import sys
from pathlib import Path
from cluster.local_backend import LocalBackend, LocalConfig
from cluster.person_job import PersonJob
status, ready = sys.argv[1], sys.argv[2]
jobs = [PersonJob(p, "holding_target:run", {"ready": ready}) for p in ("000", "001", "002")]
LocalBackend(LocalConfig(status_dir=Path(status))).run_all(jobs)
"""

_TARGET = """
import time
from pathlib import Path
def run(person, ready):
    Path(ready).write_text(person)
    time.sleep(600)
    return {}
"""

#: A SLURM driver's queued write (the backend's own, for a submitted job), then the driver is killed.
_SLURM_DRIVER = """
import os, signal, sys
from cluster.person_job import PersonJob
from cluster.slurm_backend import SlurmBackend, SlurmConfig
class Submitted:
    job_id = "4242"
backend = SlurmBackend(SlurmConfig(status_dir=sys.argv[1]))
backend._queued(sys.argv[1], PersonJob("000", "holding_target:run"), 1, Submitted())
os.kill(os.getpid(), signal.SIGKILL)
"""


def _env(tmp_path: Path) -> dict:
    (tmp_path / "holding_target.py").write_text(_TARGET)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}


def _dead_pid() -> tuple[int, float]:
    """A pid of this pid namespace whose process has ended (reaped), with its start time."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    created = psutil.Process(proc.pid).create_time()
    proc.kill()
    proc.wait()
    return proc.pid, created


def test_queued_persons_of_a_killed_local_launch_are_lost_and_of_a_live_one_queued(tmp_path):
    """The driver (local backend) runs 000 and has 001 and 002 queued: while it lives jobs/status.py shows them
    `queued`; SIGKILLed, they never start: `lost`, the message saying the launch that queued them is gone."""
    status, ready = tmp_path / "status", tmp_path / "ready"
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER, str(status), str(ready)], cwd=ROOT, env=_env(tmp_path))
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert driver.poll() is None and time.monotonic() < deadline, "the driver did not start person 000"
            time.sleep(0.1)
        out = _status_cli(status.parent, "--status-dir", str(status))
        assert out.returncode == 0, out.stderr
        assert {p: r[0] for p, r in _rows(out.stdout).items()} == {"000": "running", "001": "queued",
                                                                    "002": "queued"}
        rec = json.loads((status / "001.json").read_text())
        assert (rec["queuer_pid"], rec["queuer_pid_space"], rec["dies_with_queuer"]) == (
            driver.pid, cs.pid_space(), True)
        assert rec["queuer_started_at"] == pytest.approx(psutil.Process(driver.pid).create_time(), abs=0.1)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=60)
    assert json.loads((status / "001.json").read_text())["state"] == "queued"  # what it left
    out = _status_cli(status.parent, "--status-dir", str(status))
    assert out.returncode == 0, out.stderr
    assert {p: r[0] for p, r in _rows(out.stdout).items()} == {"000": "lost", "001": "lost", "002": "lost"}
    assert out.stdout.strip().splitlines()[-1] == "lost=3"
    judged = {s.person: s for s in cs.check_running(read_status(status))}
    assert judged["001"].message == (f"the launch that queued it is gone (process {driver.pid} on "
                                     f"{judged['001'].queuer_host}; killed?): it never starts, launch it again")


def test_a_slurm_queued_person_outlives_its_killed_driver(tmp_path):
    """sbatch'd jobs stay in SLURM's queue when the driver dies: the file records its queuer and that the job
    does not die with it, and stays `queued`; so does the `queued` a requeued job writes itself."""
    status = tmp_path / "status"
    proc = subprocess.Popen([sys.executable, "-c", _SLURM_DRIVER, str(status)], cwd=ROOT, env=_env(tmp_path))
    assert proc.wait(timeout=120) == -signal.SIGKILL
    rec = json.loads((status / "000.json").read_text())
    assert (rec["state"], rec["message"], rec["queuer_pid"], rec["dies_with_queuer"]) == (
        "queued", "SLURM job 4242", proc.pid, False)
    from cluster.slurm_backend import PersonRunner

    PersonRunner(PersonJob("001", "holding_target:run"), 1, str(status)).checkpoint()  # the job's own requeue
    assert json.loads((status / "001.json").read_text())["dies_with_queuer"] is False
    out = _status_cli(status.parent, "--status-dir", str(status))
    assert out.returncode == 0, out.stderr
    assert {p: r[0] for p, r in _rows(out.stdout).items()} == {"000": "queued", "001": "queued"}


def test_ray_records_that_its_queued_tasks_die_with_the_driver(tmp_path, monkeypatch):
    """The Ray driver owns its tasks (Ray ends them with it, embedded Ray or a joined cluster): its `queued`
    says so (ray.remote replaced: no Ray is started)."""
    import ray

    from cluster.ray_backend import RayBackend, RayConfig

    class Remote:
        def options(self, **opts):
            return self

        def remote(self, *args):
            return "ref"

    monkeypatch.setattr(ray, "remote", lambda fn: Remote())
    RayBackend(RayConfig())._submit(PersonJob("000", "holding_target:run"), 2, str(tmp_path))
    rec = json.loads((tmp_path / "000.json").read_text())
    assert (rec["state"], rec["attempt"], rec["queuer_pid"], rec["dies_with_queuer"]) == ("queued", 2, os.getpid(),
                                                                                         True)


def test_an_older_versions_queued_file_stays_queued(tmp_path):
    """No queuer recorded (an older version's file, even one left with a dead `running` pid): `queued`, as before;
    a `queued` written without a queuer does not inherit the one of an earlier write, nor does `running`."""
    pid, created = _dead_pid()
    tmp_path.joinpath("000.json").write_text(json.dumps({
        "person": "000", "state": "queued", "attempt": 1, "restarts": 0, "step": None, "total_steps": None,
        "started_at": None, "updated_at": time.time(), "message": "", "host": "node12", "pid": pid,
        "pid_space": cs.pid_space()}))
    write_state(tmp_path, "001", "queued", dies_with_writer=True)
    write_state(tmp_path, "001", "queued")  # e.g. a hand-run requeue: no queuer now
    write_state(tmp_path, "002", "queued", dies_with_writer=True)
    StatusReporter(tmp_path, "002").set_state("running")
    assert not set(cs.QUEUER_FIELDS) & (set(json.loads((tmp_path / "001.json").read_text()))
                                        | set(json.loads((tmp_path / "002.json").read_text())))
    judged = {s.person: s.state for s in cs.check_running(read_status(tmp_path), now=time.time() + 10 ** 6)}
    assert judged == {"000": "queued", "001": "queued", "002": "running"}
    with pytest.raises(ValueError, match="dies_with_writer only applies to a 'queued' state"):
        write_state(tmp_path, "003", "running", dies_with_writer=True)


def test_a_reused_or_dead_queuer_pid_is_lost_one_elsewhere_is_not_judged(tmp_path):
    """The queuer's pid now names a process started at another time (this one, as if reused): `lost`; the pid of
    an ended process: `lost`; a queuer alive (this process, its start time): `queued`; one in another boot or pid
    namespace cannot be checked: `queued` (never `stale`: waiting for resources takes as long as it takes); a
    wrongly typed field makes the file `invalid`, named."""
    here = psutil.Process().create_time()
    dead, dead_created = _dead_pid()
    base = {"state": "queued", "attempt": 1, "restarts": 0, "updated_at": time.time(), "message": "",
            "queuer_host": "head", "queuer_pid_space": cs.pid_space(), "dies_with_queuer": True}
    files = {"000": {"queuer_pid": os.getpid(), "queuer_started_at": here - 100},
             "001": {"queuer_pid": dead, "queuer_started_at": dead_created},
             "002": {"queuer_pid": os.getpid(), "queuer_started_at": here},
             "003": {"queuer_pid": dead, "queuer_started_at": dead_created, "queuer_pid_space": "other-boot pid:[1]"},
             "004": {"queuer_pid": dead, "queuer_started_at": dead_created, "dies_with_queuer": "yes"}}
    for person, fields in files.items():
        tmp_path.joinpath(f"{person}.json").write_text(json.dumps({"person": person, **base, **fields}))
    judged = {s.person: s for s in cs.check_running(read_status(tmp_path), now=time.time() + 10 ** 6)}
    assert {p: s.state for p, s in judged.items()} == {"000": "lost", "001": "lost", "002": "queued",
                                                       "003": "queued", "004": "invalid"}
    assert "field 'dies_with_queuer' is 'yes', expected bool or null" in judged["004"].message

