"""The report on awkward inputs: a task whose metric is undefined in every frame, a person named like the average
table, metric names with mathtext markup."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cluster.report import ReportConfig, RunResults, TaskResult, build_report
from cluster.report.aggregate import summarize
from cluster.report.build import partial_nights
from cluster.report.plots import trend_plot


def _task(**metrics: float | None) -> TaskResult:
    return TaskResult(metrics=dict(metrics), frames=2)


def _night(date: str, face_000_self: float | None) -> RunResults:
    return RunResults(date, {
        "000": {"novel_view": _task(psnr=20.0, psnr_face=30.0), "self_reenactment": _task(psnr=14.0,
                                                                                          psnr_face=face_000_self)},
        "001": {"novel_view": _task(psnr=20.0, psnr_face=20.0), "self_reenactment": _task(psnr=20.0, psnr_face=10.0)},
    })


def test_a_task_without_a_number_in_a_metric_leaves_the_person_out_of_its_average() -> None:
    """Person 000's self_reenactment has no psnr_face (its face mask empty in every frame): its average over
    novel_view alone (30) would raise the mean over persons from 20 to 22.5, shown as a better night. It counts as
    without a number there, like a person with a failed task: the mean covers 001 alone and says "1 of 2"."""
    s = summarize(_night("2025-01-31", None))
    assert s.person_average["000"]["psnr_face"] is None
    assert s.person_average["001"]["psnr_face"] == pytest.approx(15.0)
    assert s.overall["psnr_face"] == pytest.approx(15.0)
    assert s.overall_persons["psnr_face"] == 1 and s.persons_total == 2 and s.partial("psnr_face")
    # the metrics every task has are untouched
    assert s.person_average["000"]["psnr"] == pytest.approx(17.0)
    assert s.overall_persons["psnr"] == 2 and not s.partial("psnr")
    # the tasks keep the numbers they have
    assert s.person_tasks["000"]["novel_view"]["psnr_face"] == 30.0
    assert s.task_average["novel_view"]["psnr_face"] == pytest.approx(25.0)
    previous = summarize(_night("2025-01-30", 20.0))
    assert previous.overall["psnr_face"] == pytest.approx(20.0) and not previous.partial("psnr_face")
    assert partial_nights("psnr_face", [previous, s]) == ["2025-01-31: 1 of 2 persons"]


def test_tasks_that_measure_nothing_do_not_leave_the_person_out() -> None:
    """A task that does not apply, one without ground truth (video only) or one whose metric is skipped by design
    has no entry for the metric: the person's average is over the tasks that measured it, as before."""
    run = RunResults("2025-01-31", {
        "000": {"novel_view": _task(psnr=20.0, psnr_face=30.0), "self_reenactment": _task(psnr=10.0),
                "cross_reenactment": TaskResult(metrics={}, skipped={"metrics": "no ground truth"}, frames=2)},
        "001": {"novel_view": _task(psnr=20.0, psnr_face=20.0), "self_reenactment": _task(psnr=20.0, psnr_face=10.0),
                "cross_reenactment": TaskResult(metrics={}, skipped={"task": "not a synthetic capture"})},
    })
    s = summarize(run)
    assert s.person_average["000"] == {"psnr": pytest.approx(15.0), "psnr_face": pytest.approx(30.0)}
    assert s.overall_persons == {"psnr": 2, "psnr_face": 2}
    # a failed task still leaves the person out of the mean over persons, its row keeping its other numbers
    run.persons["001"]["cross_reenactment"] = TaskResult(metrics={}, skipped={"task": "failed: corrupt shard"})
    s = summarize(run)
    assert s.person_average["001"]["psnr"] == pytest.approx(20.0)
    assert s.overall["psnr"] == pytest.approx(15.0) and s.overall_persons["psnr"] == 1 and s.partial("psnr")


def _ids(html: str) -> list[str]:
    return re.findall(r'\sid="([^"]*)"', html)


def test_a_person_named_average_has_its_own_table(tmp_path: Path) -> None:
    """The average over persons is ``table-average``; a person's table must not take that id (a person may be
    called "average"), nor any other id of the page."""
    RunResults("2025-01-31", {"000": {"novel_view": _task(psnr=30.0)},
                              "average": {"novel_view": _task(psnr=10.0)}}).save(tmp_path)
    html = build_report(ReportConfig(tmp_path, copy_videos=False)).read_text()
    ids = _ids(html)
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    overall = re.search(r'<table class="metrics" id="table-average">.*?</table>', html, re.S).group(0)
    assert "<th>Task</th>" in overall and "20.00" in overall  # the mean over the two persons
    person = re.search(r'<table class="metrics" id="table-person-average">.*?</table>', html, re.S).group(0)
    assert "10.00" in person and "30.00" not in person and "20.00" not in person
    assert 'id="table-person-000"' in html


@pytest.mark.parametrize("name", ["$a^$", r"x$\frac{$", r"$\notacommand$ score"])
def test_a_metric_name_with_mathtext_markup_is_drawn_as_given(tmp_path: Path, name: str) -> None:
    """Unknown metrics are shown under their results.json name; matplotlib read "$...$" in it as mathtext and a
    malformed one stopped the whole report (ParseException)."""
    run = RunResults("2025-01-31", {"000": {"novel_view": _task(psnr=30.0, **{name: 1.0})},
                                    "001": {"novel_view": _task(psnr=20.0)}})
    assert trend_plot(name, [summarize(run)])
    run.save(tmp_path)
    html = build_report(ReportConfig(tmp_path, copy_videos=False)).read_text()
    assert html.count('class="plot"') == 2 * 2  # figure + img for psnr and for the odd name


def test_nights_computed_by_another_version_of_the_evaluation_are_named(tmp_path: Path) -> None:
    """EVAL_FORMAT changes what an evaluation computes (2: frames with an empty mask leave the masked metrics): the
    trend of an upgraded run put older nights' numbers beside the new ones as if comparable. Each evaluation now
    records its version, and the page and report.json name the nights of another one (or none recorded)."""
    import json

    from cluster.eval_driver.uptodate import EVAL_FORMAT
    from cluster.report.schema import EVAL_FORMAT_KEY

    versions = {"2025-01-29": None, "2025-01-30": str(EVAL_FORMAT - 1), "2025-01-31": str(EVAL_FORMAT)}
    for date, version in versions.items():
        night = _night(date, 10.0)
        night.evaluations = {p: {EVAL_FORMAT_KEY: version} if version else {} for p in night.persons}
        night.save(tmp_path)
    index = build_report(ReportConfig(tmp_path, "2025-01-31", copy_videos=False))
    report = json.loads((index.parent / "report.json").read_text())
    assert report["eval_format"] == [str(EVAL_FORMAT)]
    assert report["other_eval_format_nights"] == ["2025-01-29: not recorded", f"2025-01-30: {EVAL_FORMAT - 1}"]
    html = index.read_text()
    assert "computed by another version of the evaluation than this night's" in html
    assert f"2025-01-30: {EVAL_FORMAT - 1}" in html
