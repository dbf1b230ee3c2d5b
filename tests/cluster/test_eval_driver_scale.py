"""The nightly evaluation at scale: the lookup of reusable numbers reads each stored night at most once per run
(through its key index, not at all when it holds none of the keys wanted), and a run killed before its end keeps
the persons it finished (results.json saved as they finish)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest

from cluster.eval_driver import EvalDriverConfig, run_evaluation
from cluster.report import RunResults, TaskResult
from cluster.report.schema import RESULTS_FILE, run_dir

PERSONS = ("000", "001", "002", "003")


def _config(tmp_path: Path, run_date: str, **kw) -> EvalDriverConfig:
    for p in PERSONS:
        (tmp_path / "runs" / p / "model").mkdir(parents=True, exist_ok=True)
        (tmp_path / "runs" / p / "model" / "config.json").write_text("{}")
    return EvalDriverConfig(runs=tmp_path / "runs", shards=tmp_path, stores=tmp_path, reports_root=tmp_path / "reports",
                            persons=PERSONS, tasks=("self_reenactment",), metrics=("psnr",), run_date=run_date,
                            **{"build_report": False, **kw})


def _task(failed: bool = False) -> TaskResult:
    return TaskResult({}, skipped={"task": "failed: corrupt shard"}) if failed else \
        TaskResult({"psnr": 20.0}, per_frame={"psnr_frame": [20.0] * 50}, frames=50)


def _old_night(root: Path, date: str, keys: dict[str, str | None], failed: tuple[str, ...] = ()) -> Path:
    """A night as a version before the key index saved it: results.json alone."""
    evaluations = {p: {"run_id": date} | ({"key": k} if k else {}) for p, k in keys.items()}
    return RunResults(date, {p: {"self_reenactment": _task(p in failed)} for p in keys}, {}, evaluations).save(root)


@pytest.fixture
def loads(monkeypatch):
    """The nights read in full (RunResults.load without salvage: the lookup's reads; the night's own save reads
    its file with salvage), by folder name."""
    read, real = [], RunResults.load.__func__

    def load(cls, path, salvage=False, **kw):
        if not salvage:
            read.append(Path(path).parent.name)
        return real(cls, path, salvage, **kw)

    monkeypatch.setattr(RunResults, "load", classmethod(load))
    return read


@pytest.fixture
def stand_ins(monkeypatch):
    """The driver with its renderer, base check and keys stood in: keys[person] is each person's evaluation key
    now; rendered lists the persons _render_all was given."""
    from cluster.eval_driver import driver

    keys, rendered = {}, []

    def render_all(config, folder, todo, drivers, results, failed, person_seconds, app, media_tags=None,
                   on_done=None):
        rendered.extend(todo)
        results.update({p: {"self_reenactment": _task()} for p in todo})
        return len(todo)

    monkeypatch.setattr(driver, "_render_all", render_all)
    monkeypatch.setattr(driver, "_base_problem", lambda *a: None)
    monkeypatch.setattr(driver, "evaluation_key", lambda config, person, drv, cache: keys[person])
    return keys, rendered


def test_the_lookup_of_reusable_numbers_reads_each_night_once_for_all_persons(tmp_path, loads, stand_ins):
    """find_reusable read the stored nights in full, newest first, once per person: 300 persons each up to date
    read the newest night 300 times (133 MB, ~10 s each: 48 min before anything rendered), and after a settings
    change (every key new) every night 300 times (60 nights: ~48 h). Now a run reads each night at most once, a
    night saved with its key index only when it holds a key wanted, and a night of an older version (no index)
    gets one when read."""
    keys, rendered = stand_ins
    root = tmp_path / "reports"
    for date in ("2026-01-01", "2026-01-02", "2026-01-03"):
        _old_night(root, date, {p: f"old-{p}" for p in PERSONS})

    keys.update({p: f"new-{p}" for p in PERSONS})  # the settings changed: nothing stored is up to date
    run_evaluation(_config(tmp_path, "2026-01-04"))
    assert rendered == list(PERSONS)
    assert sorted(loads) == ["2026-01-01", "2026-01-02", "2026-01-03"]  # each once (before: 4 times each)
    for date in ("2026-01-01", "2026-01-02", "2026-01-03", "2026-01-04"):
        assert (root / "runs" / date / "results.keys.json").is_file(), date  # read once, indexed since

    loads.clear()
    rendered.clear()
    nxt = run_evaluation(_config(tmp_path, "2026-01-05"))  # nothing changed: every person up to date
    assert nxt.reused == list(PERSONS) and rendered == []
    assert loads == ["2026-01-04"]  # the night holding the keys, once (before: once per person)
    night = RunResults.load(nxt.results_path)
    assert {p: e["key"] for p, e in night.evaluations.items()} == keys
    assert {e["reused_from"] for e in night.evaluations.values()} == {"2026-01-04"}

    loads.clear()
    keys.update({p: f"newer-{p}" for p in PERSONS})  # another settings change
    run_evaluation(_config(tmp_path, "2026-01-06"))
    assert loads == []  # every night's index says it does not hold the keys: no night read in full


def test_the_newest_night_holding_a_reusable_entry_wins_and_the_index_follows_results_json(tmp_path, caplog):
    """The lookup through the key index finds what reading every night in full found: the newest night up to
    the run's date with the key, not one whose entry failed or whose media are gone; a results.json rewritten
    after its index (a version without the index, a run killed between the two writes) or an index that does not
    read is read in full, not trusted; a malformed night is skipped with a warning."""
    from cluster.eval_driver.uptodate import KEY_INDEX, find_reusables, read_key_index, write_key_index

    root = tmp_path
    paths = {d: _old_night(root, d, {"000": "k", "001": "k", "002": "k"}, failed=failed)
             for d, failed in (("2026-01-01", ()), ("2026-01-02", ()), ("2026-01-03", ("001",)), ("2026-01-05", ()))}
    for path in paths.values():
        write_key_index(path, RunResults.load(path))
    assert read_key_index(paths["2026-01-03"]) == {"000": "k", "002": "k"}  # a failed entry has no reusable key
    media = run_dir(root, "2026-01-03") / "thumbnails" / "002" / "t.png"
    night = RunResults.load(paths["2026-01-03"])
    night.persons["002"]["self_reenactment"].thumbnail = "thumbnails/002/t.png"  # not there: not reusable from it
    write_key_index(night.save(root), night)

    hits = find_reusables(root, "2026-01-04", {"000": "k", "001": "k", "002": "k", "003": "k"})
    assert {p: h[0].run_date for p, h in hits.items()} == {"000": "2026-01-03", "001": "2026-01-02",
                                                           "002": "2026-01-02"}
    assert sorted(hits["001"][0].persons) == ["001", "002"] and hits["001"][1] == paths["2026-01-02"].parent

    # 2026-01-03's results.json rewritten by a version without the index: 000 has another key there now
    night = RunResults.load(paths["2026-01-03"])
    night.evaluations["000"]["key"] = "k2"
    night.save(root)
    assert read_key_index(paths["2026-01-03"]) is None  # its size and time do not match: not trusted
    assert find_reusables(root, "2026-01-04", {"000": "k2"}).get("000")[0].run_date == "2026-01-03"
    assert read_key_index(paths["2026-01-03"]) == {"000": "k2", "002": "k"}  # read in full: indexed again

    media.parent.mkdir(parents=True)
    media.write_bytes(b"png")
    assert find_reusables(root, "2026-01-04", {"002": "k"}).get("002")[0].run_date == "2026-01-03"
    (paths["2026-01-03"].with_name(KEY_INDEX)).write_text('{"version": 1, "keys": []}')
    paths["2026-01-02"].write_text('{"schema_version": 1, "run_date": "2026-01-02", "persons": []}')
    with caplog.at_level(logging.WARNING):
        assert find_reusables(root, "2026-01-04", {"001": "k"}).get("001")[0].run_date == "2026-01-01"
    assert f"{paths['2026-01-03'].with_name(KEY_INDEX)}: malformed key index" in caplog.text
    assert f"not reusing results from {paths['2026-01-02']}" in caplog.text


def test_a_run_killed_before_its_end_keeps_the_persons_it_finished(tmp_path, monkeypatch, loads):
    """results.json was written only after every person had rendered: a render job killed near its end (its time
    limit, a lost node) saved nothing, and the next run started over (with 300 persons, maybe never finishing).
    Now the night is saved as persons finish: the killed run's finished persons are there with their keys (one
    with a failed task without one), and the next run reuses them and renders the rest."""
    from cluster.eval_driver import driver
    from cluster.eval_driver.person import EvalRun
    from cluster.serve import deployment

    monkeypatch.setattr(driver, "SAVE_EVERY_S", 0.0, raising=False)  # saved after each person
    monkeypatch.setattr(driver, "SAVE_COST_FACTOR", 0.0, raising=False)
    monkeypatch.setattr(driver, "_base_problem", lambda *a: None)
    monkeypatch.setattr(driver, "evaluation_key", lambda config, person, drv, cache: f"key-{person}")
    monkeypatch.setattr(driver, "connect_ray", lambda *a, **kw: True)
    monkeypatch.setattr(driver, "leave_ray", lambda *a: None)
    monkeypatch.setattr(deployment, "deploy_renderer", lambda *a, **kw: object())
    config = _config(tmp_path, "2026-01-01", build_report=True)
    results_json = run_dir(config.reports_root, "2026-01-01") / RESULTS_FILE
    rendered = []

    def killed_at_003(self, handle, person, drv):
        rendered.append(person)
        if person == "003":  # the job is killed while its last person renders, after the others finished
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if results_json.is_file() and {"000", "001", "002"} <= set(RunResults.load(results_json).persons):
                    break
                time.sleep(0.05)
            raise KeyboardInterrupt  # stands in for SIGKILL: nothing after it runs
        return {"self_reenactment": _task(failed=person == "001")}

    monkeypatch.setattr(EvalRun, "person", killed_at_003)
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(config)
    assert results_json.is_file(), "the killed run saved nothing"
    night = RunResults.load(results_json)
    assert sorted(night.persons) == ["000", "001", "002"]
    assert {p: e.get("key") for p, e in night.evaluations.items()} == {"000": "key-000", "001": None,
                                                                        "002": "key-002"}
    assert night.meta["failed_persons"] == "001" and not (config.reports_root / "site").exists()  # report: at the end

    rendered.clear()
    monkeypatch.setattr(EvalRun, "person", lambda self, handle, person, drv: rendered.append(person)
                        or {"self_reenactment": _task()})
    loads.clear()
    again = run_evaluation(config)
    assert again.reused == ["000", "002"] and sorted(rendered) == ["001", "003"] and again.failed == {}
    assert loads == ["2026-01-01"]  # through the key index the killed run wrote with its results
    night = RunResults.load(again.results_path)
    assert sorted(night.persons) == list(PERSONS) and night.meta["failed_persons"] == "none"
    assert all("key" in e for e in night.evaluations.values())
    assert (config.reports_root / "site" / "2026-01-01" / "index.html").is_file()


def test_the_night_is_saved_at_most_once_a_minute_and_never_mostly_saving(tmp_path, monkeypatch):
    """A save reads and writes the whole night (seconds for 300 persons' per-frame numbers): while persons render,
    it is saved after a person finishes only when SAVE_EVERY_S and ten times the last save's duration have passed;
    a save that fails is warned about and the persons render on."""
    from cluster.eval_driver import driver

    clock = [1000.0]
    monkeypatch.setattr(driver.time, "monotonic", lambda: clock[0])
    saves = []

    def save_night(config, folder, night, bad_names, rendered, started):
        saves.append((sorted(night.persons), list(rendered)))
        clock[0] += 8.0  # a save of a large night takes 8 s
        if len(saves) == 3:
            raise OSError(28, "No space left on device")
        return folder / RESULTS_FILE

    monkeypatch.setattr(driver, "_save_night", save_night)
    config = _config(tmp_path, "2026-01-01")
    night = driver._Night(config, tmp_path, RunResults("2026-01-01", {}, {"run_id": "r"}, {}), list(PERSONS),
                          list(PERSONS), {}, {p: "k" for p in PERSONS}, [], started=0.0)
    steps = []
    for person, wait in zip(PERSONS, (30.0, 40.0, 75.0, 85.0)):
        clock[0] += wait
        night.results.persons[person] = {"self_reenactment": _task()}
        night.finished(person)
        night.save_if_due()
        steps.append(len(saves))
    # 000 after 30 s: not due; 001 at 70 s: saved (8 s); 002 75 s later: not due (80 s, 10x the save); 003: due
    assert steps == [0, 1, 1, 2]
    assert saves == [(["000", "001"], []), (list(PERSONS), [])]  # only finished persons; no media removed
    clock[0] += 200.0
    night.save_if_due()  # fails: warned, not raised
    assert len(saves) == 3
    night.save(final=True)
    assert saves[-1] == (list(PERSONS), list(PERSONS))  # the final save removes the unreferenced media


class _Renderer:
    """A renderer application's handle as `EvalRun` uses it, counting a person's frames sent and not back (neither
    taken nor cancelled); the first response of a frame whose key is in `lose` raises ActorDiedError (its replica
    died)."""

    def __init__(self, lose=()):
        self.info, self.in_flight, self.most, self.sent, self.lose = self, set(), 0, [], set(lose)

    def options(self, multiplexed_model_id):
        return self

    def remote(self, request=None):
        from cluster.serve.renderer import RenderResult

        if request is None:  # the info call
            return _Sent(self, None, {"resolution": 4})
        self.sent.append(request.key)
        response = _Sent(self, request.key, RenderResult(np.full((4, 4, 3), len(self.sent), np.float32),
                                                         request.key, 1, 0.0))
        self.in_flight.add(response)
        self.most = max(self.most, len(self.in_flight))
        return response


class _Sent:
    def __init__(self, renderer, key, value):
        self.renderer, self.key, self.value = renderer, key, value

    def result(self, timeout_s=None):
        from ray.exceptions import ActorDiedError

        self.renderer.in_flight.discard(self)
        if self.key in self.renderer.lose:
            self.renderer.lose.discard(self.key)
            raise ActorDiedError()
        return self.value

    def cancel(self):
        self.renderer.in_flight.discard(self)


@pytest.mark.parametrize("lose", [(), ("a10",)])
def test_a_persons_frames_are_sent_a_few_batches_at_a_time(tmp_path, lose):
    """Every frame of a person was sent to the renderer at once: at 512 px and thousands of frames, tens of GB of
    requests against a 512 MiB object store. Now at most 4 batches of --renderer.max-batch-size are in flight, the
    next sent as one comes back; frames lost with a replica that died are sent again the same way, and the frames
    come back in order."""
    from cluster.eval_driver.person import EvalRun
    from cluster.eval_driver.tasks import Clip, TaskFrames
    from cluster.serve.renderer import RendererConfig

    config = EvalDriverConfig(runs=tmp_path, shards=tmp_path, stores=tmp_path, reports_root=tmp_path,
                              tasks=("self_reenactment", "novel_view"), metrics=("psnr",),
                              renderer=RendererConfig(max_batch_size=2))
    run = EvalRun(config, tmp_path)
    zero = lambda c: np.zeros((c, 4, 4), np.float32)  # noqa: E731
    conditioning = {"mask": zero(1), "depth": zero(1), "normals": zero(3), "canonical": zero(5),
                    "expression": np.zeros(2, np.float32)}
    keys = {"self_reenactment": [f"a{i:02d}" for i in range(15)], "novel_view": [f"b{i:02d}" for i in range(15)]}
    run.task_frames = lambda person, task, drv, resolution: TaskFrames(person, task, [
        Clip("s", keys[task][:7], [conditioning] * 7, None, None),
        Clip("t", keys[task][7:], [conditioning] * 8, None, None)], True)
    scored = {}
    run.evaluate = lambda frames, rendered: scored.setdefault(
        frames.task, [im for _, images in rendered for im in images]) and TaskResult({}, frames=0)
    renderer = _Renderer(lose)

    run.person(renderer, "000", None)
    assert renderer.most <= 4 * 2, renderer.most  # before: 30, every frame at once
    assert not renderer.in_flight
    sent_last = {k: n for n, k in enumerate(renderer.sent, 1)}  # each frame's image: the number of its last send
    for task, task_keys in keys.items():
        assert [float(im[0, 0, 0]) for im in scored[task]] == [sent_last[k] for k in task_keys]
    frames = keys["self_reenactment"] + keys["novel_view"]
    if lose:  # a00-a09 came back; a10 was lost: it and the frames after it were sent again, a window at a time
        assert renderer.sent[:18] == frames[:18] and renderer.sent[18:] == frames[10:]
    else:
        assert renderer.sent == frames
