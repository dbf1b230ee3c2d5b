"""Exclusive locks on folders: a second holder is refused naming the first, a dead holder leaves no lock."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from common import locks
from common.locks import AlreadyRunning, exclusive


def _holder_process(lock, ready):
    code = textwrap.dedent(f"""
        import sys, time
        sys.argv = ["jobs/launch_all.py", "--persons", "all"]
        from common.locks import exclusive
        with exclusive({str(lock)!r}, "the main job"):
            open({str(ready)!r}, "w").close()
            time.sleep(600)
    """)
    return subprocess.Popen([sys.executable, "-c", code])


def _wait_until_held(holder: subprocess.Popen, ready) -> None:
    for _ in range(600):
        if ready.exists() or holder.poll() is not None:
            break
        threading.Event().wait(0.05)
    assert ready.exists()


def test_a_second_holder_is_refused_naming_the_first_and_a_killed_one_leaves_no_lock(tmp_path):
    lock, ready = tmp_path / "work" / ".lock", tmp_path / "ready"
    holder = _holder_process(lock, ready)
    try:
        _wait_until_held(holder, ready)
        with pytest.raises(AlreadyRunning) as err:
            with exclusive(lock, "the main job"):
                pass
        message = str(err.value)
        assert message.startswith(f"the main job is already running on {lock.parent} (pid {holder.pid} on ")
        assert "jobs/launch_all.py --persons all" in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with exclusive(lock, "the main job"):  # the kernel dropped the dead holder's lock
        pass


def test_waiting_takes_the_lock_when_the_holder_is_done(tmp_path):
    lock = tmp_path / ".lock"
    order = []
    with exclusive(lock, "the save"):
        def second():
            with exclusive(lock, "the save", wait=True):
                order.append("second")
        thread = threading.Thread(target=second)
        thread.start()
        thread.join(0.3)
        assert thread.is_alive()  # blocked while the first holds it
        order.append("first")
    thread.join(10)
    assert order == ["first", "second"]


def test_a_file_system_without_locks_is_warned_about_and_the_work_goes_on(tmp_path, monkeypatch):
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    ran = []
    with pytest.warns(RuntimeWarning, match="does not lock files"):
        with exclusive(tmp_path / ".lock", "the main job"):
            ran.append(True)
    assert ran == [True]
    assert locks._holder(tmp_path / "missing") == "a process whose details the lock file does not hold"


@pytest.mark.parametrize("proc_locks", [True, False], ids=["proc-locks", "no-proc-locks"])
def test_the_holder_is_named_without_taking_the_lock(tmp_path, monkeypatch, proc_locks):
    lock, ready = tmp_path / "work" / ".lock", tmp_path / "ready"
    assert locks.lock_holder(lock) is None  # no lock file: nobody
    if not proc_locks:  # a machine without /proc/locks: the pid the lock file records, on this host
        real_open = open

        def no_proc_locks(path, *a, **k):
            if str(path) == "/proc/locks":
                raise FileNotFoundError(path)
            return real_open(path, *a, **k)
        monkeypatch.setattr("builtins.open", no_proc_locks)
    holder = _holder_process(lock, ready)
    try:
        _wait_until_held(holder, ready)
        found = locks.lock_holder(lock)
        assert found is not None and found.startswith(f"pid {holder.pid} on ")
        assert "jobs/launch_all.py --persons all" in found
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert locks.lock_holder(lock) is None  # the lock file stays, its holder is gone
    with exclusive(lock, "the main job"):  # and looking never took it
        pass


def test_a_lock_file_of_another_user_is_locked_read_only_and_still_excludes(tmp_path, monkeypatch):
    """A lock file another user created (0644 under the usual umask) cannot be opened for writing; before, every
    evaluation save and report build in such a shared folder failed with PermissionError. The suite runs as root,
    whom file modes do not stop, so the refusal to write is what the other user's file would give."""
    lock, ready = tmp_path / "work" / ".lock", tmp_path / "ready"
    holder = _holder_process(lock, ready)  # the other user, holding it
    try:
        _wait_until_held(holder, ready)
        real_open = locks.os.open

        def other_users_file(path, flags, *mode):
            if flags & (locks.os.O_RDWR | locks.os.O_WRONLY):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, flags, *mode)

        monkeypatch.setattr(locks.os, "open", other_users_file)
        with pytest.raises(AlreadyRunning, match=f"pid {holder.pid} on "):  # the read-only lock still excludes
            with exclusive(lock, "the main job"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    before = lock.read_text()
    with exclusive(lock, "the main job"):  # taken once the other's holder is gone; its note is left as it was
        assert lock.read_text() == before


def _reader_process(lock, ready):
    code = textwrap.dedent(f"""
        import time
        from common.locks import exclusive
        with exclusive({str(lock)!r}, "an ingest", shared=True):
            open({str(ready)!r}, "w").close()
            time.sleep(600)
    """)
    return subprocess.Popen([sys.executable, "-c", code, "--reader-of-the-test"])


def test_shared_holders_run_together_and_refuse_an_exclusive_one_naming_them(tmp_path):
    """Readers of a folder (shard preprocesses of one stores folder) hold its lock together; its writer (an ingest)
    is refused naming each of them by pid and command line, and `lock_holder` names them as well."""
    lock, ready = tmp_path / "zarr" / ".lock", tmp_path / "ready"
    lock.parent.mkdir()
    reader = _reader_process(lock, ready)
    try:
        _wait_until_held(reader, ready)
        with exclusive(lock, "an ingest", shared=True):  # a second reader: allowed
            with pytest.raises(AlreadyRunning) as err:
                with exclusive(lock, "an ingest"):
                    pass
            held = locks.lock_holder(lock)
        message = str(err.value)
        assert message.startswith(f"an ingest cannot start on {lock.parent} while other processes read it (")
        for named in (message, held):
            assert f"pid {reader.pid} on " in named and "--reader-of-the-test" in named
            assert f"pid {os.getpid()} on " in named
    finally:
        reader.send_signal(signal.SIGKILL)
        reader.wait()
    assert locks.lock_holder(lock) is None
    with exclusive(lock, "an ingest"):  # the readers' locks went with them
        pass


def test_an_exclusive_holder_refuses_a_shared_one_naming_itself(tmp_path):
    lock, ready = tmp_path / "work" / ".lock", tmp_path / "ready"
    holder = _holder_process(lock, ready)
    try:
        _wait_until_held(holder, ready)
        with pytest.raises(AlreadyRunning, match=f"the main job is already running on .*pid {holder.pid} on .*"
                                                 "jobs/launch_all.py --persons all"):
            with exclusive(lock, "the main job", shared=True):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with exclusive(lock, "the main job", shared=True):  # a reader empties the gone writer's note
        assert lock.read_text() == ""
        assert locks.lock_holder(lock).startswith(f"pid {os.getpid()} on ")


def test_a_reader_that_cannot_make_the_lock_file_is_warned_and_goes_on(tmp_path, monkeypatch):
    """A stores folder the reader may only read (another user's data set): no lock file can be made there; the
    preprocess is not refused for it, as on a file system without locks."""
    real_open = locks.os.open

    def read_only_folder(path, flags, *mode):
        if flags & locks.os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *mode)

    monkeypatch.setattr(locks.os, "open", read_only_folder)
    ran = []
    with pytest.warns(RuntimeWarning, match="the lock cannot be made"):
        with exclusive(tmp_path / ".lock", "an ingest", shared=True):
            ran.append(True)
    assert ran == [True] and not (tmp_path / ".lock").exists()
    with pytest.raises(FileNotFoundError):  # a writer needs its lock
        with exclusive(tmp_path / ".lock", "an ingest"):
            pass
