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


def lock_holder(path: Path) -> str | None:
    """Who holds the :func:`exclusive` lock on ``path`` (as a second holder's message words it), found without
    taking it (a lock taken even for a moment could refuse a run that starts then): the flock holders of this
    machine's /proc/locks; where that cannot be read, the pid the lock file records when it runs on this host.
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
    try:
        with open("/proc/locks") as f:
            holders = [line.split() for line in f if " FLOCK " in line]
    except OSError:
        mine = info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int)
        return _holder(path) if mine and pid_alive(info["pid"]) else None
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pid = str(info.get("pid"))
    for fields in holders:  # "1: FLOCK ADVISORY WRITE <pid> <major>:<minor>:<inode> 0 EOF"
        if len(fields) > 5 and (fields[5] == device or (fields[5].endswith(f":{st.st_ino}") and fields[4] == pid)):
            return _holder(path)
    return None


@contextlib.contextmanager
def exclusive(path: Path, what: str, wait: bool = False, note_holder: bool = True) -> Iterator[None]:
    """Holds an exclusive lock on ``path`` (created, with its folder) for the block. ``wait``: block until the
    holder is done (short critical sections); otherwise raise :class:`AlreadyRunning` naming ``what``, the folder
    and the holder. ``note_holder`` False: the lock file is left empty, for a lock in a folder others read (a
    published web site: the holder's command line is no one else's business)."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, writable = os.open(path, os.O_RDWR | os.O_CREAT, 0o666), True
    except PermissionError:  # created by another user (mode 0644 under the usual umask): flock needs no writing
        fd, writable = os.open(path, os.O_RDONLY), False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise AlreadyRunning(f"{what} is already running on {path.parent} ({_holder(path)}); wait for it to "
                                 f"end, or stop it (its lock, {path}, goes with its process)") from None
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
            os.ftruncate(fd, 0)
            if note_holder:
                os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the lock
