"""What launch_all prints: worker output into files, one progress line, the final summary."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from cluster.person_job import JobResult
from cluster.report import RunResults, TaskResult
from cluster.status import PersonStatus, write_state
from jobs._console import TrainingProgress, final_summary, progress_line


def test_output_to_catches_python_c_and_child_output_and_restores(tmp_path):
    """Run in a fresh interpreter whose stdout is a pipe: everything printed inside the block
    (Python, a child process writing to the inherited descriptors) lands in the file, and
    printing works as before afterwards."""
    log = tmp_path / "logs" / "000.log"
    code = f"""
import os, subprocess, sys
from jobs._console import output_to
print("before")
with output_to({str(log)!r}):
    print("python stdout")
    print("python stderr", file=sys.stderr)
    subprocess.run(["sh", "-c", "echo child; echo child-err >&2"])
print("after")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["before", "after"] and proc.stderr == ""
    text = log.read_text()
    assert all(s in text for s in ("python stdout", "python stderr", "child", "child-err"))
    assert text.startswith("==== ")


def test_progress_line_counts_this_run_only_with_steps_and_eta():
    now = time.time()
    statuses = [
        PersonStatus("000", "succeeded", step=10, total_steps=10, updated_at=now - 5),
        PersonStatus("001", "running", step=4, total_steps=10, updated_at=now, rate_step0=0, rate_t0=now - 4),
        PersonStatus("002", "succeeded", step=10, total_steps=10, updated_at=now - 1000),  # an earlier run's
        PersonStatus("003", "failed", step=2, total_steps=10, updated_at=now),
    ]
    line = progress_line(statuses, ["000", "001", "002", "003"], since=now - 60, now=now)
    # 002 is queued (its file is older than this stage); it will train as many steps as the others
    assert line == "training 4 persons: 1 done, 1 running, 1 queued, 1 failed; steps 14/30, ETA 16s"
    assert progress_line([], ["000"], since=now) == "training 1 person: 1 queued"


def test_training_progress_prints_one_line_per_change_off_a_terminal(tmp_path):
    out = io.StringIO()
    with TrainingProgress(tmp_path, ["000"], interval_s=0.05, stream=out):
        write_state(tmp_path, "000", "running", attempt=1)
        time.sleep(0.3)
    lines = out.getvalue().splitlines()
    assert lines[0] == "training 1 person: 1 running" and lines[-1] == lines[0]
    assert len(set(lines)) == 1 and "\r" not in out.getvalue()  # no repeats, no in-place rewrites in a log


def test_a_display_error_never_reaches_the_training(tmp_path, monkeypatch):
    """An error while showing progress (here every refresh raises) neither ends the progress thread's
    refreshes nor escapes the block: the results of the training inside it are returned."""
    import jobs._console as console

    def broken(*args):
        raise TypeError("'>=' not supported between instances of 'str' and 'float'")

    monkeypatch.setattr(console, "progress_line", broken)
    progress = TrainingProgress(tmp_path, ["000"], interval_s=0.02, stream=io.StringIO())
    with progress:
        time.sleep(0.1)
        result = "results of hours of training"
    assert result and isinstance(progress.error, TypeError) and not progress._thread.is_alive()


def test_final_summary_per_person_means_report_and_logs(tmp_path):
    night = RunResults("2025-03-01", {
        "000": {"self_reenactment": TaskResult({"psnr": 24.0, "ssim": 0.8, "lpips": 0.1}, frames=4)},
        "001": {"self_reenactment": TaskResult({"psnr": 26.0, "ssim": 0.9, "lpips": 0.05}, frames=4)},
    })
    path = night.save(tmp_path)
    index = tmp_path / "site" / "2025-03-01" / "index.html"
    evaluation = SimpleNamespace(results_path=path, report_index=index, failed={}, reused=["001"])
    results = [JobResult("000", True, 1, result={"steps": 600}), JobResult("001", True, 1, result={"steps": 600}),
               JobResult("002", False, 2, error="ShardError: shard 3 changed on disk\ntraceback...")]
    text = final_summary(results, evaluation, tmp_path / "logs")
    assert "  000  trained (600 steps), held-out PSNR 24.00 / SSIM 0.800 / LPIPS 0.100" in text
    assert "001  trained (600 steps), held-out PSNR 26.00 / SSIM 0.900 / LPIPS 0.050 (up to date" in text
    assert "002  training FAILED: ShardError: shard 3 changed on disk" in text and "traceback" not in text
    assert "mean self-reenactment: PSNR 25.00 / SSIM 0.850 / LPIPS 0.075" in text
    assert f"report: {index.resolve()}" in text and f"xdg-open {index.resolve()}" in text
    assert f"worker logs: {(tmp_path / 'logs').resolve()}/<person>.log" in text
    assert "worker logs" not in final_summary(results, None, None)
