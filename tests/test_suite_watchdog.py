"""The suite's watchdog (tests/suite_watchdog.py) on a nested pytest run, in one process and in the suite's own
pytest-xdist workers, with a test that ignores pytest-timeout's alarm, as code stuck in C does."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

HERE = Path(__file__).resolve().parent
#: The options the suite runs with (pyproject's addopts: two xdist workers, loadgroup, no worker restarts).
SUITE_OPTIONS = shlex.split(re.search(r'^addopts = "(.*)"$', (HERE.parent / "pyproject.toml").read_text(),
                                      re.MULTILINE).group(1))

STUCK = textwrap.dedent("""
    import signal, subprocess, sys, time
    from pathlib import Path
    import pytest

    @pytest.mark.timeout(1)
    def test_stuck(tmp_path):
        signal.signal(signal.SIGALRM, signal.SIG_IGN)  # pytest-timeout's alarm never lands
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        (Path(__file__).parent / "child.pid").write_text(str(child.pid))
        time.sleep(600)

    def test_after():
        pass
""")


@pytest.mark.parametrize("workers", ["0", "1", "suite"])
def test_a_test_stuck_past_its_timeout_fails_by_name(tmp_path: Path, workers: str) -> None:
    """The run ends, failed, naming the test, in one process, in one worker (xdist's default scheduling runs the
    test after it on a new worker) and with the suite's options: under --dist loadgroup pytest-xdist 3.8 hangs or
    fails internally when it replaces a crashed worker (pytest-dev/pytest-xdist#1323, #1189), so the suite
    restarts none (--max-worker-restart 0) and ends after the crash."""
    (tmp_path / "test_stuck.py").write_text(STUCK)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    started = time.monotonic()
    options = SUITE_OPTIONS if workers == "suite" else ["-n", workers]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-c", str(tmp_path / "pytest.ini"), "-p", "suite_watchdog",
                           "-p", "no:cacheprovider", "-o", "watchdog_grace=3", *options, "-rf", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert time.monotonic() - started < 120, out[-3000:]  # not the test's 600 s
    assert "watchdog: test_stuck.py::test_stuck still running 4 s after it started" in out, out[-3000:]
    assert re.search(r'File ".*test_stuck.py", line \d+ in test_stuck', out), out[-3000:]  # where it was stuck
    child = int((tmp_path / "child.pid").read_text())
    assert f"killing child {child}" in out and not _alive(child), out[-3000:]
    if workers == "1":  # xdist reports the test and runs the one after it on a new worker
        assert "crashed while running 'test_stuck.py::test_stuck'" in out, out[-3000:]
        assert "1 failed, 1 passed" in out, out[-3000:]
    if workers == "suite":
        assert "crashed while running 'test_stuck.py::test_stuck'" in out, out[-3000:]
        assert "worker restarting disabled" in out, out[-3000:]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
