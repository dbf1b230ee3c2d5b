"""Prometheus target files of processes that died (cluster/monitoring/targets.py): each file records its writer
(host, pid, pid_space, start time), a live writer touches it, and a sweep (every register; launch_all at the start
and end of a night) removes those of writers that are gone: by pid in this pid_space, by an hour without a touch
elsewhere. Files of earlier versions (no writer record) are left, and nothing fails on them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: A process that registers a target in argv[1] as argv[2], says so and waits to be killed.
REGISTERING = """
import sys, time
from cluster.monitoring import targets
assert targets.register(sys.argv[1], sys.argv[2], "127.0.0.1", 9999, {"component": "training"}) is not None
print("registered", flush=True)
time.sleep(600)
"""


def _targets():
    from cluster.monitoring import targets  # the sweep is new: a test of the old tree fails in the test, not here

    return targets


def _start_registered(folder: Path, name: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", REGISTERING, str(folder), name], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "registered"
    return proc


def _write(path: Path, labels: dict[str, str], age_s: float = 0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{"targets": ["node9:9400"], "labels": labels}]))
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def _writer(host: str, pid: int, space: str, started_at: str) -> dict[str, str]:
    return {"__writer_host": host, "__writer_pid": str(pid), "__writer_pid_space": space,
            "__writer_started_at": started_at}


@pytest.mark.timeout(120)
def test_a_sigkilled_writers_file_is_removed_at_the_next_register_and_a_live_ones_is_kept(tmp_path: Path) -> None:
    """Two processes register; one is SIGKILLed (no unregister runs). The next register in this folder, on this
    host, removes the killed one's file and keeps the live one's; once that one is killed too (not yet reaped: a
    zombie), a sweep removes its file as well."""
    targets = _targets()
    folder = tmp_path / "targets"
    killed, live = _start_registered(folder, "training-017"), _start_registered(folder, "training-018")
    try:
        written = json.loads((folder / "training-017.json").read_text())[0]["labels"]
        assert written["__writer_pid"] == str(killed.pid) and written["component"] == "training"
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        assert (folder / "training-017.json").exists()  # what a killed process leaves
        assert targets.register(folder, "training-019", "127.0.0.1", 9401, {}) == folder / "training-019.json"
        assert sorted(p.name for p in folder.iterdir()) == ["training-018.json", "training-019.json"]
        live.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 30
        while targets.sweep(folder) == [] and time.monotonic() < deadline:  # the kill takes a moment
            time.sleep(0.1)
        assert sorted(p.name for p in folder.iterdir()) == ["training-019.json"]
    finally:
        for proc in (killed, live):
            proc.kill()
            proc.wait()
        targets.unregister(folder, "training-019")
    assert list(folder.iterdir()) == []


def test_a_reused_pid_is_gone_and_a_live_writer_is_kept_however_old_its_file(tmp_path: Path) -> None:
    """This pid_space: a file naming a live pid with another start time (the pid now names a later process) is
    removed; this process's own file is kept even untouched for days (its pid says it lives)."""
    targets = _targets()
    from cluster.status import pid_space

    me = targets.writer_labels()
    reused = _write(tmp_path / "training-017.json", {**me, "__writer_started_at": "1000.0",
                                                     "__writer_started_boot": "0.5"})
    mine = _write(tmp_path / "training-018.json", me, age_s=5 * 86400)
    assert pid_space() is not None and me["__writer_pid_space"] == pid_space()
    assert targets.sweep(tmp_path) == [reused]
    assert mine.exists()


def test_another_hosts_file_is_kept_until_it_is_not_touched_for_the_abandon_bound(tmp_path: Path) -> None:
    """A writer on another host, in another container or an earlier boot cannot be checked by pid: its file stays
    while it is touched (a live writer touches it every HEARTBEAT_S), and is removed once untouched for
    ABANDONED_AFTER_S (its node lost, its process killed)."""
    targets = _targets()
    assert targets.ABANDONED_AFTER_S >= 10 * targets.HEARTBEAT_S
    other = _writer("node9", 4242, "another-boot pid:[4026531836]", "1700000000.5")
    bound = targets.ABANDONED_AFTER_S
    fresh = _write(tmp_path / "training-017.json", other, age_s=bound - 60)
    old = _write(tmp_path / "training-018.json", other, age_s=bound + 60)
    unknown = _write(tmp_path / "renderer-a1.json", _writer("node9", 4242, "", ""), age_s=bound + 60)
    assert sorted(targets.sweep(tmp_path)) == [unknown, old]
    assert fresh.exists()


def test_files_of_earlier_versions_and_foreign_files_are_left_and_break_nothing(tmp_path: Path) -> None:
    """No writer record (a file an earlier version wrote, one another tool keeps in a shared folder, one that does
    not parse, writer fields that are no strings): left, however old; the register beside them works. A temporary
    file of a killed write (common.io.atomic_file's ``.<name>.<random>.tmp.json``) goes once it is old."""
    targets = _targets()
    old = targets.ABANDONED_AFTER_S + 60
    kept = [_write(tmp_path / "training-017.json", {"person": "017", "component": "training"}, age_s=old),
            _write(tmp_path / "training-018.json", {**_writer("x", 1, "", ""), "__writer_pid": 7}, age_s=old)]
    for name, text in (("node-exporter.json", "[]"), ("cut.json", '[{"targ'), ("odd.json", '{"labels": 3}'),
                       (".hidden.json", "x"), (".training-019.json.fresh.tmp.json", '[{"targ')):
        (tmp_path / name).write_text(text)
        kept.append(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not a target")
    stale_tmp = _write(tmp_path / ".training-019.json.a1b2c3d4.tmp.json", {}, age_s=old)
    assert targets.sweep(tmp_path) == [stale_tmp]
    assert targets.register(tmp_path, "training-020", "127.0.0.1", 9400, {}) is not None
    try:
        assert all(p.exists() for p in kept)
    finally:
        targets.unregister(tmp_path, "training-020")
    assert targets.sweep(tmp_path / "missing") == []


def test_a_live_writer_touches_its_file_and_writes_it_again_when_it_was_removed(tmp_path: Path, monkeypatch) -> None:
    """The heartbeat: a registered file is touched; one removed meanwhile (a sweep elsewhere that judged it by age)
    is written again; one another process wrote over is left to it, also by unregister; the thread does it every
    HEARTBEAT_S."""
    targets = _targets()
    path = targets.register(tmp_path, "training-017", "127.0.0.1", 9400, {"person": "017"})
    content = path.read_text()
    try:
        os.utime(path, (1e9, 1e9))
        targets.heartbeat()
        assert time.time() - path.stat().st_mtime < 60
        path.unlink()
        targets.heartbeat()
        assert path.read_text() == content
        # the thread: touches within a few of its (shortened) beats
        monkeypatch.setattr(targets, "HEARTBEAT_S", 0.05)
        os.utime(path, (1e9, 1e9))
        targets._wake.set()
        deadline = time.monotonic() + 20
        while path.stat().st_mtime == 1e9 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert time.time() - path.stat().st_mtime < 60, "the heartbeat thread did not touch the file"
        # written over by another writer (the same name registered elsewhere): theirs from now on
        theirs = _write(path, _writer("node9", 4242, "another-boot pid:[1]", "1.0"), age_s=7200)
        targets.heartbeat()
        assert path.stat().st_mtime < time.time() - 3600
    finally:
        targets.unregister(tmp_path, "training-017")
    assert theirs.exists()
    theirs.unlink()
    targets.heartbeat()
    time.sleep(0.3)  # several beats of the thread: nothing writes an unregistered file again
    assert not path.exists()
