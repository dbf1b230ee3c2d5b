"""Show every person's training state, step and ETA (from the status files of a launch).

    python jobs/status.py [--workdir data] [--status-dir DIR] [--watch 5] [--stale-after 3600]

A person whose status file says ``running`` but whose process is gone (killed: it wrote no verdict) is shown
as ``lost``; where its process cannot be checked from here (it ran on another machine or in another container),
one whose file has not been updated for --stale-after seconds is shown as ``stale``. A person still ``queued`` by a
launch that is gone (its driver killed: SIGKILL, the OOM killer, a lost node) is shown as ``lost`` where its job
died with the driver (local and Ray backends: it never starts) and the driver can be checked from here; a SLURM job
outlives its driver and stays ``queued``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

from cluster.status import STALE_AFTER_S, check_running, format_status_table, read_status


@dataclass
class StatusArgs:
    workdir: Path = Path("data")
    """The launch's work directory; status files live in <workdir>/status/."""
    status_dir: Path | None = None
    """Where the status files are when the launch put them elsewhere (`launch_all --backend slurm
    --slurm.status-dir DIR`); None: <workdir>/status."""
    watch: float = 0.0
    """Refresh every N seconds until interrupted (0: print once)."""
    stale_after: float = STALE_AFTER_S
    """Seconds without an update after which a running person whose process cannot be checked from here
    (another machine or container) is shown as `stale`. A live training reports every step; its longest
    silences (loading and compiling before the first step, a validation, a checkpoint) stay well under the
    default hour."""


def render(args: StatusArgs) -> str:
    folder = args.status_dir if args.status_dir is not None else args.workdir / "status"
    statuses = read_status(folder)
    if not statuses:
        return f"no status files under {folder} (nothing launched yet? a launch given --slurm.status-dir: " \
               "pass it as --status-dir)"
    return format_status_table(check_running(statuses, stale_after_s=args.stale_after))


def main(args: StatusArgs) -> int:
    if not args.stale_after > 0:  # also NaN
        print(f"error: --stale-after must be a positive number of seconds, got {args.stale_after}", file=sys.stderr)
        return 2
    try:
        while True:
            print(render(args), flush=True)
            if args.watch <= 0:
                return 0
            time.sleep(args.watch)
            print("\033[2J\033[H", end="")
    except KeyboardInterrupt:  # Ctrl-C is how --watch ends: no traceback
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(StatusArgs)))
