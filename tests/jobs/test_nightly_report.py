"""The nightly_report CLI as cron/sbatch runs it: exit codes, outputs, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cluster.report import RunResults, TaskResult

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.nightly_report", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_cli_builds_report(tmp_path: Path) -> None:
    for day, psnr in (("2025-03-01", 25.0), ("2025-03-02", 26.0)):
        RunResults(day, {"p1": {"self_reenactment": TaskResult({"psnr": psnr, "lpips": 0.1}, frames=4)}}).save(tmp_path)
    r = _cli("--reports-root", str(tmp_path))
    assert r.returncode == 0, r.stderr
    index = Path(r.stdout.strip().splitlines()[-1])
    assert index == tmp_path / "site/2025-03-02/index.html" and index.is_file()
    report = json.loads((index.parent / "report.json").read_text())
    assert [h["overall"]["psnr"] for h in report["history"]] == [25.0, 26.0]
    assert report["current"]["persons"]["p1"]["average"] == {"psnr": 26.0, "lpips": 0.1}


def test_cli_errors_name_the_file(tmp_path: Path) -> None:
    r = _cli("--reports-root", str(tmp_path))
    assert r.returncode == 2 and "no nightly runs found" in r.stderr and str(tmp_path / "runs") in r.stderr
    bad = tmp_path / "runs/2025-03-03/results.json"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"schema_version": 1, "run_date": "2025-03-03", "persons": {}}')
    r = _cli("--reports-root", str(tmp_path))
    assert r.returncode == 2 and str(bad) in r.stderr and "non-empty" in r.stderr
