"""A status file that says `running` is only as alive as the process that wrote it: a killed training writes no
verdict, and its file must not read `running` forever (jobs/status.py shows it `lost`, or `stale` where its
process cannot be checked); launch_all gives the persons it skips as already trained their `succeeded`."""

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

from cluster import status as cs
from cluster.person_job import JobResult
from cluster.status import PersonStatus, StatusReporter, read_status, write_state
from jobs import launch_all
from jobs._presets import preset_cli

ROOT = Path(__file__).resolve().parents[2]

#: A training killed (SIGKILL: the OOM killer, `kill -9`) after some steps, before any verdict.
_KILLED_TRAINING = """
import os, signal, sys
from cluster.status import StatusReporter
reporter = StatusReporter(sys.argv[1], "000", min_interval_s=0.0)
reporter.set_state("running", message="attempt 1")
reporter.progress(11, 30)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _status_cli(workdir: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "status.py"), "--workdir", str(workdir), *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def _rows(table: str) -> dict[str, list[str]]:
    lines = table.strip().splitlines()
    assert lines[0].split()[:2] == ["PERSON", "STATE"], table
    return {cells[0]: cells[1:] for cells in (line.split() for line in lines[1:-1])}


def _file(status: Path, person: str, **fields) -> None:
    """A status file as a writer elsewhere (or an older version, without ``pid_space``) left it."""
    status.mkdir(parents=True, exist_ok=True)
    now = time.time()
    rec = {"person": person, "state": "running", "attempt": 1, "restarts": 0, "step": 11, "total_steps": 30,
           "started_at": now - 60, "updated_at": now, "rate_step0": 1, "rate_t0": now - 50, "message": "attempt 1",
           "host": "node12", "pid": 4242, **fields}
    (status / f"{person}.json").write_text(json.dumps({k: v for k, v in rec.items() if v is not ...}))


def test_a_killed_training_is_shown_lost_not_running(tmp_path):
    """The training's process was SIGKILLed at step 11 of 30 (as launch_all's was at a checkpoint): its file still
    says `running`, but `jobs/status.py` shows it `lost`, without an ETA, naming the process; a live one (this
    process) stays `running`."""
    status = tmp_path / "work" / "status"
    proc = subprocess.run([sys.executable, "-c", _KILLED_TRAINING, str(status)], cwd=ROOT, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -signal.SIGKILL
    assert json.loads((status / "000.json").read_text())["state"] == "running"  # what it left
    live = StatusReporter(status, "001", min_interval_s=0.0)
    live.set_state("running")
    live.progress(5, 30)
    out = _status_cli(tmp_path / "work")
    assert out.returncode == 0, out.stderr
    rows = _rows(out.stdout)
    assert rows["000"][:3] == ["lost", "1", "11/30"] and "-" == rows["000"][5]  # ETA: none for a dead process
    assert "gone without a verdict (killed?): process" in out.stdout
    (lost,) = [s for s in cs.check_running(read_status(status)) if s.state == "lost"]
    assert lost.message == f"gone without a verdict (killed?): process {_pid_in(status)} on {lost.host}"
    assert rows["001"][0] == "running"
    assert out.stdout.strip().splitlines()[-1] == "running=1  lost=1"


def _pid_in(status: Path) -> int:
    return json.loads((status / "000.json").read_text())["pid"]


def test_a_reused_pid_is_not_taken_for_the_writer(tmp_path):
    """The writer's pid now belongs to a process started after the writer's last write (this one): `lost`. The
    same pid with a last write after that process started is its writer: `running`."""
    created = psutil.Process().create_time()
    _file(tmp_path, "000", pid=os.getpid(), pid_space=cs.pid_space(), updated_at=created - 60)
    _file(tmp_path, "001", pid=os.getpid(), pid_space=cs.pid_space(), updated_at=created + 1)
    _file(tmp_path, "002", pid=-1, pid_space=cs.pid_space(), updated_at=created + 1)  # hand-edited: not checked
    judged = {s.person: s.state for s in cs.check_running(read_status(tmp_path), now=created + 10)}
    assert judged == {"000": "lost", "001": "running", "002": "running"}


def test_a_process_that_cannot_be_checked_is_stale_after_an_hour_without_update(tmp_path):
    """A writer on another machine (another boot id) or in another pid namespace, or an older version's file
    without `pid_space` (it still reads), cannot be checked by pid: it is `stale` only when its file has not been
    updated for longer than a live training is ever silent (STALE_AFTER_S), with why; earlier it is `running`."""
    now = time.time()
    _file(tmp_path, "000", pid_space="another-boot pid:[4026531836]", updated_at=now - cs.STALE_AFTER_S - 5)
    _file(tmp_path, "001", pid_space=..., updated_at=now - cs.STALE_AFTER_S - 5)  # an older version's file
    _file(tmp_path, "002", pid_space=..., updated_at=now - 600)  # a long first step, a checkpoint
    _file(tmp_path, "003", state="queued", pid_space=..., updated_at=now - 10 * cs.STALE_AFTER_S)  # no process
    statuses = read_status(tmp_path)
    assert [s.state for s in statuses] == ["running", "running", "running", "queued"]  # the files as they are
    judged = {s.person: s for s in cs.check_running(statuses, now=now)}
    assert {p: s.state for p, s in judged.items()} == {"000": "stale", "001": "stale", "002": "running",
                                                       "003": "queued"}
    assert judged["000"].message.startswith("no update for 1h00m") and "process 4242 on node12 cannot be checked" \
        in judged["000"].message
    assert judged["000"].eta_s is None
    out = _status_cli(tmp_path.parent, "--status-dir", str(tmp_path), "--stale-after", "300")
    assert out.returncode == 0, out.stderr
    assert {p: r[0] for p, r in _rows(out.stdout).items()} == {"000": "stale", "001": "stale", "002": "stale",
                                                                "003": "queued"}
    assert out.stdout.strip().splitlines()[-1] == "queued=1  stale=3"


@pytest.mark.parametrize("value", ["0", "-5", "nan"])
def test_stale_after_must_be_positive(tmp_path, value):
    out = _status_cli(tmp_path, "--stale-after", value)
    assert out.returncode == 2 and "error: --stale-after must be a positive number of seconds, got " in out.stderr
    with pytest.raises(ValueError, match="stale_after_s must be a positive number"):
        cs.check_running([PersonStatus("000", "running")], stale_after_s=float(value))


def test_launch_all_marks_the_persons_it_skips_as_trained_succeeded(tmp_path, monkeypatch, capfd):
    """A launch killed after 017's result.json but before its verdict left 017 `running`; the next launch skips
    017 as already trained and sets its file to `succeeded` at its steps, as its run would have."""
    captures = tmp_path / "captures"
    for p in ("017", "018"):
        (captures / p).mkdir(parents=True)
    work = tmp_path / "work"
    write_state(work / "status", "017", "running", attempt=1)
    monkeypatch.setattr(launch_all, "_data", lambda args, persons=None, clock=None: (["017", "018"], {}))
    monkeypatch.setattr(launch_all, "_base_model", lambda args, prepared, **kw: None)
    monkeypatch.setattr(launch_all, "_check_bases", lambda args, persons, base: {})
    monkeypatch.setattr(launch_all, "_trained", lambda args, persons, base: {"017": {"person": "017", "steps": 30}})
    trained: list[str] = []
    monkeypatch.setattr(launch_all, "_train", lambda args, todo, base, session=None: trained.extend(todo) or [
        JobResult(p, True, 1, result={"steps": 30}) for p in todo])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = preset_cli(launch_all.PRESETS, default="tiny", description="d", args=[
        "--workdir", str(work), "--captures", str(captures), "--backend", "local", "--min-free-gb", "0",
        "--no-evaluate", "--train.steps", "30", "--persons", "017,018"])
    assert launch_all.main(args) == 0, capfd.readouterr()
    assert trained == ["018"]
    (s,) = [s for s in read_status(work / "status") if s.person == "017"]
    assert (s.state, s.step, s.total_steps, s.attempt) == ("succeeded", 30, 30, 1)
    assert s.message == "already trained to its steps on this base; not run again"
    assert cs.check_running([s]) == [s]


def test_the_writer_of_running_records_where_its_pid_means_it(tmp_path):
    """`pid_space` (boot id and pid namespace) is written with host and pid; where it cannot be read it is null."""
    StatusReporter(tmp_path, "000").set_state("running")
    rec = json.loads((tmp_path / "000.json").read_text())
    assert rec["pid"] == os.getpid() and rec["pid_space"] == cs.pid_space()
    if sys.platform == "linux":
        assert rec["pid_space"] == (Path("/proc/sys/kernel/random/boot_id").read_text().strip() + " "
                                    + os.readlink("/proc/self/ns/pid"))
