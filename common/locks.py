"""Locks on files, for work that two processes must not do at once on one folder (two main jobs on one work
directory: a nightly run still going when the next night's starts, or a user's run beside it).

``fcntl.flock`` locks belong to the open file: the kernel drops them when the process ends, however it ends
(SIGKILL, a node that reboots), so a lock is never left behind by a dead run. The lock file keeps the holder's
pid, host, start time and command line for the message a second run gets. A file system without locks (some
network file systems) is warned about, not refused: the work goes on unguarded, as it did before. A lock file
another user created (a shared folder) is locked through a read-only descriptor, which ``flock`` allows.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

from common.processes import pid_alive

#: flock errors that mean "this file system has no locks", not "someone holds it".
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class AlreadyRunning(RuntimeError):
    """Another process holds the lock; the message names the folder and what the lock file says of the holder."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started_at"]))
        return f"pid {info['pid']} on {info['host']}, started {started}: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process whose details the lock file does not hold"


def _flock_holders(path: Path, st: os.stat_result, note_pid: object) -> list[tuple[str, int]] | None:
    """(``WRITE`` or ``READ``, pid) of each flock held on the file ``path`` (at stat ``st``), from this machine's
    /proc/locks (a process waiting for the lock is not a holder); None when /proc/locks cannot be read. An
    exclusive lock is a WRITE line, each holder of a shared one a READ line. A file system whose lines name another
    device than ``os.stat`` gives (overlay file systems) is matched by its inode and the pid the lock file records."""
    try:
        with open("/proc/locks") as f:
            lines = [line.split() for line in f if " FLOCK " in line and " -> " not in line]
    except OSError:
        return None
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    found = []
    for fields in lines:  # "1: FLOCK  ADVISORY  WRITE <pid> <major>:<minor>:<inode> 0 EOF"
        if len(fields) > 5 and (fields[5] == device or (fields[5].endswith(f":{st.st_ino}")
                                                        and fields[4] == str(note_pid))):
            with contextlib.suppress(ValueError):
                found.append((fields[3], int(fields[4])))
    return found


def _process(pid: int) -> str:
    """``pid`` of this machine as a holder's message names it: its command line, where /proc shows it."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read().rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        command = ""
    return f"pid {pid} on {socket.gethostname()}" + (f": {command}" if command else "")


def _shared_holders(holders: list[tuple[str, int]] | None) -> str | None:
    """The holders of a shared lock, named (None when the lock is not held shared)."""
    readers = sorted({pid for kind, pid in holders or () if kind == "READ"})
    return "; ".join(map(_process, readers)) if readers else None


def lock_holder(path: Path) -> str | None:
    """Who holds the :func:`exclusive` lock on ``path`` (as a second holder's message words it), found without
    taking it (a lock taken even for a moment could refuse a run that starts then): the flock holders of this
    machine's /proc/locks (an exclusive holder as its lock file records it, the holders of a shared lock by their
    pids and command lines); where that cannot be read, the pid the lock file records when it runs on this host.
    None when no process holds it (or none this machine can see: a holder on another host of a network file
    system is not listed here)."""
    path = Path(path)
    try:
        st = os.stat(path)
        info = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # held by a run that could not write it (a full disk), or written meanwhile
        info = None
    if not isinstance(info, dict):
        info = {}
    holders = _flock_holders(path, st, info.get("pid"))
    if holders is None:
        mine = info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int)
        return _holder(path) if mine and pid_alive(info["pid"]) else None
    if not holders:
        return None
    return _shared_holders(holders) or _holder(path)


@contextlib.contextmanager
def exclusive(path: Path, what: str, wait: bool = False, note_holder: bool = True,
              shared: bool = False) -> Iterator[None]:
    """Holds an exclusive lock on ``path`` (created, with its folder) for the block. ``wait``: block until the
    holder is done (short critical sections); otherwise raise :class:`AlreadyRunning` naming ``what``, the folder
    and the holder(s). ``note_holder`` False: the lock file is left empty, for a lock in a folder others read (a
    published web site: the holder's command line is no one else's business).

    ``shared``: a shared lock (``flock`` LOCK_SH), for the readers of a folder whose writer holds it exclusively:
    any number of readers hold it together; a writer refuses them, and they refuse a writer, each naming the
    other (``what`` names the writer's work in both). A reader writes no note (readers share the file): it empties
    it, so that the note never names a writer that is gone, and the writer refused names the readers from
    /proc/locks (pid and command line). A reader whose lock file cannot be made (a folder it may only read) is
    warned about and goes on unguarded, as on a file system without locks."""
    import fcntl

    path = Path(path)
    unmade = None
    try:
        if not shared:
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd, writable = os.open(path, os.O_RDWR | os.O_CREAT, 0o666), True
        except PermissionError:  # created by another user (mode 0644 under the usual umask): flock needs no writing
            fd, writable = os.open(path, os.O_RDONLY), False
    except OSError as e:
        if not shared:
            raise
        unmade = e.strerror
    if unmade is not None:
        warnings.warn(f"{path}: the lock cannot be made ({unmade}); nothing stops {what} on {path.parent} "
                      "while this reads it", RuntimeWarning, stacklevel=3)
        yield
        return
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise AlreadyRunning(_refusal(path, what)) from None
        except OSError as e:
            if e.errno == errno.EBADF and not writable:  # NFS emulates flock with write locks: they need writing
                raise PermissionError(e.errno, f"{path}: the lock file of {what} belongs to another user and this "
                                               "file system locks only files opened for writing; make it (and its "
                                               "folder) group-writable", str(path)) from e
            if e.errno not in _NO_LOCKS:
                raise
            warnings.warn(f"{path}: the file system does not lock files ({e.strerror}); nothing stops a second "
                          f"{what} on {path.parent} at the same time", RuntimeWarning, stacklevel=3)
            yield
            return
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": time.time(),
                "command": " ".join(sys.argv)}
        try:  # a courtesy for the message a second holder gets: a full disk does not stop the work
            if not writable:  # another user's file: it keeps the last holder's note, which may name a gone one
                raise PermissionError
            if shared:  # an empty file is left as it is (its mtime too: a reader changes nothing it reads)
                if os.fstat(fd).st_size:
                    os.ftruncate(fd, 0)
            else:
                os.ftruncate(fd, 0)
                if note_holder:
                    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def _refusal(path: Path, what: str) -> str:
    """The message of :class:`AlreadyRunning` for a lock on ``path`` that another process holds: its exclusive
    holder, as its note says, or the holders of a shared lock, named from /proc/locks."""
    try:
        readers = _shared_holders(_flock_holders(path, os.stat(path), None))
    except OSError:
        readers = None
    if readers is not None:
        return (f"{what} cannot start on {path.parent} while other processes read it ({readers}); wait for them "
                f"to end, or stop them (their locks on {path} go with their processes)")
    return (f"{what} is already running on {path.parent} ({_holder(path)}); wait for it to end, or stop it (its "
            f"lock, {path}, goes with its process)")
