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


def _nights(root: Path, psnrs: dict[str, float], video: bool = False) -> None:
    """One results.json per night (person p1, self-reenactment PSNR as given); with `video`, the newest
    night has a (stand-in) comparison video and thumbnail."""
    for day, psnr in psnrs.items():
        files = {}
        if video and day == max(psnrs):
            files = {"video": "videos/p1/self_reenactment.mp4", "thumbnail": "thumbs/p1/self_reenactment.png"}
            for rel in files.values():
                (root / "runs" / day / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / "runs" / day / rel).write_bytes(b"stand-in " + rel.encode())
        RunResults(day, {"p1": {"self_reenactment": TaskResult({"psnr": psnr}, frames=4, **files)}}).save(root)


def test_cli_max_history_keeps_that_many_runs_in_the_trends(tmp_path: Path) -> None:
    """--max-history N: the trend data holds the newest N runs up to the reported one; below 1 is refused."""
    _nights(tmp_path, {"2025-03-01": 25.0, "2025-03-02": 26.0, "2025-03-03": 27.0, "2025-03-04": 28.0})
    r = _cli("--reports-root", str(tmp_path), "--max-history", "2")
    assert r.returncode == 0, r.stderr
    index = Path(r.stdout.strip().splitlines()[-1])
    report = json.loads((index.parent / "report.json").read_text())
    assert [(h["run_date"], h["overall"]["psnr"]) for h in report["history"]] == [("2025-03-03", 27.0),
                                                                                 ("2025-03-04", 28.0)]
    assert "from 2 nightly run(s)" in index.read_text()
    for bad in ("0", "-1"):
        r = _cli("--reports-root", str(tmp_path), "--max-history", bad)
        assert r.returncode == 2 and "--max-history must be at least 1" in r.stderr


def test_cli_run_date_reports_that_run_in_its_own_folder(tmp_path: Path) -> None:
    """--run-date D: the report of night D (with only the history up to D) in <reports-root>/site/D."""
    _nights(tmp_path, {"2025-03-01": 25.0, "2025-03-02": 26.0, "2025-03-03": 27.0})
    r = _cli("--reports-root", str(tmp_path), "--run-date", "2025-03-02")
    assert r.returncode == 0, r.stderr
    index = Path(r.stdout.strip().splitlines()[-1])
    assert index == tmp_path / "site/2025-03-02/index.html" and index.is_file()
    assert [p.name for p in (tmp_path / "site").iterdir()] == ["2025-03-02"]
    report = json.loads((index.parent / "report.json").read_text())
    assert report["run_date"] == "2025-03-02" and report["current"]["average"]["overall"]["psnr"] == 26.0
    assert [h["run_date"] for h in report["history"]] == ["2025-03-01", "2025-03-02"]


def test_cli_no_videos_writes_the_page_without_videos(tmp_path: Path) -> None:
    """--no-videos: no videos/ folder next to the page and no <video> in it; without the flag both are there."""
    _nights(tmp_path, {"2025-03-01": 25.0}, video=True)
    r = _cli("--reports-root", str(tmp_path), "--no-videos")
    assert r.returncode == 0, r.stderr
    index = Path(r.stdout.strip().splitlines()[-1])
    assert index == tmp_path / "site/2025-03-01/index.html"
    assert not (index.parent / "videos").exists() and "<video" not in index.read_text()
    (thumb,) = (index.parent / "thumbnails/p1").glob("self_reenactment-*.png")  # the thumbnail still is there
    assert thumb.read_bytes() == b"stand-in thumbs/p1/self_reenactment.png"
    assert f'src="thumbnails/p1/{thumb.name}"' in index.read_text()
    with_videos = tmp_path / "with-videos"
    r = _cli("--reports-root", str(tmp_path), "--out", str(with_videos))
    assert r.returncode == 0, r.stderr
    (video,) = (with_videos / "videos/p1").glob("self_reenactment-*.mp4")
    assert video.read_bytes() == b"stand-in videos/p1/self_reenactment.mp4"
    html = (with_videos / "index.html").read_text()
    assert f'<video controls preload="metadata" src="videos/p1/{video.name}">' in html


def test_cli_names_the_night_as_render_eval_does(tmp_path: Path) -> None:
    """The night was --date here and --run-date in render_eval (two names for one thing): --run-date in both; --date
    is refused, and so is a run date that is not YYYY-MM-DD, naming the flag before anything is read."""
    _nights(tmp_path, {"2025-03-01": 25.0})
    r = _cli("--reports-root", str(tmp_path), "--date", "2025-03-01")
    assert r.returncode == 2 and "unrecognized arguments: --date" in r.stderr, r.stderr
    for bad in ("20250301", "2025-3-1", "yesterday"):
        r = _cli("--reports-root", str(tmp_path), "--run-date", bad)
        assert r.returncode == 2 and f"--run-date: run date {bad!r} is not YYYY-MM-DD" in r.stderr, r.stderr
    assert not (tmp_path / "site").exists()
    from jobs.nightly_report import parse_args

    assert parse_args(["--reports-root", str(tmp_path), "--run-date", "2025-03-01"]).run_date == "2025-03-01"
