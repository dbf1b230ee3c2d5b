"""launch_all on a work directory that is read-only or runs full: a clear error, a summary, a clean re-run.

The file systems are real: small tmpfs mounts (needs root, as the CI machine and this one give;
skipped otherwise), unmounted at the end.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from pipeline_helpers import TINY_DATA, TINY_TRAIN, random_tiny_base, run_launch_all


def _mount(args: list[str]) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def small_fs(tmp_path):
    """A function mounting a tmpfs of a given size (and mode) at a fresh folder; all unmounted after."""
    mounts: list[Path] = []

    def mount(size: str, read_only: bool = False) -> Path:
        point = tmp_path / f"fs{len(mounts)}"
        point.mkdir()
        try:
            _mount(["-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)])
        except (OSError, subprocess.CalledProcessError) as e:
            pytest.skip(f"cannot mount a tmpfs here: {getattr(e, 'stderr', e)}")
        mounts.append(point)
        if read_only:
            _mount(["-o", "remount,ro", str(point)])
        return point

    yield mount
    for point in reversed(mounts):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_unusable_work_directory_is_refused_up_front(small_fs):
    ro = small_fs("1m", read_only=True)
    proc = run_launch_all(["--workdir", str(ro / "work"), "--synthetic.persons", "2", *TINY_DATA], timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"work directory {ro / 'work'} is not writable" in proc.stderr and "Read-only file system" in proc.stderr
    assert "Traceback" not in proc.stderr

    tiny = small_fs("1m")
    proc = run_launch_all(["--workdir", str(tiny / "work"), "--synthetic.persons", "2", *TINY_DATA], timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "has 0.00 GiB free, less than the 1 GiB asked for (--min-free-gb)" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_full_disk_mid_run_reports_every_person_and_the_rerun_is_clean(small_fs, tmp_path):
    """The disk fills while the synthetic data is written: no traceback, every person listed as
    failed with the I/O error, the summary lands in the fallback folder; after freeing space
    (the tmpfs grows) the same command trains everything."""
    fs = small_fs("300k")
    work = fs / "work"
    base = random_tiny_base(tmp_path / "base")
    fallback_tmp = tmp_path / "tmp"
    fallback_tmp.mkdir()
    args = ["--workdir", str(work), "--synthetic.persons", "2", *TINY_DATA, *TINY_TRAIN, "--min-free-gb", "0",
            "--backend", "local", "--no-evaluate", "--max-retries", "0", "--train.base-model", str(base)]
    proc = run_launch_all(args, env={"TMPDIR": str(fallback_tmp)})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "Traceback" not in out
    assert "the data stage stopped on an I/O error" in proc.stderr and "No space left on device" in proc.stderr
    # The summary lands in the work directory when the failed stage's clean-up freed room for it, else in the
    # fallback folder (which, depends on when the other data worker stops; test_cluster_local checks the fallback).
    summaries = [*(fallback_tmp / "diffusion-avatars").glob("summary-*.json"), *(work / "runs").glob("summary.json")]
    assert len(summaries) == 1, out
    summary = json.loads(summaries[0].read_text())
    assert summary["exit_code"] == 1
    assert {r["person"]: r["ok"] for r in summary["results"]} == {"000": False, "001": False}
    # every I/O error names the file it could not write
    assert all(re.search(rf"No space left on device: '{re.escape(str(fs))}/", r["error"]) for r in summary["results"])
    assert f"summary: {summaries[0]}" in proc.stdout

    _mount(["-o", "remount,size=64m", str(fs)])  # space freed
    proc = run_launch_all(args, env={"TMPDIR": str(fallback_tmp)})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    summary = json.loads((work / "runs" / "summary.json").read_text())
    assert {r["person"]: (r["ok"], r["result"]["steps"]) for r in summary["results"]} == \
        {"000": (True, 3), "001": (True, 3)}
