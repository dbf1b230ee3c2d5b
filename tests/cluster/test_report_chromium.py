"""The nightly page, built through the CLI, rendered by a real headless Chromium."""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest

from jobs.nightly_report import main as nightly_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium missing: apt-get install -y chromium")

sys.path.insert(0, str(Path(__file__).parent))  # report_data.py lives beside this file
from report_data import DATES, PERSONS, TASKS, make_runs  # noqa: E402


class _Dom(HTMLParser):
    """Collects tables (id -> row classes and first cells) and plot images from the dumped DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[tuple[str, str]]] = {}
        self.plots: list[str] = []
        self.thumbs: list[dict[str, str]] = []
        self.videos: list[str] = []
        self._table: str | None = None
        self._row: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id", "")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self._row = a.get("class", "")
        elif tag == "td" and self._row is not None and self._cell is None:
            self._cell = []
        elif tag == "img" and "plot" in a.get("class", ""):
            self.plots.append(a.get("src", ""))
        elif tag == "img" and "thumb" in a.get("class", ""):
            self.thumbs.append(a)
        elif tag == "video":
            self.videos.append(a.get("src", ""))

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None and self._table is not None and self._row is not None:
            self.tables[self._table].append((self._row, "".join(self._cell).strip()))
            self._cell = None
            self._row = None  # only the first cell of a row is recorded
        elif tag == "table":
            self._table = None


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--hide-scrollbars"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    root = tmp_path / "nightly"
    make_runs(root)
    out = tmp_path / "copied-site"
    assert nightly_report(["--reports-root", str(root), "--out", str(tmp_path / "site")]) == 0
    shutil.copytree(tmp_path / "site", out)  # self-contained: works after being copied
    index = out / "index.html"

    dom_run = _chromium(["--dump-dom", index.as_uri()], tmp_path / "profile-dom")
    assert dom_run.returncode == 0, dom_run.stderr[-2000:]
    dom = _Dom()
    dom.feed(dom_run.stdout)

    avg = dom.tables["table-average"]
    assert [c for r, c in avg if r == "task-row"] == list(TASKS)
    assert [c for r, c in avg if r == "average-row"] == ["Average"]
    for p in PERSONS:
        rows = dom.tables[f"table-person-{p}"]
        assert [c for r, c in rows if r == "task-row"] == list(TASKS)
        assert [c for r, c in rows if r == "average-row"] == ["Average"]
    assert len(dom.plots) == 4  # psnr, ssim and their masked variants over the runs
    for src in dom.plots:
        assert src.startswith("data:image/png;base64,")
        img = imageio.imread(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert img.shape[0] > 100 and img.shape[1] > 200 and img[..., :3].std() > 5
    assert [v.rsplit("-", 1)[0] for v in sorted(dom.videos)] == [f"videos/{p}/self_reenactment" for p in PERSONS]
    assert all((out / v).is_file() for v in dom.videos)
    # thumbnails are files next to the page (the videos' first frames here), loaded lazily, not inlined
    thumbs = sorted(t["src"] for t in dom.thumbs)
    assert [t.rsplit("-", 1)[0] for t in thumbs] == [f"thumbnails/{p}/self_reenactment" for p in PERSONS]
    assert all(t.get("loading") == "lazy" for t in dom.thumbs)
    for src in thumbs:
        img = imageio.imread(out / src)
        assert img.shape[:2] == (32, 64) and img[..., :3].std() > 5  # reference | render, as in the video

    shot = tmp_path / "shot.png"
    shot_run = _chromium([f"--screenshot={shot}", "--window-size=1280,1600", index.as_uri()], tmp_path / "profile-shot")
    assert shot_run.returncode == 0 and shot.is_file(), shot_run.stderr[-2000:]
    png = imageio.imread(shot)[..., :3]
    assert png.shape[:2] == (1600, 1280)
    assert png.std() > 10 and len(np.unique(png.reshape(-1, 3), axis=0)) > 100  # not a blank page
    assert DATES[-1] in dom_run.stdout
