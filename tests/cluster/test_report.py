"""results.json contract, averages and the report folder (HTML content is checked in Chromium elsewhere)."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from cluster.report import ReportConfig, RunResults, TaskResult, build_report
from cluster.report.aggregate import summarize
from common.io import DataError

sys.path.insert(0, str(Path(__file__).parent))  # report_data.py lives beside this file
from report_data import DATES, PERSONS, TASKS, make_runs  # noqa: E402


def test_results_roundtrip_and_validation(tmp_path: Path) -> None:
    res = TaskResult.from_evaluation(
        {"frames": 2, "metrics": {"psnr": {"mean": math.inf, "per_frame": [math.inf, math.inf]},
                                  "jod": {"mean": 9.5, "per_frame": None}}, "skipped": {"akd": "AKD skipped"}},
        video="videos/a/t.mp4",
    )
    run = RunResults("2025-02-01", {"a": {"t": res}})
    path = run.save(tmp_path)
    assert path == tmp_path / "runs/2025-02-01/results.json"
    raw = json.loads(path.read_text())
    assert raw["schema_version"] == 1 and raw["persons"]["a"]["t"]["metrics"] == {"psnr": None, "jod": 9.5}
    assert RunResults.load(path).to_json() == raw
    raw["schema_version"] = 99
    path.write_text(json.dumps(raw))
    with pytest.raises(DataError, match="schema_version 99"):
        RunResults.load(path)
    raw["schema_version"] = 1
    raw["persons"]["a"]["t"]["video"] = "../../etc/passwd"
    path.write_text(json.dumps(raw))
    with pytest.raises(DataError, match="relative to the run folder") as e:
        RunResults.load(path)
    assert str(path) in str(e.value)
    with pytest.raises(DataError, match="person name"):
        RunResults("2025-02-01", {"../x": {"t": res}}).save(tmp_path)


def test_a_malformed_results_file_is_named_and_an_old_one_is_ignored(tmp_path: Path) -> None:
    """Wrongly typed fields ('meta' a string, 'skipped' or 'per_frame' a list) and a file that is not UTF-8 are
    DataErrors naming the file and the field (they were AttributeError / UnicodeDecodeError, which took the report
    of another night and the evaluation's reuse check down); the report leaves such an old night out."""
    make_runs(tmp_path, with_video=False)
    old = tmp_path / "runs" / DATES[0] / "results.json"
    good = json.loads(old.read_text())
    task = ("persons", PERSONS[0], TASKS[0])
    variants = [(("meta",), "nightly", "'meta' must be an object"),
                (task + ("skipped",), ["no landmark model"], "'skipped' must be an object"),
                (task + ("per_frame",), [1.0, 2.0], "'per_frame' must be an object"),
                (task + ("per_frame",), {"psnr": 3.0}, "'per_frame' must be an object metric -> list")]
    for where, value, match in variants:
        obj = json.loads(json.dumps(good))
        parent = obj
        for k in where[:-1]:
            parent = parent[k]
        parent[where[-1]] = value
        old.write_text(json.dumps(obj))
        with pytest.raises(DataError, match=match) as e:
            RunResults.load(old)
        assert str(old) in str(e.value)
    old.write_bytes(b"\xff\xfe garbage from a bad copy")
    with pytest.raises(DataError, match="not UTF-8"):
        RunResults.load(old)
    folder = tmp_path / "runs" / DATES[1] / "results.json"
    folder.unlink()
    folder.mkdir()  # unreadable as a file (as a permission error would be, also as root)
    with pytest.raises(DataError, match="unreadable"):
        RunResults.load(folder)
    index = build_report(ReportConfig(tmp_path, DATES[-1], copy_videos=False))
    report = json.loads((index.parent / "report.json").read_text())
    assert len(report["ignored_runs"]) == 1 and str(old) in report["ignored_runs"][0]


def test_summary_averages_match_numpy(tmp_path: Path) -> None:
    runs = make_runs(tmp_path, with_video=False)
    s = summarize(runs[-1])
    assert s.metrics == ["psnr", "ssim", "psnr_masked", "ssim_masked"]
    for p in PERSONS:
        expected = np.mean([runs[-1].persons[p][t].metrics["psnr"] for t in TASKS])
        assert s.person_average[p]["psnr"] == pytest.approx(expected)
    assert s.overall["ssim"] == pytest.approx(np.mean([s.person_average[p]["ssim"] for p in PERSONS]))
    novel_view_psnr = [runs[-1].persons[p]["novel_view"].metrics["psnr"] for p in PERSONS]
    assert s.task_average["novel_view"]["psnr"] == pytest.approx(np.mean(novel_view_psnr))
    # less noise each night -> PSNR improves over the runs
    overall = [summarize(r).overall["psnr"] for r in runs]
    assert overall[0] < overall[1] < overall[2]


def test_the_average_over_persons_says_how_many_persons_it_covers(tmp_path: Path) -> None:
    """A person without numbers tonight (it failed) is not silently left out of "Average over persons": the row,
    report.json and the trend plot's caption say "1 of 2 persons", so a jump from dropping a weak person shows."""
    runs = make_runs(tmp_path, with_video=False)
    last = runs[-1]
    last.persons[PERSONS[1]] = {t: TaskResult(metrics={}, skipped={"task": "failed: ModelLoadError"}) for t in TASKS}
    last.save(tmp_path)
    index = build_report(ReportConfig(tmp_path, DATES[-1], copy_videos=False))
    report = json.loads((index.parent / "report.json").read_text())
    average = report["current"]["average"]
    assert average["overall_persons"]["psnr"] == 1 and average["persons_total"] == 2
    assert [(h["overall_persons"]["psnr"], h["persons_total"]) for h in report["history"]] == [(2, 2), (2, 2), (1, 2)]
    html = index.read_text()
    table = html[html.index('id="table-average"'):html.index('id="trends"')]
    assert '<tr class="average-row">' in table and table.count("1 of 2 persons") == len(average["overall"])
    trends = html[html.index('id="trends"'):]
    assert f"average over fewer persons: {DATES[-1]}: 1 of 2 persons" in trends
    previous = build_report(ReportConfig(tmp_path, DATES[-2], copy_videos=False)).read_text()
    assert "of 2 persons" not in previous  # every person has numbers: nothing to say


def test_a_person_with_a_failed_task_is_left_out_of_the_average_over_persons(tmp_path: Path) -> None:
    """Its other tasks keep their numbers in its row and in their tasks' averages, but its average over them alone
    would shift the mean over persons (a person whose hard task failed would raise it): the mean covers the other
    persons, and says so ("1 of 2 persons")."""
    last = make_runs(tmp_path, with_video=False)[-1]
    failed_task = TASKS[-1]
    last.persons[PERSONS[1]][failed_task] = TaskResult(metrics={}, skipped={"task": "failed: corrupt shard"})
    s = summarize(last)
    expected = np.mean([last.persons[PERSONS[1]][t].metrics["psnr"] for t in TASKS if t != failed_task])
    assert s.person_average[PERSONS[1]]["psnr"] == pytest.approx(expected)
    assert s.overall["psnr"] == pytest.approx(s.person_average[PERSONS[0]]["psnr"])
    assert s.overall_persons["psnr"] == 1 and s.partial("psnr")
    assert s.task_average[TASKS[0]]["psnr"] == pytest.approx(
        np.mean([last.persons[p][TASKS[0]].metrics["psnr"] for p in PERSONS]))
    last.persons[PERSONS[1]][failed_task] = TaskResult(metrics={}, skipped={"task": "not applicable to this person"})
    assert not summarize(last).partial("psnr")  # a task that does not apply is no failure


def test_build_report_folder(tmp_path: Path) -> None:
    make_runs(tmp_path)
    (tmp_path / "runs/2025-01-28").mkdir()
    (tmp_path / "runs/2025-01-28/results.json").write_text("{broken")
    index = build_report(ReportConfig(tmp_path))
    out = index.parent
    assert out == tmp_path / "site" / DATES[-1]
    report = json.loads((out / "report.json").read_text())
    assert [h["run_date"] for h in report["history"]] == list(DATES)
    assert len(report["ignored_runs"]) == 1 and "2025-01-28" in report["ignored_runs"][0]
    assert report["skipped"]["p017"]["novel_view"]["akd"].startswith("AKD skipped: no landmark model")
    assert set(report["current"]["persons"]) == set(PERSONS)
    for p in PERSONS:  # named by their content (a page published again never reuses an old name)
        (video,) = (out / "videos" / p).glob("self_reenactment-*.mp4")
        assert re.fullmatch(r"self_reenactment-[0-9a-f]{16}\.mp4", video.name) and video.stat().st_size > 1000
    (video,) = (out / "videos/p017").glob("self_reenactment-*.mp4")
    for f in (index, out / "report.json", video):
        assert f.stat().st_mode & 0o444 == 0o444, f  # readable by a web server user
    html = index.read_text()
    assert f'src="videos/p017/{video.name}"' in html and "data:image/png;base64," in html  # the plots inlined
    for p in PERSONS:  # without a thumbnail file: the video's first frame, next to the page (not inlined)
        (thumb,) = (out / "thumbnails" / p).glob("self_reenactment-*.png")
        assert f'loading="lazy" alt="{p} self_reenactment thumbnail" src="thumbnails/{p}/{thumb.name}"' in html
    assert html.count('class="plot"') >= 2 * 4  # figure + img per metric
    # an older date reports that run with only its own history
    older = build_report(ReportConfig(tmp_path, run_date=DATES[0], out_dir=tmp_path / "old"))
    assert [h["run_date"] for h in json.loads((older.parent / "report.json").read_text())["history"]] == [DATES[0]]


def test_missing_runs_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no nightly runs found"):
        build_report(ReportConfig(tmp_path))


@pytest.mark.parametrize("text", ["20250131", "2025-W05-5", "2025-1-31", " 2025-01-31"])
def test_a_run_date_is_yyyy_mm_dd_exactly(tmp_path: Path, text: str) -> None:
    """Nights are ordered by their folders' names: a date in another form Python reads (20250131 would sort after
    2025-02-01 and become the newest night) is refused for a new night and never read as one."""
    from cluster.eval_driver import EvalDriverConfig
    from cluster.report.schema import list_runs, parse_run_date, run_dir

    assert parse_run_date("2025-01-31").isoformat() == "2025-01-31"
    with pytest.raises(DataError, match="is not YYYY-MM-DD"):
        run_dir(tmp_path, text)
    with pytest.raises(ValueError, match="--run-date: run date .* is not YYYY-MM-DD"):
        EvalDriverConfig(runs=tmp_path, shards=tmp_path, stores=tmp_path, reports_root=tmp_path, metrics=("psnr",),
                         run_date=text)
    make_runs(tmp_path, with_video=False)
    stray = tmp_path / "runs" / text / "results.json"
    stray.parent.mkdir()
    stray.write_text((tmp_path / "runs" / DATES[0] / "results.json").read_text())
    assert [r.parent.name for r in list_runs(tmp_path)] == list(DATES)


def test_every_computed_metric_has_a_label_and_a_place():
    """The report keeps its own labels (it imports nothing from avatars); they must cover every
    metric the evaluation computes, masked variants included."""
    from avatars.evaluation.metric_names import DEFAULT_METRICS, MASKABLE, MASKED_SUFFIX
    from cluster.report import metric_labels

    assert metric_labels.MASKED_SUFFIX == MASKED_SUFFIX
    assert list(metric_labels.METRIC_INFO) == list(DEFAULT_METRICS)
    names = set(DEFAULT_METRICS) | {m + MASKED_SUFFIX for m in MASKABLE}
    assert metric_labels.metric_order(names) == [*DEFAULT_METRICS, *(m + MASKED_SUFFIX for m in DEFAULT_METRICS
                                                                      if m in MASKABLE)]
    assert metric_labels.metric_label("lpips_masked") == "LPIPS (masked)"
    assert not metric_labels.higher_is_better("lpips_face") and metric_labels.higher_is_better("psnr_masked")


def test_a_later_run_of_the_night_replaces_its_persons_and_keeps_the_others(tmp_path: Path) -> None:
    """A subset run merged over the night's results: its persons win, the others stay, each with
    where its numbers come from; the report shows all of them."""
    def task(psnr):
        return {"self_reenactment": TaskResult({"psnr": psnr}, frames=4)}

    full = RunResults("2025-02-01", {p: task(20.0) for p in ("a", "b", "c")}, {"run_id": "r1"},
                      {p: {"run_id": "r1", "evaluated_at": "2025-02-01T01:00:00+00:00", "key": f"k{p}"} for p in "abc"})
    full.save(tmp_path)
    subset = RunResults("2025-02-01", {"b": task(25.0)}, {"run_id": "r2"},
                        {"b": {"run_id": "r2", "evaluated_at": "2025-02-01T02:00:00+00:00", "key": "kb2"}})
    night = subset.merged_over(RunResults.load(tmp_path / "runs/2025-02-01/results.json"))
    assert {p: t["self_reenactment"].metrics["psnr"] for p, t in night.persons.items()} == \
        {"a": 20.0, "b": 25.0, "c": 20.0}
    assert {p: e["run_id"] for p, e in night.evaluations.items()} == {"a": "r1", "b": "r2", "c": "r1"}
    assert night.meta == {"run_id": "r2"} and subset.merged_over(None) is subset
    night.save(tmp_path)
    assert RunResults.load(tmp_path / "runs/2025-02-01/results.json").evaluations == night.evaluations
    index = build_report(ReportConfig(tmp_path, copy_videos=False))
    report = json.loads((index.parent / "report.json").read_text())
    assert sorted(report["current"]["persons"]) == ["a", "b", "c"]
    assert report["current"]["average"]["overall"]["psnr"] == pytest.approx(65 / 3)
    assert "evaluated 2025-02-01T02:00:00+00:00 (run r2)" in index.read_text()
