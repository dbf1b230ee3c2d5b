"""Two builds of one night's report at once (the evaluation's own build at its end beside the nightly report, or two
evaluations of one night finishing together: a rerun of some persons beside the nightly one) publish into the same
folder. Each pruned the media its own page does not link, and the one that read the older results.json could
publish last: the page showed the older numbers, and the newer build's thumbnails and videos were deleted under it.
Builds of one folder now take turns, each reading the night when its turn comes."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

from cluster.report import ReportConfig, RunResults, TaskResult, build_report
from cluster.report import build as build_module
from cluster.report.schema import run_dir

NIGHT = "2025-03-01"


def _save_night(root: Path, psnr: float, thumbnail: bytes) -> None:
    folder = run_dir(root, NIGHT)
    (folder / "thumbnails" / "p017").mkdir(parents=True, exist_ok=True)
    (folder / "thumbnails" / "p017" / "self_reenactment.png").write_bytes(thumbnail)
    task = TaskResult({"psnr": psnr}, frames=1, thumbnail="thumbnails/p017/self_reenactment.png")
    RunResults(NIGHT, {"p017": {"self_reenactment": task}}, {"checkpoint": f"psnr {psnr}"}).save(root)


def test_the_last_build_publishes_the_newest_night_with_all_its_media(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "reports"
    _save_night(root, 20.0, b"thumbnail of the first evaluation")
    first_read, go_on = threading.Event(), threading.Event()
    summarize = build_module.summarize

    def paused(run):  # the first build, having read the night, is slow (plots, copies) before it publishes
        if threading.current_thread().name == "first":
            first_read.set()
            assert go_on.wait(30)
        return summarize(run)

    monkeypatch.setattr(build_module, "summarize", paused)
    errors = []

    def build() -> None:
        try:
            build_report(ReportConfig(root, NIGHT))
        except BaseException as e:  # noqa: BLE001 - said by the test
            errors.append(e)

    first = threading.Thread(target=build, name="first")
    first.start()
    assert first_read.wait(30)
    _save_night(root, 30.0, b"thumbnail of the second evaluation")  # a second evaluation of the night saved
    second = threading.Thread(target=build, name="second")
    second.start()
    second.join(2)  # before: it published at once, and the first build published over it after
    go_on.set()
    first.join(30)
    second.join(30)
    assert not first.is_alive() and not second.is_alive() and errors == []
    out = root / "site" / NIGHT
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["checkpoint"] == "psnr 30.0"  # the newest night, not the one read first
    linked = re.findall(r'src="(thumbnails/[^"]+)"', (out / "index.html").read_text())
    assert len(linked) == 1, "the page links its thumbnail"
    for rel in linked:
        assert (out / rel).read_bytes() == b"thumbnail of the second evaluation", rel
    assert (out / build_module.REPORT_LOCK).read_bytes() == b""  # the published folder names no command line
