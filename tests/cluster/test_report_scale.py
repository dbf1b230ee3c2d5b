"""The report at many nights and persons: it reads only the nights its trends show (the past ones without their
per-frame values), publishes the thumbnails as files next to the page (not inlined), keeps the evaluation's
thumbnails small, and draws the spread over many persons as bands (not a line and a legend entry each)."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cluster.report import ReportConfig, RunResults, TaskResult, build_report
from cluster.report import build as build_module
from cluster.report import plots as plots_module
from cluster.report.aggregate import summarize

NIGHTS = tuple(f"2025-04-{d:02d}" for d in range(1, 8))


def _task(psnr: float, thumbnail: str | None = None) -> TaskResult:
    return TaskResult(metrics={"psnr": psnr}, per_frame={"psnr": [psnr, psnr + 1]}, frames=2, thumbnail=thumbnail)


def _night(root: Path, night: str, persons: dict[str, float], thumbnails: dict[str, bytes] | None = None) -> Path:
    """One night: each person's self_reenactment at the given PSNR; ``thumbnails``: person -> the bytes of its
    thumbnail file (``thumbnails/<person>/self_reenactment.png``)."""
    entries = {}
    for person, psnr in persons.items():
        thumb = None
        if thumbnails and person in thumbnails:
            thumb = f"thumbnails/{person}/self_reenactment.png"
            (root / "runs" / night / thumb).parent.mkdir(parents=True, exist_ok=True)
            (root / "runs" / night / thumb).write_bytes(thumbnails[person])
        entries[person] = {"self_reenactment": _task(psnr, thumb)}
    return RunResults(night, entries).save(root)


def test_only_the_newest_max_history_nights_are_read_and_only_the_reported_one_with_per_frame_values(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every night ever written was read, per-frame values and all, and all but the newest --max-history dropped
    after: a year of 300-person nights took an hour and ~80 GB, twice a night. Now the nights are read newest first
    until --max-history have read (a night that does not read is named and the one before it read in its place),
    and only the reported night keeps its per-frame values."""
    paths = [_night(tmp_path, night, {"p017": 20.0 + i, "p042": 30.0 + i}) for i, night in enumerate(NIGHTS)]
    paths[3].write_text("{broken")  # inside the window: the night before it fills its place
    paths[0].write_text("{broken")  # outside the window: never opened, not named
    loaded: list[tuple[str, bool]] = []
    load = RunResults.load.__func__

    def spy(cls, path, salvage=False, **kwargs):
        loaded.append((Path(path).parent.name, kwargs.get("per_frame", True)))
        return load(cls, path, salvage, **kwargs)
    monkeypatch.setattr(RunResults, "load", classmethod(spy))
    summarised: list[str] = []
    load_summary = RunResults.load_summary.__func__

    def summary_spy(cls, path):
        summarised.append(Path(path).parent.name)
        return load_summary(cls, path)
    monkeypatch.setattr(RunResults, "load_summary", classmethod(summary_spy))

    index = build_report(ReportConfig(tmp_path, NIGHTS[5], max_history=3, copy_videos=False))
    # the past nights from their summaries (test_report_summaries.py), the broken one's not matching its file
    assert summarised == [NIGHTS[4], NIGHTS[3], NIGHTS[2]]
    assert loaded == [(NIGHTS[5], True), (NIGHTS[3], False)]
    report = json.loads((index.parent / "report.json").read_text())
    assert [h["run_date"] for h in report["history"]] == [NIGHTS[2], NIGHTS[4], NIGHTS[5]]
    assert [h["overall"]["psnr"] for h in report["history"]] == [27.0, 29.0, 30.0]
    (ignored,) = report["ignored_runs"]
    assert str(paths[3]) in ignored
    assert report["per_frame"]["p017"]["self_reenactment"] == {"psnr": [25.0, 26.0]}  # the reported night's

    runs, _ = build_module.load_history(tmp_path, NIGHTS[5], 3)
    assert [r.run_date for r in runs] == [NIGHTS[2], NIGHTS[4], NIGHTS[5]]
    assert [r.persons["p017"]["self_reenactment"].per_frame for r in runs] == [{}, {}, {"psnr": [25.0, 26.0]}]
    with pytest.raises(ValueError, match="max_history must be at least 1"):
        build_module.load_history(tmp_path, NIGHTS[5], 0)


def test_a_past_nights_malformed_per_frame_value_fails_its_task_though_the_values_are_not_kept(
        tmp_path: Path) -> None:
    """Past nights are read without their per-frame values, but checked as before: a malformed one fails that
    task in the trend as on the night's own page (the same numbers in every report)."""
    paths = [_night(tmp_path, night, {"p017": 20.0, "p042": 30.0}) for night in NIGHTS[:2]]
    obj = json.loads(paths[0].read_text())
    obj["persons"]["p017"]["self_reenactment"]["per_frame"]["psnr"] = [20.0, "n/a"]
    paths[0].write_text(json.dumps(obj))
    own = RunResults.load(paths[0], salvage=True)
    past = RunResults.load(paths[0], salvage=True, per_frame=False)
    assert own.persons["p017"]["self_reenactment"].failed and past.persons["p017"]["self_reenactment"].failed
    assert own.damaged == past.damaged and "'per_frame' 'psnr' item 1" in past.damaged[0]
    assert summarize(own).overall == summarize(past).overall == {"psnr": 30.0}
    ok = RunResults.load(paths[1], per_frame=False).persons["p017"]["self_reenactment"]
    assert ok.per_frame == {} and ok.metrics == {"psnr": 20.0} and ok.frames == 2


def _thumb_srcs(html: str) -> dict[str, str]:
    return dict(re.findall(r'<img class="thumb" loading="lazy" alt="(\S+) self_reenactment thumbnail" src="([^"]+)">',
                           html))


def test_thumbnails_are_files_next_to_the_page_named_by_content_not_inlined(tmp_path: Path) -> None:
    """The thumbnails were inlined as base64: 10 persons x 5 tasks of the evaluation's thumbnails made a page of
    243 MB (300 persons: gigabytes). Now they are copied to thumbnails/<person>/<task>-<sha256 prefix><suffix> and
    loaded lazily; a page published again with other thumbnails names them anew and removes the old ones."""
    _night(tmp_path, NIGHTS[0], {"p017": 20.0, "p042": 30.0},
           thumbnails={"p017": b"\x89PNG p017 " + bytes(100_000), "p042": b"\x89PNG p042"})
    index = build_report(ReportConfig(tmp_path, NIGHTS[0]))
    out = index.parent
    html = index.read_text()
    srcs = _thumb_srcs(html)
    assert sorted(srcs) == ["p017", "p042"]
    for person, src in srcs.items():
        assert re.fullmatch(rf"thumbnails/{person}/self_reenactment-[0-9a-f]{{16}}\.png", src)
        assert (out / src).read_bytes().startswith(b"\x89PNG " + person.encode())
        assert (out / src).stat().st_mode & 0o444 == 0o444  # readable by a web server user
    assert "base64" not in html.split('id="trends"')[1].split("</section>", 1)[1]  # only the plots are inlined
    assert index.stat().st_size < 50_000

    old = out / srcs["p017"]
    (tmp_path / "runs" / NIGHTS[0] / "thumbnails/p017/self_reenactment.png").write_bytes(b"\x89PNG re-evaluated")
    html = build_report(ReportConfig(tmp_path, NIGHTS[0])).read_text()
    new = _thumb_srcs(html)
    assert new["p042"] == srcs["p042"] and new["p017"] != srcs["p017"]
    assert (out / new["p017"]).read_bytes() == b"\x89PNG re-evaluated" and not old.exists()
    assert sorted(p.relative_to(out).as_posix() for p in (out / "thumbnails").rglob("*.*")) == sorted(new.values())


def test_a_thumbnail_of_an_unknown_suffix_is_published_as_png(tmp_path: Path) -> None:
    """A thumbnail named other than .png/.jpg/.jpeg/.webp (a path in results.json) is published as .png, as its
    data URI was image/png: nothing named .html or .svg lands next to the page."""
    run = RunResults(NIGHTS[0], {"p017": {"self_reenactment": _task(20.0, "thumbnails/p017/t.SVG")},
                                 "p042": {"self_reenactment": _task(21.0, "thumbnails/p042/t.JPG")}})
    for person in ("p017", "p042"):
        folder = tmp_path / "runs" / NIGHTS[0] / "thumbnails" / person
        folder.mkdir(parents=True)
        (folder / ("t.SVG" if person == "p017" else "t.JPG")).write_bytes(b"image")
    run.save(tmp_path)
    srcs = _thumb_srcs(build_report(ReportConfig(tmp_path, copy_videos=False)).read_text())
    assert srcs["p017"].endswith(".png") and srcs["p042"].endswith(".jpg")


@pytest.mark.parametrize(("size", "expected"), [(64, (768, 256)), (48, (576, 192)), (256, (1536, 512)),
                                                (512, (1536, 512))])
def test_the_evaluations_thumbnail_is_at_most_1536_px_wide(size: int, expected: tuple[int, int]) -> None:
    """comparison_strip enlarged 6 frames 2x whatever their size: 6144x2048 px at 512 px (megabytes a thumbnail,
    shown 160 px high). Now small frames are enlarged as before as far as the strip stays within 1536 px, and a
    wider strip is scaled down to it."""
    from cluster.eval_driver.person import comparison_strip, strip_picks

    rng = np.random.default_rng(0)
    reference = rng.random((8, size, size, 3), dtype=np.float32)
    renders = [np.clip(r + 0.1, 0, 1) for r in reference]
    picks = strip_picks(len(renders))
    assert picks == [0, 1, 3, 4, 6, 7]
    strip = Image.open(io.BytesIO(comparison_strip([reference[i] for i in picks], [renders[i] for i in picks])))
    assert strip.size == expected
    if size == 64:  # nearest 2x: the top-left pixel is the first reference frame's
        assert np.array_equal(np.asarray(strip)[:2, :2], np.repeat(np.repeat(
            (reference[0, :1, :1] * 255).round().astype(np.uint8), 2, 0), 2, 1))


def _figure(monkeypatch: pytest.MonkeyPatch, metric: str, history) -> object:
    """The matplotlib axes trend_plot draws (captured before it is closed)."""
    captured = {}
    encode = plots_module._png_base64

    def capture(fig) -> str:
        captured["ax"] = fig.axes[0]
        return encode(fig)
    monkeypatch.setattr(plots_module, "_png_base64", capture)
    assert plots_module.trend_plot(metric, history)
    return captured["ax"]


def _history(persons: int, nights: int) -> list:
    rng = np.random.default_rng(1)
    days = [f"2025-{1 + d // 28:02d}-{1 + d % 28:02d}" for d in range(nights)]
    return [summarize(RunResults(day, {f"{p:03d}": {"t": TaskResult({"psnr": float(20 + rng.random() * 10)})}
                                       for p in range(persons)})) for day in days]


def test_the_trend_of_many_persons_draws_their_spread_not_a_line_each(monkeypatch: pytest.MonkeyPatch) -> None:
    """At 300 persons a plot had 300 lines and legend entries (15 plots: 69 s, each 367x1688 px, nearly all legend,
    colours repeating every 10 persons) and 60 overlapping dates. Above 10 persons: the average, the persons'
    10th-90th percentile and min-max as bands, a legend of those three, at most 12 dates named (the reported night
    among them)."""
    history = _history(40, 30)
    ax = _figure(monkeypatch, "psnr", history)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "persons: min to max", "persons: 10th to 90th percentile", "average"]
    assert len(ax.get_lines()) == 1  # the average alone
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert len(labels) <= 12 and labels[-1] == history[-1].run_date
    values = [a["psnr"] for a in history[0].person_average.values()]
    band = ax.collections[1].get_paths()[0].vertices
    assert sorted({round(float(y), 6) for xx, y in band if xx == 0}) == [
        round(float(v), 6) for v in np.percentile(values, [10, 90])]
    png = plots_module.trend_plot("psnr", _history(300, 12))
    assert Image.open(io.BytesIO(base64.b64decode(png))).size[1] < 300  # no 300-entry legend


def test_the_trend_of_a_few_persons_keeps_a_line_and_a_legend_entry_each(monkeypatch: pytest.MonkeyPatch) -> None:
    history = _history(3, 5)
    ax = _figure(monkeypatch, "psnr", history)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["000", "001", "002", "average"]
    assert [t.get_text() for t in ax.get_xticklabels()] == [h.run_date for h in history]
