"""jobs/status.py: every person's state from a work directory's status files, once or with --watch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import tyro

from cluster.status import StatusReporter, write_state
from jobs import status as status_job

ROOT = Path(__file__).resolve().parents[2]


def _status_cli(workdir: Path) -> subprocess.CompletedProcess:
    """`python jobs/status.py --workdir <workdir>` as documented, importing this checkout's packages."""
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "status.py"), "--workdir", str(workdir)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _rows(table: str) -> dict[str, list[str]]:
    """{person: the rest of its row} of a status table."""
    lines = table.strip().splitlines()
    assert lines[0].split()[:2] == ["PERSON", "STATE"], table
    return {cells[0]: cells[1:] for cells in (line.split() for line in lines[1:-1])}


def test_status_prints_each_persons_state_from_the_workdir(tmp_path):
    """`python jobs/status.py --workdir W` lists every person of W/status with its state, step and message."""
    status = tmp_path / "work" / "status"
    running = StatusReporter(status, "000", attempt=2, min_interval_s=0.0)
    running.set_state("running")
    running.progress(30, 100)
    write_state(status, "001", "succeeded")
    write_state(status, "002", "failed", attempt=1, message="ShardError: shard 3 changed on disk")
    write_state(tmp_path / "other" / "status", "999", "queued")  # another work directory's
    proc = _status_cli(tmp_path / "work")
    assert proc.returncode == 0, proc.stderr
    rows = _rows(proc.stdout)
    assert {p: r[0] for p, r in rows.items()} == {"000": "running", "001": "succeeded", "002": "failed"}
    assert rows["000"][1:4] == ["2", "30/100", "30"]  # attempt, step, percent
    assert " ".join(rows["002"]).endswith("ShardError: shard 3 changed on disk")
    assert proc.stdout.strip().splitlines()[-1] == "running=1  succeeded=1  failed=1"
    proc = _status_cli(tmp_path / "none")
    assert proc.returncode == 0 and proc.stdout.strip() == (
        f"no status files under {tmp_path / 'none' / 'status'} (nothing launched yet? a launch given "
        "--slurm.status-dir: pass it as --status-dir)")


def test_watch_reprints_the_table_from_the_files_every_interval(tmp_path, monkeypatch, capsys):
    """--watch N: after each N-second wait the screen is cleared and the table reprinted from the files as they are;
    Ctrl-C ends it without a traceback."""
    status = tmp_path / "status"
    write_state(status, "000", "running")
    waits: list[float] = []

    def sleep(seconds):  # the person finishes during the first wait; the user presses Ctrl-C in the second
        waits.append(seconds)
        if len(waits) == 1:
            write_state(status, "000", "succeeded")
        else:
            raise KeyboardInterrupt

    monkeypatch.setattr(status_job, "time", SimpleNamespace(sleep=sleep))
    status_job.main(tyro.cli(status_job.StatusArgs, args=["--workdir", str(tmp_path), "--watch", "2.5"]))
    assert waits == [2.5, 2.5]
    first, second = capsys.readouterr().out.split("\033[2J\033[H")[:2]
    assert _rows(first)["000"][0] == "running" and _rows(second)["000"][0] == "succeeded"


def test_status_reads_the_folder_a_slurm_launch_was_given(tmp_path):
    """`launch_all --backend slurm --slurm.status-dir DIR` writes the status files to DIR: `--status-dir DIR` reads them
    (with only --workdir, the message names the option)."""
    write_state(tmp_path / "shared" / "status", "000", "succeeded")
    args = status_job.StatusArgs(workdir=tmp_path / "work", status_dir=tmp_path / "shared" / "status")
    assert _rows(status_job.render(args))["000"][0] == "succeeded"
    assert "--status-dir" in status_job.render(status_job.StatusArgs(workdir=tmp_path / "work"))
