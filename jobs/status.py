"""Show every person's training state, step and ETA (from the status files of a launch).

    python jobs/status.py [--workdir data] [--status-dir DIR] [--watch 5]
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import tyro

from cluster.status import format_status_table, read_status


@dataclass
class StatusArgs:
    workdir: Path = Path("data")
    """The launch's work directory; status files live in <workdir>/status/."""
    status_dir: Path | None = None
    """Where the status files are when the launch put them elsewhere (`launch_all --backend slurm
    --slurm.status-dir DIR`); None: <workdir>/status."""
    watch: float = 0.0
    """Refresh every N seconds until interrupted (0: print once)."""


def render(args: StatusArgs) -> str:
    folder = args.status_dir if args.status_dir is not None else args.workdir / "status"
    statuses = read_status(folder)
    if not statuses:
        return f"no status files under {folder} (nothing launched yet? a launch given --slurm.status-dir: " \
               "pass it as --status-dir)"
    return format_status_table(statuses)


def main(args: StatusArgs) -> None:
    try:
        while True:
            print(render(args), flush=True)
            if args.watch <= 0:
                return
            time.sleep(args.watch)
            print("\033[2J\033[H", end="")
    except KeyboardInterrupt:  # Ctrl-C is how --watch ends: no traceback
        print()


if __name__ == "__main__":
    main(tyro.cli(StatusArgs))
