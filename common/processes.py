"""Whether a pid still names a live process, and where a pid means the same process: shared by the atomic writes'
leftover removal (common.io), the pool workers that end with their parent (common.process_pool) and the status
files' liveness check (cluster.status)."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists in this pid namespace (another user's counts: it exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pid_namespace() -> str | None:
    """This process's pid namespace (``pid:[<inode>]``; a container sharing the host's name sees other pids), or
    None where it cannot be read (not Linux)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
