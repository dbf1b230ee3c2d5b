"""A night's summary: what the report's trends need of a past night, without its per-frame values.

Beside each night's results.json (:data:`SUMMARY_FILE`), written with it by :meth:`RunResults.save
<cluster.report.schema.RunResults.save>`::

    {
      "version": 1,
      "results": {"size": 133000000, "mtime_ns": 1738290000000000000},   # the results.json it summarises
      "digest": "<sha256 of 'night' as written>",
      "night": {"schema_version": 1, "run_date": ..., "meta": ..., "evaluations": ...,
                "persons": {"<person>": {"<task>": {"frames", "metrics", "skipped", "video", "thumbnail"}}}}
    }

"night" is results.json without the per-frame values (nearly all of its size: 133 MB a night of 300 persons, a
summary of it well under a megabyte), in the file's order. The report reads a past night from it
(:meth:`RunResults.load_summary <cluster.report.schema.RunResults.load_summary>`) only when it matches: its
results.json has the size and modification time recorded (a results.json written since, by a version without
summaries, by hand or by a save killed before its summary, has not), its digest matches and it reads without a
malformed value; otherwise the night is read in full, as before summaries.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable

from common.io import atomic_write_bytes
from common.locks import AlreadyRunning, exclusive

log = logging.getLogger(__name__)

SUMMARY_FILE = "results.summary.json"
SUMMARY_VERSION = 1
#: The lock on a night's folder under which its results.json (and the files beside it that index or summarise it)
#: are written.
NIGHT_LOCK = ".results.lock"


def results_stamp(path: Path) -> dict[str, int]:
    """What tells whether ``path`` (a results.json) is the file a summary was written from: its size and
    modification time (a rewrite changes them; a copy that keeps the times, ``cp -a``, keeps the summary valid)."""
    st = Path(path).stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def read_stamped(results_path: Path, name: str, version: int, what: str) -> dict | None:
    """The JSON object ``name`` beside the results.json ``results_path`` (its summary, the evaluation's key index)
    when it is usable: it reads, is of ``version`` and records the :func:`results_stamp` of results.json as it is
    now; None otherwise (said in the log; the caller then reads the night in full). Its own fields are the
    caller's to check."""
    results_path = Path(results_path)
    path = results_path.with_name(name)
    try:
        obj = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        log.warning("%s: unreadable %s (%s); reading %s in full", path, what, e, results_path)
        return None
    stamp = obj.get("results") if isinstance(obj, dict) else None
    if (not isinstance(obj, dict) or type(obj.get("version")) is not int or obj["version"] != version
            or not isinstance(stamp, dict) or set(stamp) != {"size", "mtime_ns"}
            or not all(type(v) is int for v in stamp.values())):
        log.warning("%s: malformed %s (expected {'version': %d, 'results': {'size', 'mtime_ns'}, ...}); reading %s "
                    "in full", path, what, version, results_path)
        return None
    try:
        if stamp != results_stamp(results_path):
            log.info("%s: written since its %s; reading it in full", results_path, what)
            return None
    except OSError:  # results.json is gone or unreadable: its full read says so
        return None
    return obj


def write_if_unchanged(results_path: Path, stamp: dict[str, int], write: Callable[[], None], what: str) -> None:
    """``write()`` a file beside the results.json ``results_path`` of a night read in full (its summary, the
    evaluation's key index), so that later readers need not read it in full: under the night's lock, not waiting
    for an evaluation saving it, and only when results.json is still the file read (``stamp``, taken before it was
    read). The runs folder is the evaluation's: a reader that cannot write there (another user's, read-only) or
    finds the lock held says so in the log only."""
    try:
        with exclusive(Path(results_path).with_name(NIGHT_LOCK), "saving the night's results"):
            if results_stamp(results_path) == stamp:
                write()
    except (AlreadyRunning, OSError) as e:
        log.info("%s: no %s written (%s); the night is read in full next time too", results_path, what, e)


def summary_night(results: dict) -> dict:
    """The summary's "night" of the results object ``results`` (as :meth:`RunResults.to_json` makes it): the same
    object without the tasks' per-frame values."""
    return {**results, "persons": {p: {t: {k: v for k, v in entry.items() if k != "per_frame"}
                                       for t, entry in tasks.items()} for p, tasks in results["persons"].items()}}


def _digest(night: Any) -> str:
    return hashlib.sha256(json.dumps(night, allow_nan=False).encode()).hexdigest()


def write_summary(results_path: Path, night: dict, stamp: dict[str, int]) -> None:
    """Atomically write the summary ``night`` (:func:`summary_night`, in the order of results.json's keys) of the
    results.json ``results_path`` whose :func:`results_stamp` is ``stamp`` beside it."""
    obj = {"version": SUMMARY_VERSION, "results": stamp, "digest": _digest(night), "night": night}
    atomic_write_bytes(Path(results_path).with_name(SUMMARY_FILE), (json.dumps(obj, allow_nan=False) + "\n").encode())


def read_summary(results_path: Path) -> dict | None:
    """The summary's "night" of ``results_path`` (a results.json), or None when it has no usable summary: none (a
    night saved by a version without summaries), one that does not read or whose fields or digest are not right
    (said in the log), or one whose results.json has been written since (:func:`read_stamped`)."""
    obj = read_stamped(results_path, SUMMARY_FILE, SUMMARY_VERSION, "summary")
    if obj is None:
        return None
    path = Path(results_path).with_name(SUMMARY_FILE)
    if not isinstance(obj.get("night"), dict) or not isinstance(obj.get("digest"), str):
        log.warning("%s: malformed summary (expected 'night' and 'digest'); reading %s in full", path, results_path)
        return None
    try:
        digest = _digest(obj["night"])
    except (ValueError, RecursionError):  # non-finite numbers
        digest = None
    if digest != obj["digest"]:
        log.warning("%s: the summary does not match its digest (damaged or edited); reading %s in full", path,
                    results_path)
        return None
    return obj["night"]
