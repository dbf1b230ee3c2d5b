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


def started_since_boot(pid: int | None = None) -> float | None:
    """Seconds from this boot of the kernel to the start of process ``pid`` (default: this process), from the
    start time ``/proc/<pid>/stat`` records in clock ticks: unlike a start time in UNIX seconds (psutil's
    ``create_time``: that plus the boot time as the system clock puts it *now*), it does not move when the clock is
    set (an NTP step, a resumed virtual machine), so it tells a process from a later one on the same pid exactly.
    None where it cannot be read (not Linux, no such process)."""
    try:
        with open(f"/proc/{os.getpid() if pid is None else pid}/stat", "rb") as f:
            stat = f.read()
        # the fields after the command name, which is in parentheses and may hold spaces and parentheses itself
        ticks = int(stat[stat.rindex(b")") + 2:].split()[19])  # field 22, starttime
        return ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
