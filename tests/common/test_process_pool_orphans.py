"""common/process_pool.py: a data stage's process killed outright (SIGKILL, the OOM killer) leaves no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from common import process_pool

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads the process table in /proc")

#: An item that runs far longer than the test: a worker that finishes it outlived its parent.
_ITEMS = textwrap.dedent("""
    import os, time

    def slow(item):
        open(os.path.join(os.environ["ORPHANS_MARKS"], f"started-{item}"), "w").close()
        time.sleep(120)
        open(os.path.join(os.environ["ORPHANS_MARKS"], f"finished-{item}"), "w").close()
    """)

_STAGE = textwrap.dedent("""
    import os
    from common import process_pool
    import orphan_items
    process_pool._init_worker = os.getpid  # not torch's thread setting: nothing here computes
    process_pool.map_tolerant(orphan_items.slow, [1, 2, 3], 2, lambda item, result, error: None)
    """)


def _living_in_group(pgid: int) -> list[str]:
    """The processes of process group `pgid` that have not exited (a zombie has: its new parent reaps it)."""
    living = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # ended meanwhile
            continue
        state, _, group = text[text.rindex(")") + 2:].split()[:3]
        if int(group) == pgid and state not in "ZX":
            living.append(f"{stat.parent.name} [{state}] {cmdline[:160]}")
    return living


def test_a_stage_killed_outright_leaves_no_worker_fork_server_or_resource_tracker(tmp_path):
    """The workers (forked from the fork server) ran on with parent pid 1 and finished their items into the output
    folder; the fork server and the resource tracker stayed with them (~1.5 GB, seen after 69 s). Now the workers end
    with the process that made their pool, and the server and the tracker with them."""
    marks = tmp_path / "marks"
    marks.mkdir()
    (tmp_path / "orphan_items.py").write_text(_ITEMS)
    repo = Path(process_pool.__file__).parents[1]
    env = {**os.environ, "ORPHANS_MARKS": str(marks),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(repo), os.environ.get("PYTHONPATH", "")])}
    with open(tmp_path / "stage.log", "wb") as log:
        stage = subprocess.Popen([sys.executable, "-c", _STAGE], cwd=repo, env=env, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120  # the fork server imports torch first
        while len(list(marks.glob("started-*"))) < 2:
            assert stage.poll() is None, (tmp_path / "stage.log").read_text()
            assert time.monotonic() < deadline, "the workers never started: " + (tmp_path / "stage.log").read_text()
            time.sleep(0.05)
        os.kill(stage.pid, signal.SIGKILL)
        stage.wait()
        deadline = time.monotonic() + 5
        while (living := _living_in_group(stage.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert living == [], "left running after the stage's process was killed:\n" + "\n".join(living)
        assert not list(marks.glob("finished-*"))
    finally:
        try:
            os.killpg(stage.pid, signal.SIGKILL)  # what the old code left behind
        except ProcessLookupError:
            pass
