"""The nightly evaluation results contract: what the renderer writes, what the report reads.

Layout of one nightly run (paths inside results.json are relative to the run folder)::

    <reports_root>/runs/<YYYY-MM-DD>/results.json
    <reports_root>/runs/<YYYY-MM-DD>/results.summary.json  (written with it: the night without its per-frame
                                                            values, see cluster.report.summary)
    <reports_root>/runs/<YYYY-MM-DD>/videos/<person>/<task>-<key>.mp4  (optional; <key>: the evaluation key's start)
    <reports_root>/runs/<YYYY-MM-DD>/thumbnails/<person>/<task>-<key>.png  (optional)

results.json (schema_version 1)::

    {
      "schema_version": 1,
      "run_date": "2025-01-31",
      "meta": {"checkpoint": "...", "git_commit": "..."},          # free-form strings
      "evaluations": {                                              # optional: where each person's numbers come from
        "<person>": {"run_id": "...", "evaluated_at": "2025-01-31T02:10:00+00:00", "key": "<sha256>", ...}
      },
      "persons": {
        "<person>": {
          "<task>": {                                               # e.g. "self_reenactment"
            "frames": 120,
            "metrics": {"psnr": 24.1, "psnr_masked": 27.3, "jod": 6.8, ...},   # means; null = n/a
            "per_frame": {"psnr": [..], ...},                       # optional; JOD has none
            "skipped": {"akd": "AKD skipped: no landmark model given (--landmark-model)"},
            "video": "videos/<person>/<task>-<key>.mp4",            # optional
            "thumbnail": "thumbnails/<person>/<task>-<key>.png"     # optional
          }
        }
      }
    }

Non-finite numbers (PSNR of identical frames) are stored as null because JSON has no inf.

One file per night holds every person evaluated that night: a later run of the same night (a
subset of the persons) replaces the persons it evaluated and keeps the others
(:meth:`RunResults.merged_over`), so nothing measured that night is lost and each person shows
its latest numbers. ``evaluations`` records, per person, the run that measured it and the key of
what it measured (model, base, data, settings), which lets a re-run reuse numbers that are
still up to date instead of rendering again.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from cluster.report.summary import NIGHT_LOCK as NIGHT_LOCK  # public path
from cluster.report.summary import read_summary, results_stamp, summary_night, write_summary
from common.io import DataError, atomic_file
from common.names import PERSON_ID_RE, PERSON_ID_RULE

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"
RUNS_DIR = "runs"


def _finite(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


#: The largest count results.json may hold: every integer up to it is exact in a float and in the page's
#: JavaScript (``Number.MAX_SAFE_INTEGER``); a larger "count" is a damaged file, not a night's frames.
#: The field of a person's ``evaluations`` entry that names the version of what the evaluation computed (the
#: metrics, the videos: ``cluster.eval_driver.uptodate.EVAL_FORMAT``): nights of another version are not comparable
#: in a trend, and the report says so (absent from nights written before it was recorded).
EVAL_FORMAT_KEY = "eval_format"
MAX_COUNT = 2**53 - 1


def _show(x: Any) -> str:
    """A value for an error message, short (a 400-digit integer has no repr past 4300 digits at all)."""
    if isinstance(x, int) and not isinstance(x, bool) and abs(x) > MAX_COUNT:
        return f"an integer of {x.bit_length()} bits"
    text = repr(x)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(x: Any, what: str, source: Path | str) -> float | None:
    """A metric value read from results.json: a JSON number or null; a non-finite one (NaN, Infinity, which
    Python's JSON reader accepts) is null, as the writer stores it. A bool, a string or a number too large for a
    float is bad input, named: ``float()`` took ``true`` for 1.0 and ``"24.1"`` for 24.1 silently, and raised
    OverflowError (no DataError: the report stopped) on a 400-digit integer."""
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise DataError(source, f"{what} must be a number or null, got {_show(x)}")
    try:
        return _finite(x)
    except OverflowError as e:
        raise DataError(source, f"{what} must be a number or null, got {_show(x)} (too large for a float)") from e


def _numbers(values: list, what: str, source: Path | str) -> list[float | None]:
    """The per-frame values ``values`` (a list read from results.json) as :func:`_number` reads each, the item that is
    not a number named by its index in ``what``'s list. Finite floats, nearly all of them, take a short path: a
    night of 300 persons holds millions (reading each through :func:`_number` with its name took seconds a night)."""
    out: list[float | None] = []
    for i, x in enumerate(values):
        out.append(x if type(x) is float and math.isfinite(x) else _number(x, f"{what} item {i}", source))
    return out


def _count(x: Any, what: str, source: Path | str) -> int:
    """A count read from results.json: an integer from 0 to MAX_COUNT (not a bool, a float or Infinity)."""
    if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x <= MAX_COUNT:
        raise DataError(source, f"{what} must be a count (an integer from 0 to {MAX_COUNT}), got {_show(x)}")
    return x


def _check_name(name: str, what: str, source: Path | str) -> str:
    if not isinstance(name, str) or not PERSON_ID_RE.match(name):
        raise DataError(source, f"{what} name {name!r} must be {PERSON_ID_RULE} (it becomes a file name)")
    return name


def check_person_name(name: str, source: Path | str) -> str:
    """``name`` when it can be a person of results.json (it becomes a file name), else DataError naming ``source``."""
    return _check_name(name, "person", source)


def _object(value: Any, what: str, source: Path | str) -> dict:
    """An optional JSON object field (absent or null: empty); any other type is bad input, named."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DataError(source, f"{what} must be an object, got {type(value).__name__}")
    return value


def _check_relpath(p: Any, source: Path | str, what: str = "path") -> str | None:
    if p is None:
        return None
    if not isinstance(p, str) or not p:
        raise DataError(source, f"{what} must be a path relative to the run folder or null, got {_show(p)}")
    pp = PurePosixPath(p)
    if pp.is_absolute() or ".." in pp.parts:
        raise DataError(source, f"{what} {p!r} must be relative to the run folder (no '..', not absolute)")
    return str(pp)


def parse_run_date(text: str, source: Path | str = "<run>") -> dt.date:
    """The date of a run named ``YYYY-MM-DD``, exactly: the nights are ordered by their folders' names, and
    other forms ``date.fromisoformat`` accepts (``20250131``, ``2025-W05-5``) would sort out of place."""
    try:
        date = dt.date.fromisoformat(text)
    except (TypeError, ValueError) as e:
        raise DataError(source, f"run date {text!r} is not YYYY-MM-DD") from e
    if date.isoformat() != text:
        raise DataError(source, f"run date {text!r} is not YYYY-MM-DD")
    return date


@dataclass
class TaskResult:
    """Metrics of one person on one task (one rendered video vs. its ground truth).

    metrics: metric name ("psnr", "psnr_masked", ...) -> mean over frames (None = not finite).
    per_frame: metric name -> per-frame values (optional; video-level metrics like JOD have none).
    skipped: metric name -> human-readable reason it was not computed.
    frames: number of evaluated frames.
    video: comparison mp4 relative to the run folder, or None.
    thumbnail: PNG/JPEG relative to the run folder, or None (the report then uses the video's first frame).
    """

    metrics: dict[str, float | None]
    per_frame: dict[str, list[float | None]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    frames: int = 0
    video: str | None = None
    thumbnail: str | None = None

    @property
    def failed(self) -> bool:
        """The task failed (its data or rendering): the driver marks it ``skipped["task"] = "failed: <reason>"``;
        a task that does not apply to the person (``skipped["task"]`` without "failed") is not a failure."""
        return self.skipped.get("task", "").startswith("failed")

    @classmethod
    def from_evaluation(cls, evaluation: dict, video: str | None = None, thumbnail: str | None = None) -> "TaskResult":
        """Build from `avatars.evaluation.Evaluator.evaluate_video` output."""
        metrics = {k: _finite(v["mean"]) for k, v in evaluation["metrics"].items()}
        per_frame = {k: [_finite(x) for x in v["per_frame"]]
                     for k, v in evaluation["metrics"].items() if v["per_frame"] is not None}
        return cls(metrics, per_frame, dict(evaluation.get("skipped", {})), int(evaluation["frames"]), video, thumbnail)

    def to_json(self) -> dict:
        return {
            "frames": self.frames,
            "metrics": {k: _finite(v) for k, v in self.metrics.items()},
            "per_frame": {k: [_finite(x) for x in v] for k, v in self.per_frame.items()},
            "skipped": {k: str(v) for k, v in self.skipped.items()},  # texts, as from_json reads them
            "video": self.video,
            "thumbnail": self.thumbnail,
        }

    @classmethod
    def from_json(cls, obj: Any, source: Path | str, where: str = "task", per_frame: bool = True) -> "TaskResult":
        """One task's entry of results.json; any malformed value is a DataError naming ``source`` and the field
        (``where``: the person and task, then the field and metric). ``per_frame`` False: the per-frame values are
        checked as well (a malformed one is the same error) but not kept (``per_frame`` is empty): a past night in
        the report's trends needs only the means, and the per-frame values are nearly all of a night's size."""
        if not isinstance(obj, dict) or not isinstance(obj.get("metrics"), dict):
            raise DataError(source, f"{where}: each task needs a 'metrics' object")
        frames = _object(obj.get("per_frame"), f"{where}: 'per_frame'", source)
        if not all(isinstance(v, list) for v in frames.values()):
            raise DataError(source, f"{where}: 'per_frame' must be an object metric -> list of numbers")
        skipped = _object(obj.get("skipped"), f"{where}: 'skipped'", source)
        for k, v in skipped.items():
            if not isinstance(v, str):
                raise DataError(source, f"{where}: 'skipped' {k!r} must be a text (the reason), got {_show(v)}")
        metrics = {k: _number(v, f"{where}: metric {k!r}", source) for k, v in obj["metrics"].items()}
        values = {k: _numbers(v, f"{where}: 'per_frame' {k!r}", source) for k, v in frames.items()}
        return cls(
            metrics=metrics,
            per_frame=values if per_frame else {},
            skipped=dict(skipped),
            frames=_count(obj.get("frames", 0), f"{where}: 'frames'", source),
            video=_check_relpath(obj.get("video"), source, f"{where}: 'video'"),
            thumbnail=_check_relpath(obj.get("thumbnail"), source, f"{where}: 'thumbnail'"),
        )

    @classmethod
    def unreadable(cls, error: DataError) -> "TaskResult":
        """A failed task in place of an entry of results.json that does not read (``error``): the night's other
        entries are kept (:meth:`RunResults.load` with ``salvage``), this one is shown and counted as failed."""
        return cls(metrics={}, skipped={"task": f"failed: its entry in {error.path} does not read: {error.problem}"})


@dataclass
class RunResults:
    """All persons' results of one nightly run; written by the renderer, read by the report.

    run_date: the night's date "YYYY-MM-DD"; also the run folder's name.
    persons: person -> task -> TaskResult.
    meta: free-form strings shown in the report header (checkpoint, git commit, host, ...).
    evaluations: person -> free-form strings on where its numbers come from (run_id, evaluated_at, key).
    schema_version: SCHEMA_VERSION this file was written with.
    damaged: what :meth:`load` with ``salvage`` found malformed and left out or marked failed (DataError texts,
        each naming the file, the person and the field); not written to the file.
    """

    run_date: str
    persons: dict[str, dict[str, TaskResult]]
    meta: dict[str, str] = field(default_factory=dict)
    evaluations: dict[str, dict[str, str]] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    damaged: list[str] = field(default_factory=list, compare=False)

    def to_json(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "run_date": self.run_date,
            "meta": dict(self.meta),
            "evaluations": {p: dict(e) for p, e in self.evaluations.items()},
            "persons": {p: {t: r.to_json() for t, r in tasks.items()} for p, tasks in self.persons.items()},
        }

    def merged_over(self, older: "RunResults | None") -> "RunResults":
        """This run's persons over ``older``'s (same night): persons evaluated now replace their
        older entries, the others are kept with their own provenance. Meta is this run's."""
        if older is None:
            return self
        persons = {**{p: t for p, t in older.persons.items() if p not in self.persons}, **self.persons}
        evaluations = {**{p: e for p, e in older.evaluations.items() if p not in self.persons}, **self.evaluations}
        return RunResults(self.run_date, dict(sorted(persons.items())), dict(self.meta),
                          {p: evaluations[p] for p in sorted(evaluations) if p in persons}, self.schema_version)

    @classmethod
    def from_json(cls, obj: Any, source: Path | str, salvage: bool = False, per_frame: bool = True) -> "RunResults":
        """The results in ``obj`` (read from ``source``); a malformed value is a DataError naming ``source`` and
        the field. ``salvage``: a malformed entry of one person does not refuse the others: a task entry that
        does not read becomes a failed task (:meth:`TaskResult.unreadable`), a person whose name or entry is
        malformed is left out, each recorded in ``damaged``; what is not a person's (the version, the date,
        'meta', 'evaluations') is still a DataError. ``per_frame`` False: the per-frame values are checked but not
        kept (see :meth:`TaskResult.from_json`)."""
        if not isinstance(obj, dict):
            raise DataError(source, "results must be a JSON object")
        version = obj.get("schema_version")
        if type(version) is not int or version != SCHEMA_VERSION:  # not true or 1.0, which equal 1
            raise DataError(source, f"schema_version {version!r} is not supported (expected {SCHEMA_VERSION})")
        run_date = str(obj.get("run_date", ""))
        parse_run_date(run_date, source)
        persons = obj.get("persons")
        if not isinstance(persons, dict) or not persons:
            raise DataError(source, "'persons' must be a non-empty object person -> task -> result")
        parsed: dict[str, dict[str, TaskResult]] = {}
        damaged: list[str] = []
        for person, tasks in persons.items():
            try:
                parsed[person] = _person_tasks(person, tasks, source, damaged if salvage else None, per_frame)
            except DataError as e:
                if not salvage:
                    raise
                damaged.append(f"{e} (person left out)")
        if not parsed:
            raise DataError(source, f"no person's entry reads: {'; '.join(damaged)}")
        meta = {str(k): str(v) for k, v in _object(obj.get("meta"), "'meta'", source).items()}
        evaluations = obj.get("evaluations") or {}
        if not isinstance(evaluations, dict) or not all(isinstance(e, dict) for e in evaluations.values()):
            raise DataError(source, "'evaluations' must be an object person -> {name: text}")
        evaluations = {_check_name(p, "person", source): {str(k): str(v) for k, v in e.items()}
                       for p, e in evaluations.items()}
        return cls(run_date=run_date, persons=parsed, meta=meta, evaluations=evaluations, schema_version=version,
                   damaged=damaged)

    @classmethod
    def load(cls, path: Path, salvage: bool = False, per_frame: bool = True) -> "RunResults":
        """The results file ``path``; anything malformed is a DataError naming it (``salvage``, ``per_frame``: see
        from_json)."""
        path = Path(path)
        try:
            obj = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise DataError(path, "results file does not exist") from e
        except UnicodeDecodeError as e:  # a bad copy: reported like any malformed file, not a crash of the report
            raise DataError(path, f"not UTF-8 text: {e}") from e
        except (ValueError, RecursionError) as e:  # JSONDecodeError; an integer of over 4300 digits; deep nesting
            raise DataError(path, f"not valid JSON: {type(e).__name__}: {str(e)[:200]}") from e
        except OSError as e:  # unreadable (permissions, a folder of that name): one night's file, not the report
            raise DataError(path, f"unreadable: {e}") from e
        results = cls.from_json(obj, path, salvage, per_frame)
        if path.parent.name != results.run_date:
            raise DataError(path, f"run_date {results.run_date} does not match its folder name {path.parent.name}")
        return results

    @classmethod
    def load_summary(cls, path: Path) -> "RunResults | None":
        """The night of the results file ``path`` without its per-frame values, read from its summary
        (:mod:`cluster.report.summary`): what :meth:`load` with ``salvage`` and ``per_frame`` False reads of it, or
        None when the summary is not usable: none, damaged, not matching ``path`` (written since), or a night that
        does not read as a whole or has a malformed entry (all read in full, by :meth:`load`, which names them)."""
        path = Path(path)
        night = read_summary(path)
        if night is None:
            return None
        try:
            results = cls.from_json(night, path, per_frame=False)  # no salvage: a damaged night is read in full
            if path.parent.name != results.run_date:
                raise DataError(path, f"run_date {results.run_date} does not match its folder name")
            with open(path, "rb"):  # the night's file can be read (not a folder, permissions), as by load
                pass
        except (DataError, OSError) as e:
            log.info("%s: not read from its summary (%s); reading it in full", path, e)
            return None
        return results

    def save(self, reports_root: Path) -> Path:
        """Atomically write `<reports_root>/runs/<run_date>/results.json` and return its path, then its summary
        beside it (:mod:`cluster.report.summary`, stamped with the file written: a save killed between the two, or
        another writer's results.json, leaves a summary that does not match, which is not used); a summary not
        written (a full disk) is a warning: the report then reads the night in full."""
        for person, tasks in self.persons.items():
            _check_name(person, "person", "<RunResults>")
            for task in tasks:
                _check_name(task, "task", "<RunResults>")
        path = run_dir(reports_root, self.run_date) / RESULTS_FILE
        obj = self.to_json()
        with atomic_file(path) as tmp:
            tmp.write_bytes((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
            stamp = results_stamp(tmp)  # the renamed file keeps its size and time
        try:  # in the file's order: averages over tasks add them in the order they are read
            write_summary(path, json.loads(json.dumps(summary_night(obj), sort_keys=True)), stamp)
        except OSError as e:
            log.warning("%s: summary not written (%s); the report reads the night in full", path, e)
        return path


def _person_tasks(person: Any, tasks: Any, source: Path | str, damaged: list[str] | None,
                  per_frame: bool = True) -> dict[str, TaskResult]:
    """One person's entry of results.json; with ``damaged`` (salvage), a task that does not read is a failed
    task and its error is appended there, else the first malformed value is raised (``per_frame``: see
    :meth:`TaskResult.from_json`)."""
    _check_name(person, "person", source)
    if not isinstance(tasks, dict) or not tasks:
        raise DataError(source, f"person {person!r} has no tasks")
    out = {}
    for task, entry in tasks.items():
        _check_name(task, "task", source)
        try:
            out[task] = TaskResult.from_json(entry, source, f"person {person!r}, task {task!r}", per_frame)
        except DataError as e:
            if damaged is None:
                raise
            damaged.append(f"{e} (task marked failed)")
            out[task] = TaskResult.unreadable(e)
    return out


def run_dir(reports_root: Path, run_date: str) -> Path:
    """The folder of one nightly run; the renderer writes videos/ and thumbnails/ inside it."""
    parse_run_date(run_date)
    return Path(reports_root) / RUNS_DIR / run_date


def list_runs(reports_root: Path) -> list[Path]:
    """results.json files of all dated runs under `<reports_root>/runs`, oldest first."""
    root = Path(reports_root) / RUNS_DIR
    found = []
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            parse_run_date(d.name)
        except DataError:
            continue
        if (d / RESULTS_FILE).is_file():
            found.append(d / RESULTS_FILE)
    return found
