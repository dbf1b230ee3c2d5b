"""The report on damaged inputs: malformed values in results.json (Infinity or a 400-digit number where a count or
a metric is expected, a negative frame count, a bool for a metric) and a person's video or thumbnail that does not
read. Each is named (the file, the person, the task, the field); one bad entry, night or file never takes the
others down."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from cluster.report import ReportConfig, RunResults, TaskResult, build_report
from cluster.report import build as build_module
from common.io import DataError

NIGHTS = ("2025-03-01", "2025-03-02", "2025-03-03")


def _task(psnr: float, video: str | None = None, thumbnail: str | None = None) -> TaskResult:
    return TaskResult(metrics={"psnr": psnr, "ssim": 0.9}, per_frame={"psnr": [psnr, psnr]}, frames=2, video=video,
                      thumbnail=thumbnail)


def _nights(root: Path, media: bool = False) -> list[Path]:
    """Three nights, persons p017 and p042, tasks novel_view and self_reenactment; ``media``: the newest night's
    self_reenactment has a (stand-in) video and thumbnail per person."""
    paths = []
    for i, night in enumerate(NIGHTS):
        persons = {}
        for person in ("p017", "p042"):
            files = {}
            if media and i == len(NIGHTS) - 1:
                files = {"video": f"videos/{person}/self_reenactment.mp4",
                         "thumbnail": f"thumbnails/{person}/self_reenactment.png"}
                for rel in files.values():
                    (root / "runs" / night / rel).parent.mkdir(parents=True, exist_ok=True)
                    (root / "runs" / night / rel).write_bytes(f"{person} {rel}".encode())
            persons[person] = {"novel_view": _task(20.0 + i), "self_reenactment": _task(22.0 + i, **files)}
        paths.append(RunResults(night, persons, meta={"checkpoint": f"step-{i}"},
                                evaluations={p: {"key": f"key-{p}"} for p in persons}).save(root))
    return paths


def _damage(path: Path, text_edit) -> None:
    """Rewrite ``path`` with ``text_edit`` applied to its JSON text (to write what json.dumps cannot: Infinity,
    a 5000-digit integer)."""
    path.write_text(text_edit(path.read_text()))


def _set(path: Path, value_json: str, *where: str) -> None:
    """Set the field ``where`` (keys from the top) of the JSON file ``path`` to the raw JSON text ``value_json``."""
    obj = json.loads(path.read_text())
    parent = obj
    for k in where[:-1]:
        parent = parent[k]
    parent[where[-1]] = "__RAW__"
    path.write_text(json.dumps(obj).replace('"__RAW__"', value_json))


TASK = ("persons", "p017", "self_reenactment")
MALFORMED = [
    ("Infinity", TASK + ("frames",), "'frames' must be a count"),
    ("-3", TASK + ("frames",), "'frames' must be a count"),
    ("2.5", TASK + ("frames",), "'frames' must be a count"),
    ("true", TASK + ("frames",), "'frames' must be a count"),
    ("1" + "0" * 400, TASK + ("frames",), "'frames' must be a count"),
    ("1" + "0" * 400, TASK + ("metrics", "psnr"), "metric 'psnr' must be a number or null"),
    ("true", TASK + ("metrics", "psnr"), "metric 'psnr' must be a number or null"),
    ('"24.1"', TASK + ("metrics", "psnr"), "metric 'psnr' must be a number or null"),
    ("[true, 1]", TASK + ("per_frame", "psnr"), "'per_frame' 'psnr' item 0 must be a number or null"),
    ("[1, " + "9" * 400 + "]", TASK + ("per_frame", "psnr"), "'per_frame' 'psnr' item 1 must be a number or null"),
    ("{\"akd\": 5}", TASK + ("skipped",), "'skipped' 'akd' must be a text"),
    ("5", TASK + ("video",), "'video' must be a path"),
]


@pytest.mark.parametrize(("value", "where", "match"), MALFORMED, ids=[f"{w[-1]}={v[:12]}" for v, w, _ in MALFORMED])
def test_a_malformed_value_is_a_data_error_naming_the_file_person_task_and_field(
        tmp_path: Path, value: str, where: tuple[str, ...], match: str) -> None:
    """Before, Infinity or a 400-digit number raised OverflowError (no DataError: the report of another night, the
    evaluation's reuse check and its save stopped with a traceback), and -3 frames, ``true`` for PSNR (read as 1.0)
    or the text "24.1" were accepted."""
    path = _nights(tmp_path)[0]
    _set(path, value, *where)
    with pytest.raises(DataError, match=match) as e:
        RunResults.load(path)
    assert str(path) in str(e.value) and "person 'p017', task 'self_reenactment'" in str(e.value)
    assert len(str(e.value)) < 400  # the value is shown short, a 400-digit number too


@pytest.mark.parametrize("text", ["1" + "0" * 5000, "[" * 100_000 + "]" * 100_000], ids=["5000 digits", "deep"])
def test_json_that_python_cannot_read_is_a_data_error(tmp_path: Path, text: str) -> None:
    """An integer of over 4300 digits (Python's ValueError, not a JSONDecodeError) and a file nested deeper than the
    recursion limit (RecursionError) were no DataError: an old night like that stopped the report."""
    path = _nights(tmp_path)[0]
    _damage(path, lambda s: s.replace('"frames": 2', f'"frames": {text}', 1))
    with pytest.raises(DataError, match="not valid JSON") as e:
        RunResults.load(path)
    assert str(path) in str(e.value)
    index = build_report(ReportConfig(tmp_path, NIGHTS[-1], copy_videos=False))
    report = json.loads((index.parent / "report.json").read_text())
    assert [r["run_date"] for r in report["history"]] == list(NIGHTS[1:])
    assert len(report["ignored_runs"]) == 1 and str(path) in report["ignored_runs"][0]


def test_the_schema_version_is_the_integer_1(tmp_path: Path) -> None:
    path = _nights(tmp_path)[0]
    for value in ("true", "1.0"):
        _set(path, value, "schema_version")
        with pytest.raises(DataError, match="schema_version"):
            RunResults.load(path)


@pytest.mark.parametrize(("value", "where"), [("Infinity", TASK + ("frames",)),
                                              ("1" + "0" * 400, TASK + ("metrics", "psnr"))],
                         ids=["frames Infinity", "400-digit psnr"])
def test_a_malformed_entry_of_an_old_night_fails_that_task_not_the_report(
        tmp_path: Path, value: str, where: tuple[str, ...], caplog: pytest.LogCaptureFixture) -> None:
    """Before, nightly_report stopped with OverflowError (exit 1). Now the old night stays in the trends (as on its
    own page), its malformed task counts as failed (the person is out of that night's average, which says 1 of 2
    persons), and the page, report.json and the log name the file, the person and the field."""
    from jobs.nightly_report import main

    old = _nights(tmp_path)[0]
    _set(old, value, *where)
    with caplog.at_level(logging.WARNING):
        assert main(["--reports-root", str(tmp_path), "--no-videos"]) == 0
    out = tmp_path / "site" / NIGHTS[-1]
    report = json.loads((out / "report.json").read_text())
    assert report["ignored_runs"] == []
    first = report["history"][0]
    assert first["run_date"] == NIGHTS[0] and first["overall_persons"]["psnr"] == 1 and first["persons_total"] == 2
    assert first["overall"]["psnr"] == pytest.approx(21.0)  # p042 alone: (20 + 22) / 2
    assert first["persons"]["p017"]["psnr"] == pytest.approx(20.0)  # its readable task keeps its number
    (damaged,) = report["damaged_entries"]
    assert str(old) in damaged and "person 'p017', task 'self_reenactment'" in damaged
    assert str(old) in caplog.text and "person 'p017'" in caplog.text
    assert "malformed entry: " in (out / "index.html").read_text()
    # the reported night itself is untouched
    assert report["current"]["average"]["overall_persons"]["psnr"] == 2


def test_one_malformed_person_of_the_reported_night_leaves_the_other_persons_on_the_page(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Before, one person's metric "n/a" refused the whole night's report (exit 2): no page for anyone. Now its task
    is shown failed with the reason (the average says 1 of 2 persons), a person whose entry or name is malformed is
    left out with a note at the top, and the other persons' numbers are on the page."""
    from jobs.nightly_report import main

    current = _nights(tmp_path)[-1]
    _set(current, '"n/a"', *TASK, "metrics", "psnr")
    _set(current, '"not an object"', "persons", "p099")
    _set(current, '{"t": {"metrics": {}}}', "persons", "bad name")
    with caplog.at_level(logging.WARNING):
        assert main(["--reports-root", str(tmp_path), "--no-videos"]) == 0
    out = tmp_path / "site" / NIGHTS[-1]
    report = json.loads((out / "report.json").read_text())
    summary = report["current"]
    assert sorted(summary["persons"]) == ["p017", "p042"]
    assert summary["persons"]["p042"]["tasks"]["self_reenactment"]["psnr"] == pytest.approx(24.0)
    assert summary["persons"]["p017"]["tasks"]["novel_view"]["psnr"] == pytest.approx(22.0)
    assert summary["average"]["overall_persons"]["psnr"] == 1 and summary["average"]["persons_total"] == 2
    reason = report["skipped"]["p017"]["self_reenactment"]["task"]
    assert reason.startswith("failed:") and str(current) in reason and "metric 'psnr'" in reason
    damaged = report["damaged_entries"]
    assert len(damaged) == 3 and all(str(current) in d for d in damaged)
    assert any("p099" in d and "person left out" in d for d in damaged)
    assert any("bad name" in d and "person left out" in d for d in damaged)
    html = (out / "index.html").read_text()
    assert html.count("malformed entry: ") == 3 and "1 of 2 persons" in html
    assert "metric &#39;psnr&#39; must be a number or null" in html  # under p017, as its failed task's reason
    assert caplog.text.count(str(current)) >= 3

    # what is not one person's (the file's version) still refuses the night, naming it: exit 2
    _set(current, '"1"', "schema_version")
    assert main(["--reports-root", str(tmp_path), "--no-videos"]) == 2
    with pytest.raises(DataError, match="schema_version"):
        RunResults.load(current, salvage=True)


def test_a_night_with_no_readable_person_is_refused(tmp_path: Path) -> None:
    current = _nights(tmp_path)[-1]
    for person in ("p017", "p042"):
        _set(current, "[]", "persons", person)
    with pytest.raises(DataError, match="no person's entry reads") as e:
        RunResults.load(current, salvage=True)
    assert str(current) in str(e.value)


def test_the_evaluation_skips_a_malformed_night_when_it_looks_for_numbers_to_reuse(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """find_reusable read the newest night with a 400-digit number and stopped with OverflowError (every later
    evaluation stopped before it rendered); now it warns and looks at the night before. The night's own save
    (driver._load_night) no longer stops either."""
    from cluster.eval_driver.driver import _load_night
    from cluster.eval_driver.uptodate import find_reusables

    paths = _nights(tmp_path)
    _set(paths[-1], "Infinity", *TASK, "frames")
    with caplog.at_level(logging.WARNING):
        hit = find_reusables(tmp_path, NIGHTS[-1], {"p017": "key-p017"}).get("p017")
    assert hit is not None and hit[0].run_date == NIGHTS[1]
    assert str(paths[-1]) in caplog.text
    night = _load_night(paths[-1])  # replaced with a warning, or kept with the task failed: no OverflowError
    assert night is None or night.persons["p017"]["self_reenactment"].failed


def _unreadable(monkeypatch: pytest.MonkeyPatch, name: str, what: str) -> None:
    """Reading (``what`` = "read_bytes") or copying ("copy") the file ``name`` fails with EIO."""
    def eio(path) -> OSError:
        return OSError(5, "Input/output error", str(path))

    if what == "read_bytes":
        read_bytes = Path.read_bytes

        def fake(self: Path) -> bytes:
            if str(self).endswith(name):
                raise eio(self)
            return read_bytes(self)
        monkeypatch.setattr(Path, "read_bytes", fake)
    else:
        copyfile = shutil.copyfile

        def fake_copy(src, dst, *a, **k):
            if str(src).endswith(name):
                raise eio(src)
            return copyfile(src, dst, *a, **k)
        monkeypatch.setattr(build_module.shutil, "copyfile", fake_copy)


@pytest.mark.parametrize("what", ["thumbnail", "video"])
def test_a_persons_unreadable_media_file_is_left_out_with_a_note(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, what: str) -> None:
    """Before, one person's thumbnail that did not read or video that did not copy (EIO) stopped the whole report
    with a traceback; now that file is left out of the page with a note under the person and a warning."""
    _nights(tmp_path, media=True)
    name = "p017/self_reenactment.png" if what == "thumbnail" else "p017/self_reenactment.mp4"
    _unreadable(monkeypatch, name, "read_bytes" if what == "thumbnail" else "copy")
    with caplog.at_level(logging.WARNING):
        index = build_report(ReportConfig(tmp_path, NIGHTS[-1]))
    out = index.parent
    html = index.read_text()
    note = f"self_reenactment: {what} {tmp_path / 'runs' / NIGHTS[-1]}/{what}s/{name} left out: Input/output error"
    assert note in html
    assert f"{what}s/{name}" in caplog.text and "Input/output error" in caplog.text
    # the other person's media, and the person's other file, are on the page
    (video,) = (out / "videos/p042").glob("self_reenactment-*.mp4")
    assert video.read_bytes() == b"p042 videos/p042/self_reenactment.mp4"
    assert f'src="videos/p042/{video.name}"' in html
    assert html.count('class="thumb"') == (1 if what == "thumbnail" else 2)
    copied = list((out / "videos").glob("p017/self_reenactment-*.mp4"))
    assert bool(copied) == (what == "thumbnail")
    assert json.loads((out / "report.json").read_text())["current"]["average"]["overall_persons"]["psnr"] == 2


def test_a_publish_killed_before_its_page_leaves_the_old_page_playing_its_own_videos(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A night published again (re-evaluated: other videos) and killed before its index.html is written: the old page
    still plays the videos it was published with (the videos are named by their content; before, they were copied
    over the old page's names first, so the old numbers played the new model's videos). The next publish removes
    the old page's videos and a killed copy's temporary file."""
    _nights(tmp_path, media=True)
    out = build_report(ReportConfig(tmp_path, NIGHTS[-1])).parent
    old_html = (out / "index.html").read_text()
    (old_video,) = (out / "videos/p017").glob("self_reenactment-*.mp4")
    source = tmp_path / "runs" / NIGHTS[-1] / "videos/p017/self_reenactment.mp4"
    source.write_bytes(b"the re-evaluated model's video")
    (out / "videos/p017/.self_reenactment-x.mp4.tmp-1").write_bytes(b"half")  # a copy that was killed

    write = build_module.atomic_write_bytes

    def killed(path, data, mode=None):
        if Path(path).name == "index.html":
            raise KeyboardInterrupt  # stands in for the SIGKILL: nothing after it runs
        write(path, data, mode)
    monkeypatch.setattr(build_module, "atomic_write_bytes", killed)
    with pytest.raises(KeyboardInterrupt):
        build_report(ReportConfig(tmp_path, NIGHTS[-1]))
    assert (out / "index.html").read_text() == old_html
    assert f'src="videos/p017/{old_video.name}"' in old_html
    assert old_video.read_bytes() == b"p017 videos/p017/self_reenactment.mp4"  # the old page's own video

    monkeypatch.setattr(build_module, "atomic_write_bytes", write)
    build_report(ReportConfig(tmp_path, NIGHTS[-1]))
    (new_video,) = (out / "videos/p017").iterdir()
    assert new_video.read_bytes() == b"the re-evaluated model's video"
    assert f'src="videos/p017/{new_video.name}"' in (out / "index.html").read_text()


def test_an_evaluation_saving_a_night_with_one_malformed_entry_keeps_the_other_persons(tmp_path: Path) -> None:
    """The evaluation merges its persons over the night's results.json: one malformed entry made the whole file
    'unreadable, replaced', dropping the persons an earlier run had evaluated that night. Now that task is kept as
    failed (rendered again next time) and the others as they were."""
    from cluster.eval_driver.driver import _load_night

    path = _nights(tmp_path)[-1]
    _set(path, '"n/a"', "persons", "p017", "novel_view", "metrics", "psnr")
    night = _load_night(path)
    assert night is not None and sorted(night.persons) == ["p017", "p042"]
    assert night.persons["p017"]["novel_view"].failed and not night.persons["p017"]["self_reenactment"].failed
    assert not any(t.failed for t in night.persons["p042"].values())
