"""A process recorded as a writer (a queued status file's launch, a Prometheus target file's exporter) is the same
process after the system clock was set (an NTP step, a resumed virtual machine).

psutil's ``create_time`` is the start in clock ticks since boot plus the boot time as the clock puts it *now*: a
clock set by 10 s moves every process's start time by 10 s. Compared with the start time a file recorded before,
every live writer looked like a later process on its pid: its queued persons were shown ``lost`` and its target
file was swept (and, within the writer, its own file was taken for another's and left by ``unregister``)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import cluster.status as cs

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pid spaces are Linux's")

QUEUER = """
import sys, time
from cluster.status import write_state
write_state(sys.argv[1], "000", "queued", attempt=1, message="submitted", dies_with_writer=True)
print("queued", flush=True)
time.sleep(60)
"""


def _set_clock(monkeypatch, step_s: float) -> None:
    """The reader sees the system clock set by `step_s` seconds since the files were written: psutil's boot time
    (and so every process's create_time) moves with it, as after an NTP step."""
    import psutil._pslinux as pslinux

    booted, started = psutil.boot_time(), psutil.Process().create_time()
    monkeypatch.setattr(pslinux, "boot_time", lambda: booted + step_s)
    assert psutil.Process().create_time() == pytest.approx(started + step_s)


def _start_queuer(status_dir: Path) -> subprocess.Popen:
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", QUEUER, str(status_dir)], cwd=root, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "queued"
    return proc


def _state(status_dir: Path) -> cs.PersonStatus:
    (s,) = cs.check_running(cs.read_status(status_dir))
    return s


@pytest.mark.parametrize("step_s", [10.0, -10.0])
def test_a_live_launchs_queued_person_stays_queued_after_the_clock_is_set(tmp_path: Path, monkeypatch,
                                                                          step_s: float) -> None:
    proc = _start_queuer(tmp_path)
    try:
        _set_clock(monkeypatch, step_s)
        s = _state(tmp_path)
        assert s.state == "queued", s.message  # before: lost ("the launch that queued it is gone")
    finally:
        proc.kill()
        proc.wait()
    s = _state(tmp_path)  # its death is still seen with the clock set
    assert s.state == "lost" and f"process {proc.pid}" in s.message


TRAINER = """
import sys, time
from cluster.status import StatusReporter
StatusReporter(sys.argv[1], "000").set_state("running")
print("running", flush=True)
time.sleep(60)
"""


def test_a_training_silent_since_its_start_stays_running_after_the_clock_is_set(tmp_path: Path,
                                                                               monkeypatch) -> None:
    """A training loading its data or compiling (minutes without a progress write) when the clock is set forward:
    its process started, by the clock now, after its last write; before, that made it a later process (lost)."""
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", TRAINER, str(tmp_path)], cwd=root, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "running"
        _set_clock(monkeypatch, 10.0)
        s = _state(tmp_path)
        assert s.state == "running", s.message  # before: lost ("gone without a verdict")
    finally:
        proc.kill()
        proc.wait()
    assert _state(tmp_path).state == "lost"


def test_a_reused_pid_is_still_another_process(tmp_path: Path) -> None:
    """A file naming this live pid with another start since boot is a launch that is gone (its pid reused)."""
    me = cs.this_process()
    assert me["started_boot"] is not None
    cs.write_state(tmp_path, "000", "queued", dies_with_writer=True)
    path = cs.status_path(tmp_path, "000")
    rec = json.loads(path.read_text())
    assert rec["queuer_started_boot"] == me["started_boot"]
    assert _state(tmp_path).state == "queued"
    path.write_text(json.dumps({**rec, "queuer_started_boot": me["started_boot"] - 5}))
    assert _state(tmp_path).state == "lost"


def _target_labels(pid: int) -> dict[str, str]:
    """The writer labels process `pid` (of this host) writes, as it computes them (before the clock is set)."""
    created = psutil.Process(pid).create_time()
    return {"__writer_host": "node", "__writer_pid": str(pid), "__writer_pid_space": cs.pid_space(),
            "__writer_started_at": str(created), "__writer_started_boot": str(created - psutil.boot_time())}


def test_a_live_writers_target_file_is_kept_after_the_clock_is_set(tmp_path: Path, monkeypatch) -> None:
    from cluster.monitoring import targets

    writer = subprocess.Popen(["sleep", "60"])
    try:
        path = tmp_path / "training-000.json"
        path.write_text(json.dumps([{"targets": ["node:9400"], "labels": _target_labels(writer.pid)}]))
        _set_clock(monkeypatch, 10.0)
        assert targets.sweep(tmp_path) == [] and path.exists()  # before: removed, its writer taken as gone
    finally:
        writer.kill()
        writer.wait()
    assert targets.sweep(tmp_path) == [path] and not path.exists()


def test_a_target_file_of_an_earlier_version_is_judged_by_its_unix_start_time(tmp_path: Path) -> None:
    """Files without ``__writer_started_boot``: a live pid with another UNIX start time is a reused pid, as before."""
    from cluster.monitoring import targets

    labels = {k: v for k, v in targets.writer_labels().items() if k != "__writer_started_boot"}
    kept = tmp_path / "training-000.json"
    reused = tmp_path / "training-001.json"
    kept.write_text(json.dumps([{"targets": ["node:9400"], "labels": {**labels, "__writer_pid_space": "x"}}]))
    reused.write_text(json.dumps([{"targets": ["node:9400"], "labels": {**labels, "__writer_started_at": "1000.0"}}]))
    assert targets.sweep(tmp_path) == [reused] and kept.exists()


def test_an_exporter_removes_its_own_target_file_after_the_clock_is_set(tmp_path: Path, monkeypatch) -> None:
    from cluster.monitoring import targets

    path = targets.register(tmp_path, "training-000", "127.0.0.1", 9400, {"person": "000"})
    assert path is not None and path.exists()
    _set_clock(monkeypatch, 10.0)
    time.sleep(0.01)
    assert targets.sweep(tmp_path) == [] and path.exists()
    targets.unregister(tmp_path, "training-000")
    assert not path.exists()  # before: taken for another process's file (its start time moved) and left
