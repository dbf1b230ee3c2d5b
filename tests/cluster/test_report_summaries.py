"""The report reads a past night from its summary (results.summary.json, written with results.json), not its whole
results.json (133 MB of per-frame values a night of 300 persons, 60 nights for every report): the same history,
the same damaged and ignored nights; a summary that does not match its results.json, or does not read, is not used
(the night is read in full, and its summary written again when the report can)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cluster.report import ReportConfig, RunResults, TaskResult, build_report
from cluster.report import build as build_module
from cluster.report.schema import EVAL_FORMAT_KEY, RESULTS_FILE

NIGHTS = tuple(f"2025-03-{d:02d}" for d in range(1, 8))
SUMMARY = "results.summary.json"
COMPARED = ("history", "other_eval_format_nights", "damaged_entries", "ignored_runs")


def _task(psnr: float | None, frames: int = 3, **kw) -> TaskResult:
    values = [psnr, psnr, None] if psnr is not None else [None] * frames
    return TaskResult({"psnr": psnr, "ssim": 0.5}, per_frame={"psnr": values[:frames]}, frames=frames, **kw)


def _saved(root: Path, night: str, shift: float = 0.0, fmt: str = "2") -> Path:
    """A night as the evaluation saves it: persons with numbers, one with a failed task and a skipped metric, one
    reused, the evaluations' metadata and the night's meta."""
    persons = {
        "p017": {"self_reenactment": _task(20.0 + shift), "novel_view": _task(21.5 + shift, video="videos/p017/n.mp4")},
        "p042": {"self_reenactment": _task(30.0 + shift, skipped={"akd": "AKD skipped: no landmark model"}),
                 "novel_view": TaskResult({}, skipped={"task": "failed: corrupt shard"})},
        "p077": {"self_reenactment": _task(None), "novel_view": _task(25.25 + shift)},
    }
    evaluations = {p: {"run_id": f"{night}-run", "evaluated_at": f"{night}T02:00:00+00:00", EVAL_FORMAT_KEY: fmt,
                       "key": f"k-{p}"} for p in persons}
    evaluations["p077"]["reused_from"] = "2025-02-27"
    return RunResults(night, persons, {"checkpoint": f"step-{night}", "git_commit": "abc"}, evaluations).save(root)


def _hand_written(root: Path, night: str, persons: dict, evaluations: dict | None = None) -> Path:
    """A night written by a version without summaries (or by hand): results.json alone, in the given key order."""
    path = root / "runs" / night / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schema_version": 1, "run_date": night, "meta": {"checkpoint": "old"},
                                "evaluations": evaluations or {}, "persons": persons}))
    return path


def _entry(psnr, frames: int = 2) -> dict:
    return {"frames": frames, "metrics": {"psnr": psnr}, "per_frame": {"psnr": [psnr] * frames}}


def _fixture(root: Path) -> dict[str, Path]:
    """Seven nights: the older version's (no summary; its tasks not in sorted order, whose mean depends on the
    order: 0.3, 0.2, 0.1), saved ones of two evaluation formats, one with malformed entries (a metric that is
    text, a person whose name is no name), one that is not JSON, and the reported one."""
    paths = {
        NIGHTS[0]: _hand_written(root, NIGHTS[0], {
            "p017": {"t3": _entry(0.3), "t2": _entry(0.2), "t1": _entry(0.1)},
            "p042": {"t2": _entry(0.2), "t1": _entry(0.7), "t3": _entry(0.1)}},
            {"p017": {"run_id": "old", EVAL_FORMAT_KEY: "1"}}),
        NIGHTS[1]: _saved(root, NIGHTS[1], 0.5, fmt="1"),
        NIGHTS[2]: _hand_written(root, NIGHTS[2], {
            "p017": {"self_reenactment": _entry("24.1"), "novel_view": _entry(22.0)},
            "p042": {"self_reenactment": _entry(28.0)}, "bad name": {"self_reenactment": _entry(1.0)}}),
        NIGHTS[3]: _saved(root, NIGHTS[3], 1.0),
        NIGHTS[4]: _saved(root, NIGHTS[4], 1.5),
        NIGHTS[5]: _saved(root, NIGHTS[5], 2.0),
        NIGHTS[6]: _saved(root, NIGHTS[6], 2.5),
    }
    paths[NIGHTS[3]].write_text("{broken")
    return paths


def _report(root: Path, **kw) -> dict:
    index = build_report(ReportConfig(root, NIGHTS[6], copy_videos=False, **kw))
    return json.loads((index.parent / "report.json").read_text())


def _full_read_report(root: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """The report as before summaries: every night read in full, nothing written beside them."""
    with monkeypatch.context() as m:
        m.setattr(RunResults, "load_summary", classmethod(lambda cls, path: None))
        m.setattr(build_module, "write_if_unchanged", lambda *a: None)
        return _report(root)


@pytest.fixture
def full_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The nights read in full (RunResults.load), by folder name."""
    read, real = [], RunResults.load.__func__

    def load(cls, path, salvage=False, **kw):
        read.append(Path(path).parent.name)
        return real(cls, path, salvage, **kw)
    monkeypatch.setattr(RunResults, "load", classmethod(load))
    return read


def test_past_nights_are_read_from_their_summaries_with_the_same_history(tmp_path, monkeypatch, full_reads):
    """Each past night's results.json was parsed whole, per-frame values and all, for its means (60 nights of 300
    persons: ~8 GB of JSON a report). Now each night saved has a summary beside it, read instead; an older
    version's night without one is read in full and gets one; a night with malformed entries is read in full every
    time (its damage named as before); the reported night is read in full (its per-frame values are on the page).
    report.json's history, other formats, damaged entries and ignored runs are those of reading every night."""
    paths = _fixture(tmp_path)
    expected = _full_read_report(tmp_path, monkeypatch)
    assert len(expected["damaged_entries"]) == 2 and len(expected["ignored_runs"]) == 1
    assert expected["other_eval_format_nights"] == [f"{NIGHTS[0]}: 1, not recorded", f"{NIGHTS[1]}: 1",
                                                    f"{NIGHTS[2]}: not recorded"]
    assert expected["history"][0]["persons"]["p017"]["psnr"] == 0.19999999999999998  # 0.3, 0.2, 0.1 in that order

    full_reads.clear()
    first = _report(tmp_path)  # the older version's night is read in full and gets its summary
    assert full_reads == [NIGHTS[6], NIGHTS[3], NIGHTS[2], NIGHTS[0]]
    assert (paths[NIGHTS[0]].with_name(SUMMARY)).is_file()
    assert not (paths[NIGHTS[2]].with_name(SUMMARY)).exists()  # damaged: read in full, its damage named

    full_reads.clear()
    second = _report(tmp_path)
    assert full_reads == [NIGHTS[6], NIGHTS[3], NIGHTS[2]]  # the reported night, the broken and the damaged ones
    for key in COMPARED:
        assert first[key] == expected[key], key
        assert second[key] == expected[key], key
    assert second["per_frame"]["p017"]["self_reenactment"] == {"psnr": [22.5, 22.5, None]}


def test_past_nights_are_not_parsed_in_full_when_their_summaries_match(tmp_path, monkeypatch):
    """With a matching summary the past night's results.json is not parsed at all."""
    for i, night in enumerate(NIGHTS[:4]):
        _saved(tmp_path, night, float(i))
    real = RunResults.load.__func__

    def load(cls, path, salvage=False, **kw):
        if Path(path).parent.name != NIGHTS[3]:
            raise AssertionError(f"{path} parsed in full")
        return real(cls, path, salvage, **kw)
    monkeypatch.setattr(RunResults, "load", classmethod(load))
    report = json.loads((build_report(ReportConfig(tmp_path, copy_videos=False)).parent / "report.json").read_text())
    assert [h["run_date"] for h in report["history"]] == list(NIGHTS[:4])
    assert [h["overall"]["psnr"] for h in report["history"]] == [20.75, 21.75, 22.75, 23.75]  # p017 alone
    assert [h["persons"]["p077"]["psnr"] for h in report["history"]] == [None] * 4  # no number in one of its tasks
    assert report["damaged_entries"] == [] and report["ignored_runs"] == []


def _replace(path: Path, psnr: float) -> None:
    """results.json written anew (another version's evaluation, by hand), its summary left as it was."""
    obj = json.loads(path.read_text())
    obj["persons"]["p017"]["self_reenactment"]["metrics"]["psnr"] = psnr
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


@pytest.mark.parametrize("how", ["replaced", "same_size", "killed_save", "no_summary", "touched"])
def test_a_summary_that_does_not_match_its_results_json_is_not_used(tmp_path, full_reads, monkeypatch, how):
    """A summary is of the results.json it was written with (size and modification time): after results.json was
    written again (a version without summaries, by hand, a save killed after results.json and before its summary)
    the night is read in full, with the numbers of results.json, and its summary written again."""
    _saved(tmp_path, NIGHTS[1], 5.0)
    path = _saved(tmp_path, NIGHTS[0])
    stamp_before = path.with_name(SUMMARY).read_text()
    if how == "replaced":
        _replace(path, 99.0)
    elif how == "same_size":  # the same number of characters: the time tells
        _replace(path, 19.0)
    elif how == "killed_save":  # results.json renamed into place, the process killed before the summary
        old_summary = path.with_name(SUMMARY).read_bytes()
        _saved(tmp_path, NIGHTS[0], 79.0)
        path.with_name(SUMMARY).write_bytes(old_summary)
    elif how == "no_summary":
        path.with_name(SUMMARY).unlink()
    else:  # the same content, rewritten
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000_000))
    expected = _full_read_report_of(tmp_path, monkeypatch)
    psnr = {"replaced": (99.0 + 21.5) / 2, "same_size": (19.0 + 21.5) / 2, "killed_save": (99.0 + 100.5) / 2}
    assert expected["history"][0]["persons"]["p017"]["psnr"] == psnr.get(how, (20.0 + 21.5) / 2)
    full_reads.clear()
    report = _report_of(tmp_path, NIGHTS[1])
    assert full_reads == [NIGHTS[1], NIGHTS[0]]
    for key in COMPARED:
        assert report[key] == expected[key], key
    assert path.with_name(SUMMARY).read_text() != stamp_before or how == "no_summary"

    full_reads.clear()  # written again: the next report reads the summary
    assert _report_of(tmp_path, NIGHTS[1])["history"] == report["history"] and full_reads == [NIGHTS[1]]


def _report_of(root: Path, night: str) -> dict:
    return json.loads((build_report(ReportConfig(root, night, copy_videos=False)).parent / "report.json").read_text())


def _edit_summary(path: Path, change) -> None:
    """Rewrite the summary of ``path`` with ``change`` applied to its night and a digest that matches."""
    from cluster.report.summary import read_summary, results_stamp, write_summary

    night = read_summary(path)
    change(night)
    write_summary(path, night, results_stamp(path))


DAMAGE = {
    "not_json": lambda p: p.with_name(SUMMARY).write_text('{"version": 1, "results": {"size"'),
    "not_utf8": lambda p: p.with_name(SUMMARY).write_bytes(b"\xff\xfe{}"),
    "a_list": lambda p: p.with_name(SUMMARY).write_text("[1, 2]"),
    "nested_deep": lambda p: p.with_name(SUMMARY).write_text("[" * 100_000 + "]" * 100_000),
    "stamp_of_text": lambda p: p.with_name(SUMMARY).write_text(p.with_name(SUMMARY).read_text().replace(
        '"size": ', '"size": "', 1).replace(', "mtime_ns"', '", "mtime_ns"', 1)),
    "version_true": lambda p: p.with_name(SUMMARY).write_text(
        p.with_name(SUMMARY).read_text().replace('"version": 1', '"version": true', 1)),
    "edited_number": lambda p: p.with_name(SUMMARY).write_text(
        p.with_name(SUMMARY).read_text().replace("20.0", "20.5", 1)),
    "nan": lambda p: p.with_name(SUMMARY).write_text(p.with_name(SUMMARY).read_text().replace("20.0", "NaN", 1)),
    "metric_of_text": lambda p: _edit_summary(
        p, lambda n: n["persons"]["p017"]["self_reenactment"]["metrics"].update(psnr="24.1")),
    "persons_a_list": lambda p: _edit_summary(p, lambda n: n.update(persons=[1])),
    "night_of_another_date": lambda p: _edit_summary(p, lambda n: n.update(run_date=NIGHTS[5])),
    "frames_negative": lambda p: _edit_summary(p, lambda n: n["persons"]["p042"]["novel_view"].update(frames=-1)),
    "meta_a_list": lambda p: _edit_summary(p, lambda n: n.update(meta=[1])),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_summary_is_not_used(tmp_path, full_reads, caplog, damage):
    """A summary that does not read (cut off, not UTF-8, nested too deep), whose fields have the wrong types, whose
    digest does not match (a number edited by hand, NaN) or whose night does not read strictly (a malformed entry:
    salvaged, it would be named as damage of results.json, which has none) is not used and crashes nothing: the
    night is read in full, with its own numbers, and its summary written again."""
    path = _saved(tmp_path, NIGHTS[0])
    _saved(tmp_path, NIGHTS[1], 5.0)
    expected = _report_of(tmp_path, NIGHTS[1])
    full_reads.clear()
    DAMAGE[damage](path)
    report = _report_of(tmp_path, NIGHTS[1])
    assert full_reads == [NIGHTS[1], NIGHTS[0]]
    for key in COMPARED:
        assert report[key] == expected[key], key
    full_reads.clear()
    _report_of(tmp_path, NIGHTS[1])
    assert full_reads == [NIGHTS[1]]  # its summary written again


def test_a_report_that_cannot_write_the_summary_still_reports(tmp_path, full_reads, monkeypatch, caplog):
    """The runs folder is the evaluation's: a report run by another user (read-only to it), or while an evaluation
    saves the night (its lock held), writes no summary and says so in the log; the report is built all the same,
    the night read in full."""
    from cluster.report.schema import NIGHT_LOCK
    from common.locks import exclusive

    path = _saved(tmp_path, NIGHTS[0])
    _saved(tmp_path, NIGHTS[1], 5.0)
    path.with_name(SUMMARY).unlink()
    expected = _full_read_report_of(tmp_path, monkeypatch)

    def read_only(*a, **kw):
        raise PermissionError(13, "Permission denied", str(path.with_name(SUMMARY)))
    with monkeypatch.context() as m:
        m.setattr(build_module, "write_summary", read_only)
        caplog.set_level("INFO", logger="cluster.report.summary")  # write_if_unchanged logs it
        assert _report_of(tmp_path, NIGHTS[1])["history"] == expected["history"]
    assert "no summary written" in caplog.text and "Permission denied" in caplog.text
    assert not path.with_name(SUMMARY).exists()

    with exclusive(path.with_name(NIGHT_LOCK), "an evaluation saving the night"):
        assert _report_of(tmp_path, NIGHTS[1])["history"] == expected["history"]
    assert not path.with_name(SUMMARY).exists()
    full_reads.clear()
    assert _report_of(tmp_path, NIGHTS[1])["history"] == expected["history"]  # now written
    assert full_reads == [NIGHTS[1], NIGHTS[0]] and path.with_name(SUMMARY).is_file()


def _full_read_report_of(root: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    with monkeypatch.context() as m:
        m.setattr(RunResults, "load_summary", classmethod(lambda cls, path: None))
        m.setattr(build_module, "write_if_unchanged", lambda *a: None)
        return _report_of(root, NIGHTS[1])


def test_the_summary_reads_as_the_full_read_without_per_frame_values(tmp_path):
    """load_summary gives what load with salvage and without per-frame values gives: persons, tasks (in the file's
    order), metrics, frames, skipped reasons, media paths, evaluations, meta."""
    path = _saved(tmp_path, NIGHTS[0])
    full = RunResults.load(path, salvage=True, per_frame=False)
    summary = RunResults.load_summary(path)
    assert summary == full and summary.damaged == full.damaged == []
    assert [list(t) for t in summary.persons.values()] == [list(t) for t in full.persons.values()]
    assert summary.persons["p042"]["novel_view"].failed
    assert summary.evaluations["p077"]["reused_from"] == "2025-02-27"
    assert "per_frame" in path.read_text() and "per_frame" not in path.with_name(SUMMARY).read_text()



def test_the_evaluations_saves_write_the_summary(tmp_path, monkeypatch):
    """The evaluation's saves of the night (while persons render and at the end, merged over what the night holds)
    write its summary with results.json: the report reads the night from it the next night."""
    from cluster.eval_driver import EvalDriverConfig, driver, run_evaluation

    persons = ("000", "001", "002")
    for p in persons:
        (tmp_path / "runs" / p / "model").mkdir(parents=True)
        (tmp_path / "runs" / p / "model" / "config.json").write_text("{}")
    checked = []

    def render_all(config, folder, todo, drivers, results, failed, person_seconds, app, media_tags=None,
                   on_done=None):
        for i, p in enumerate(todo):
            results[p] = {"self_reenactment": _task(20.0 + i)}
            on_done(p)  # saved as it goes (SAVE_EVERY_S 0)
            path = folder / RESULTS_FILE
            checked.append(RunResults.load_summary(path) == RunResults.load(path, salvage=True, per_frame=False))
        return len(todo)
    monkeypatch.setattr(driver, "_render_all", render_all)
    monkeypatch.setattr(driver, "SAVE_EVERY_S", 0.0)
    monkeypatch.setattr(driver, "SAVE_COST_FACTOR", 0.0)
    monkeypatch.setattr(driver, "_base_problem", lambda *a: None)
    monkeypatch.setattr(driver, "evaluation_key", lambda config, person, drv, cache: f"key-{person}")
    reports = tmp_path / "reports"
    for night, subset in ((NIGHTS[0], persons), (NIGHTS[1], persons[:2]), (NIGHTS[1], persons[2:])):
        config = EvalDriverConfig(runs=tmp_path / "runs", shards=tmp_path, stores=tmp_path, reports_root=reports,
                                  persons=subset, tasks=("self_reenactment",), metrics=("psnr",), run_date=night,
                                  build_report=False, force=True)
        summary = run_evaluation(config)
        night_read = RunResults.load_summary(summary.results_path)
        assert night_read is not None
        assert night_read == RunResults.load(summary.results_path, salvage=True, per_frame=False)
    assert checked == [True] * 6
    assert sorted(RunResults.load_summary(summary.results_path).persons) == list(persons)  # merged over the night's
    assert RunResults.load_summary(summary.results_path).meta["failed_persons"] == "none"
