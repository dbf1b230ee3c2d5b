"""The console's progress line counts a person whose launch or process is gone as lost, as jobs/status.py shows it,
not as waiting or running."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from cluster import status as cs
from cluster.status import PersonStatus
from jobs._console import progress_line


def _dead_pid() -> tuple[int, float]:
    """A pid of this pid namespace whose process has ended (reaped), with its start time."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    created = psutil.Process(proc.pid).create_time()
    proc.kill()
    proc.wait()
    return proc.pid, created


def test_the_progress_line_counts_a_lost_person():
    """The console counts a queued person of a gone launch (and a running one whose process is gone) as lost,
    not as waiting."""
    dead, dead_created = _dead_pid()
    now = time.time()
    statuses = [PersonStatus("000", "queued", updated_at=now, queuer_pid=dead, queuer_pid_space=cs.pid_space(),
                             queuer_started_at=dead_created, dies_with_queuer=True),
                PersonStatus("001", "running", updated_at=now, pid=dead, pid_space=cs.pid_space()),
                PersonStatus("002", "queued", updated_at=now)]
    assert progress_line(statuses, ["000", "001", "002"], since=now - 60, now=now) == \
        "training 3 persons: 1 queued, 2 lost"
