"""Per-person status files: one small JSON file per person, written atomically.

Protocol (``<status_dir>/<person>.json``)::

    {"person": "017", "state": "running", "attempt": 1, "restarts": 0,
     "step": 1200, "total_steps": 100000, "started_at": 1718000000.0,
     "updated_at": 1718000420.5, "rate_step0": 1000, "rate_t0": 1718000010.0,
     "message": "", "host": "node12", "pid": 4242,
     "pid_space": "<boot id> pid:[4026531836]"}

* ``state``: ``queued`` (submitted, waiting for resources, or requeued after a SLURM
  timeout/preemption), ``running``, ``succeeded``, ``failed``.
* ``attempt``: 1-based attempt number (retries after failures); ``restarts``: SLURM
  requeues within the attempt.
* ``step``/``total_steps``: the trainer's progress (:meth:`StatusReporter.progress`); kept across
  attempts so a resumed run shows where it stands. ``rate_step0``/``rate_t0``: the first
  progress report of the current run, from which the step rate and ETA are computed (so a
  resumed run's rate does not count steps done by earlier runs).
* ``host``/``pid``/``pid_space``/``pid_started_boot``: the process that wrote ``running``
  (:meth:`StatusReporter.set_state`); ``pid_space`` says where that pid means that process: the kernel's boot id
  and the pid namespace (Linux; null elsewhere, and absent from files of older versions, which read all the same);
  ``pid_started_boot`` its start in seconds since boot (a later process on its pid started at another; absent
  from older files, which are judged by their last write).
* A ``running`` file is only as alive as its process: :func:`check_running` shows one whose process is
  gone as ``lost`` (checked by pid where the reader shares the writer's ``pid_space``) and, where the
  process cannot be checked from the reader, one not updated for ``stale_after_s`` as ``stale``.
* ``queuer_host``/``queuer_pid``/``queuer_pid_space``/``queuer_started_at``/``queuer_started_boot``/
  ``dies_with_queuer``: the process that wrote ``queued`` (the driver; a requeued SLURM job itself) with its start
  time (a reused pid is another process): in UNIX seconds, and in seconds since boot (``started_boot``, which a
  change of the system clock does not move; files written before it was recorded are judged by the other), and
  whether the person's job dies with it: true for the local backend (the driver runs it) and Ray
  (the driver owns its tasks; Ray ends a job's tasks with its driver), false for SLURM (sbatch'd jobs outlive
  the driver). :func:`check_running` shows a queued file whose queuer is provably gone and took the job with it
  as ``lost``. Every write sets these anew (a ``queued`` written without them, and every other state, has none):
  files of older versions lack them and stay ``queued``, as before.
* Times are UNIX seconds. Every write is a temp file + rename: readers never see half a file.
* Writes are best effort: a status file that cannot be written (full or read-only disk)
  logs one warning per file and never fails the training or the driver that reports it.

The orchestrator (driver) writes ``queued`` and the final verdict; the process running the
target writes ``running``, progress, and the outcome of its attempt through the
:class:`StatusReporter` that :func:`cluster.person_job.run_attempt` creates for the attempt and
hands to the target (its ``status`` parameter). No module global or environment variable carries
it: a target that starts child processes passes them the reporter's fields explicitly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass, fields, replace
from functools import cache
from pathlib import Path

import psutil

from common.io import atomic_write_json
from common.processes import pid_namespace, started_since_boot

#: The fields that say who wrote a ``queued`` (see the protocol above); every write replaces them.
QUEUER_FIELDS = ("queuer_host", "queuer_pid", "queuer_pid_space", "queuer_started_at", "queuer_started_boot",
                 "dies_with_queuer")

log = logging.getLogger(__name__)
_WARNED: set[Path] = set()


def _best_effort_write(path: Path, rec: dict) -> bool:
    """Write a status record; on an I/O error log it (once per file) and go on: the status is
    informational, and the job it describes must not die of a full disk here."""
    try:
        atomic_write_json(path, rec)
    except OSError as e:
        if path not in _WARNED:
            _WARNED.add(path)
            log.warning("cannot write status file %s (status updates for it are skipped): %s", path, e)
        return False
    _WARNED.discard(path)
    return True


STATES = ("queued", "running", "succeeded", "failed")
#: What :func:`check_running` shows a ``running`` file as when its process is gone (``lost``) or, where
#: it cannot be checked, has not reported for longer than a live training ever stays silent (``stale``); a
#: ``queued`` file whose job died with the process that queued it is ``lost`` too.
JUDGED_STATES = ("lost", "stale")

#: Seconds without an update after which a ``running`` file whose process cannot be checked from the reader
#: (another machine or container) is shown as ``stale``. A live training writes its file at every step (at
#: most once a second); its longest silences are the start of an attempt (loading the base and the data, then
#: the first step, which with --train.compile, the paper preset's default, compiles: minutes on a cold compile
#: cache) and a validation or a checkpoint (seconds to minutes). An hour is several times the longest of them.
STALE_AFTER_S = 3600.0
#: Seconds a process's start time (as the reader computes it) may lie after the writer's last write and
#: still be the writer: the start time is rounded to the clock tick and the boot time to the second.
PID_CLOCK_SLACK_S = 2.0

#: Default minimum seconds between two progress writes (the last step is always written).
DEFAULT_MIN_INTERVAL_S = 1.0


def status_path(status_dir: Path | str, person: str) -> Path:
    return Path(status_dir) / f"{person}.json"


def _read_json(path: Path) -> dict | None:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    return data if isinstance(data, dict) else None


def write_state(
    status_dir: Path | str,
    person: str,
    state: str,
    *,
    attempt: int | None = None,
    restarts: int | None = None,
    message: str | None = None,
    step: int | None = None,
    total_steps: int | None = None,
    dies_with_writer: bool | None = None,
) -> dict:
    """Update ``state`` (and optionally attempt/restarts/message, step/total_steps) of a person's file.

    Progress fields already in the file are kept unless given. Used by the orchestrator and by
    :class:`StatusReporter`. Returns the written record.

    ``dies_with_writer`` (``queued`` only): record this process as the one that queued the person and whether
    the person's job dies with it (True: local and Ray backends, whose driver runs or owns the job; False: a
    SLURM job, which outlives it). Without it no queuer is recorded and the file is never judged ``lost``.
    """
    if state not in STATES:
        raise ValueError(f"unknown state {state!r}; expected one of {STATES}")
    if dies_with_writer is not None and state != "queued":
        raise ValueError(f"dies_with_writer only applies to a 'queued' state, not {state!r}")
    path = status_path(status_dir, person)
    try:
        rec = _read_json(path) or {}
    except (OSError, ValueError):
        rec = {}  # a corrupt file is replaced, not fatal
    now = time.time()
    rec["person"] = person  # the file's person, whatever a copied or hand-edited file said
    if step is not None:
        rec["step"] = int(step)
    if total_steps is not None:
        rec["total_steps"] = int(total_steps)
    rec.setdefault("step", None)
    rec.setdefault("total_steps", None)
    rec.setdefault("started_at", None)
    rec["state"] = state
    rec["updated_at"] = now
    if attempt is not None:
        rec["attempt"] = attempt
    rec.setdefault("attempt", 1)
    if restarts is not None:
        rec["restarts"] = restarts
    rec.setdefault("restarts", 0)
    if message is not None:
        rec["message"] = message
    rec.setdefault("message", "")
    for name in QUEUER_FIELDS:  # they describe the writer of this very `queued`: never inherited from a former one
        rec.pop(name, None)
    if dies_with_writer is not None:
        rec.update({f"queuer_{k}": v for k, v in this_process().items()}, dies_with_queuer=bool(dies_with_writer))
    _best_effort_write(path, rec)
    return rec


_THIS: dict[int, dict] = {}  # pid -> this_process() (a forked child is another process)


def this_process() -> dict:
    """This process as a file records its writer (a queued file its queuer, a Prometheus target file its exporter):
    host, pid, where the pid means it (`pid_space`), start time (``started_at``, UNIX seconds; ``started_boot``,
    seconds since boot: :func:`common.processes.started_since_boot`); judged later by :func:`process_gone`. The
    same every call in a process: psutil computes ``started_at`` from the clock as it is at the call, so after the
    clock was set, a process compared anew with its own record would not be itself."""
    pid = os.getpid()
    if pid not in _THIS:
        try:
            started = psutil.Process().create_time()
        except psutil.Error:  # not readable here: a reused pid is then told apart by the file's write time
            started = None
        _THIS[pid] = {"host": socket.gethostname(), "pid": pid, "pid_space": pid_space(), "started_at": started,
                      "started_boot": started_since_boot()}
    return dict(_THIS[pid])


class StatusReporter:
    """Writes one person's status file from the process that runs the target.

    :func:`cluster.person_job.run_attempt` creates one per attempt and hands it to the target; the
    target hands it on (``jobs.train_person`` to its ``StatusCallback``). A child process of the
    target rebuilds it from ``status_dir``, ``person``, ``attempt`` and ``restarts``, given to it
    explicitly (arguments, its config).
    """

    def __init__(
        self,
        status_dir: Path,
        person: str,
        attempt: int = 1,
        restarts: int = 0,
        min_interval_s: float = DEFAULT_MIN_INTERVAL_S,
    ):
        self.status_dir = Path(status_dir)
        self.person = person
        self.attempt = attempt
        self.restarts = restarts
        #: Progress writes closer together than this are skipped (except the last step).
        self.min_interval_s = min_interval_s
        self._last_write = 0.0

    @property
    def path(self) -> Path:
        return status_path(self.status_dir, self.person)

    def set_state(self, state: str, message: str = "") -> None:
        rec = write_state(self.status_dir, self.person, state, attempt=self.attempt, restarts=self.restarts,
                          message=message)
        if state == "running":
            # a new run: restart the rate clock, keep the step reached so far
            rec["started_at"] = rec["updated_at"]
            rec["host"] = socket.gethostname()
            rec["pid"] = os.getpid()
            rec["pid_space"] = pid_space()
            rec["pid_started_boot"] = this_process()["started_boot"]
            rec["rate_step0"] = None
            rec["rate_t0"] = None
            _best_effort_write(self.path, rec)

    def progress(self, step: int, total_steps: int | None = None, message: str | None = None) -> bool:
        """Record ``step`` (of ``total_steps``); returns True when the file was written."""
        now = time.monotonic()
        final = total_steps is not None and step >= total_steps
        if not final and self._last_write and now - self._last_write < self.min_interval_s:
            return False
        self._last_write = now
        try:
            rec = _read_json(self.path) or {}
        except (OSError, ValueError):
            rec = {}
        t = time.time()
        rec.update(person=self.person, state="running", attempt=self.attempt, restarts=self.restarts,
                   step=int(step), updated_at=t)
        for name in QUEUER_FIELDS:  # those of the `queued` this run ends
            rec.pop(name, None)
        if total_steps is not None:
            rec["total_steps"] = int(total_steps)
        if message is not None:
            rec["message"] = message
        rec.setdefault("message", "")
        rec.setdefault("started_at", t)
        if rec.get("rate_t0") is None:
            rec["rate_step0"], rec["rate_t0"] = int(step), t
        return _best_effort_write(self.path, rec)


# ----------------------------------------------------------------------------------------
# Reading


@dataclass
class PersonStatus:
    """One person's status file, parsed. ``state == "invalid"`` when the file is unreadable."""

    person: str
    state: str
    attempt: int = 1
    restarts: int = 0
    step: int | None = None
    total_steps: int | None = None
    started_at: float | None = None
    updated_at: float | None = None
    rate_step0: int | None = None
    rate_t0: float | None = None
    message: str = ""
    host: str | None = None
    pid: int | None = None
    pid_space: str | None = None
    pid_started_boot: float | None = None
    queuer_host: str | None = None
    queuer_pid: int | None = None
    queuer_pid_space: str | None = None
    queuer_started_at: float | None = None
    queuer_started_boot: float | None = None
    dies_with_queuer: bool | None = None

    @property
    def steps_per_s(self) -> float | None:
        """Step rate of the current run, from its first progress report to the last one."""
        if None in (self.step, self.rate_step0, self.rate_t0, self.updated_at):
            return None
        dt = self.updated_at - self.rate_t0
        ds = self.step - self.rate_step0
        if dt <= 0 or ds <= 0:
            return None
        return ds / dt

    @property
    def eta_s(self) -> float | None:
        """Seconds until ``total_steps`` at the current rate (0 when done; None if unknown)."""
        if self.state == "succeeded":
            return 0.0
        if self.state != "running" or self.total_steps is None or self.step is None:
            return None
        rate = self.steps_per_s
        if rate is None:
            return None
        return max(0.0, (self.total_steps - self.step) / rate)


_INT, _NUMBER, _STR, _BOOL = (int,), (int, float), (str,), (bool,)
#: What each field of a status file must hold: (types, may be null).
_FIELD_TYPES = {"person": (_STR, False), "state": (_STR, False), "attempt": (_INT, False), "restarts": (_INT, False),
                "step": (_INT, True), "total_steps": (_INT, True), "started_at": (_NUMBER, True),
                "updated_at": (_NUMBER, True), "rate_step0": (_INT, True), "rate_t0": (_NUMBER, True),
                "message": (_STR, False), "host": (_STR, True), "pid": (_INT, True),
                "pid_space": (_STR, True), "pid_started_boot": (_NUMBER, True), "queuer_host": (_STR, True),
                "queuer_pid": (_INT, True), "queuer_pid_space": (_STR, True), "queuer_started_at": (_NUMBER, True),
                "queuer_started_boot": (_NUMBER, True),
                "dies_with_queuer": (_BOOL, True)}


def _bad_field(rec: dict) -> str | None:
    """The first field of a status record with a value of the wrong type (a hand-edited file, one
    written by another version), said with what it should be; None when every field fits. Tables
    and progress lines compute with these values: one bad file must not stop them for everyone."""
    for name, (types, nullable) in _FIELD_TYPES.items():
        if name not in rec or (rec[name] is None and nullable):
            continue
        value = rec[name]
        ok = isinstance(value, types) and (types is _BOOL or not isinstance(value, bool))
        if ok and isinstance(value, float) and not math.isfinite(value):
            ok = False
        if not ok:
            expected = " or ".join(t.__name__ for t in types) + (" or null" if nullable else "")
            return f"field {name!r} is {value!r}, expected {expected}"
    return None


def read_status(status_dir: Path | str, persons: list[str] | None = None) -> list[PersonStatus]:
    """The status files in ``status_dir`` (with ``persons``: only theirs, which a run of some persons reads every
    second, not the whole folder), sorted by person (empty if missing). A file that cannot be read, has no valid
    state, a field of the wrong type or a ``person`` field other than its name (a copied file: it would hide that
    person and count the other twice) is listed as ``invalid``, with why; the person is always the file's name."""
    sdir = Path(status_dir)
    if not sdir.is_dir():
        return []
    if persons is not None:
        paths = [path for path in (status_path(sdir, p) for p in sorted(set(persons))) if path.is_file()]
    else:  # a name with a leading dot is the temporary file of an atomic write in flight
        paths = [p for p in sorted(sdir.glob("*.json")) if not p.name.startswith(".")]
    return [_read_one(path) for path in paths]


def _read_one(path: Path) -> PersonStatus:
    person = path.stem
    try:
        rec = _read_json(path)
    except (OSError, ValueError) as e:
        return PersonStatus(person=person, state="invalid", message=f"{path}: {e}")
    if rec is None or rec.get("state") not in STATES:
        return PersonStatus(person=person, state="invalid", message=f"{path}: no valid 'state'")
    problem = _bad_field(rec)
    if problem is None and rec.get("person", person) != person:
        problem = f"field 'person' is {rec['person']!r}, but the file is {person!r}'s"
    if problem is not None:
        return PersonStatus(person=person, state="invalid", message=f"{path}: {problem}")
    known = {f.name for f in fields(PersonStatus)}
    return PersonStatus(**{**{k: v for k, v in rec.items() if k in known}, "person": person})


@cache
def pid_space() -> str | None:
    """Where a pid names the same process as in this one: this boot of this kernel (``boot_id``: another
    machine, or this one after a reboot, is another) and this process's pid namespace (a container sharing
    the host's name sees other pids). None where neither can be read (not Linux): pids are then not checked."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    namespace = pid_namespace()
    return f"{boot} {namespace}" if boot and namespace else None


def _writer_gone(s: PersonStatus) -> bool | None:
    """Whether the process that wrote ``s``'s ``running`` is gone (True) or still runs (False); None when it
    cannot be told from this process (another machine or container, a file without pid or ``pid_space``)."""
    last_write = s.updated_at if s.updated_at is not None else s.started_at
    return process_gone(s.pid, s.pid_space, started_boot=s.pid_started_boot, last_write=last_write)


def _queuer_gone(s: PersonStatus) -> bool | None:
    """As :func:`_writer_gone`, for the process that wrote ``s``'s ``queued``: told from a later one on its pid by
    its recorded start time (by the file's write time where none was recorded)."""
    return process_gone(s.queuer_pid, s.queuer_pid_space, started_at=s.queuer_started_at,
                        started_boot=s.queuer_started_boot, last_write=s.updated_at)


def process_gone(pid: int | None, space: str | None, *, started_at: float | None = None,
                 last_write: float | None = None, started_boot: float | None = None) -> bool | None:
    """Whether process ``pid`` (of ``pid_space`` ``space``) is gone: True, also when its pid now names a process
    that is not it (one started at another time than ``started_boot``, seconds since boot, or where that was not
    recorded ``started_at``, or after ``last_write``); False when it runs; None when this cannot be told from this
    process (another machine or container, no pid or space). ``started_boot`` is exact whatever the clock did
    since (the same ``pid_space`` is the same boot); ``started_at`` and ``last_write`` are UNIX seconds, and the
    start of ``pid`` in UNIX seconds is computed from the clock as it is now: a clock set by more than
    :data:`PID_CLOCK_SLACK_S` since they were written (an NTP step) makes a live process look like another."""
    if pid is None or pid <= 0 or space is None or space != pid_space():
        return None  # no process wrote a pid of 0 or less (a hand-edited file): not checked, not an error
    try:
        proc = psutil.Process(pid)
        created = proc.create_time()
        if proc.status() == psutil.STATUS_ZOMBIE:  # killed, not yet reaped by its parent
            return True
    except psutil.NoSuchProcess:  # ZombieProcess too
        return True
    except psutil.Error:  # not allowed to look: say nothing
        return None
    if started_boot is not None:  # the start it recorded, in clock ticks since boot: any other is a later process
        now_boot = started_since_boot(pid)
        if now_boot is not None:
            return abs(now_boot - started_boot) >= 0.5 / os.sysconf("SC_CLK_TCK")
        if not psutil.pid_exists(pid):  # gone since
            return True
    if started_at is not None:  # the start time it recorded: any other is a later process on the freed pid
        return abs(created - started_at) > PID_CLOCK_SLACK_S
    # The pid freed by the writer and taken by a later process: that one started after the writer's last write.
    return last_write is not None and created > last_write + PID_CLOCK_SLACK_S


def check_running(statuses: list[PersonStatus], now: float | None = None,
                  stale_after_s: float = STALE_AFTER_S) -> list[PersonStatus]:
    """``statuses`` with each ``running`` one whose process is provably gone shown as ``lost`` and, where its
    process cannot be checked from here, each not updated for more than ``stale_after_s`` seconds shown as
    ``stale``, the message saying why (the file is not changed). A process killed (SIGKILL, the OOM killer,
    a node that died) writes no verdict: its file said ``running`` until a later run touched that person.

    A ``queued`` one whose job dies with the process that queued it (``dies_with_queuer``: the local and Ray
    backends' driver) is shown ``lost`` when that process is provably gone: the person never starts. A queued
    file is never ``stale`` (waiting for resources takes as long as it takes), nor judged when its job outlives
    its queuer (SLURM) or the file does not say (older versions)."""
    if not (stale_after_s > 0):  # also NaN
        raise ValueError(f"stale_after_s must be a positive number of seconds, got {stale_after_s}")
    now = time.time() if now is None else now
    out = []
    for s in statuses:
        if s.state == "queued" and s.dies_with_queuer and _queuer_gone(s):
            who = f"process {s.queuer_pid} on {s.queuer_host or 'an unknown host'}"
            out.append(replace(s, state="lost", message=(
                f"the launch that queued it is gone ({who}; killed?): it never starts, launch it again")))
            continue
        if s.state != "running":
            out.append(s)
            continue
        who = f"process {s.pid} on {s.host or 'an unknown host'}" if s.pid is not None else "its process"
        gone = _writer_gone(s)
        if gone:
            out.append(replace(s, state="lost", message=f"gone without a verdict (killed?): {who}"))
        elif gone is None and s.updated_at is not None and now - s.updated_at > stale_after_s:
            out.append(replace(s, state="stale", message=(
                f"no update for {format_duration(now - s.updated_at)}: {who} cannot be checked from here "
                "(gone or hung?)")))
        else:
            out.append(s)
    return out


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def format_status_table(statuses: list[PersonStatus], now: float | None = None, message_width: int = 50) -> str:
    """A fixed-width table: person, state, attempt, step, %, rate, ETA, last update, message."""
    now = time.time() if now is None else now
    header = ("PERSON", "STATE", "ATTEMPT", "STEP", "%", "STEPS/S", "ETA", "UPDATED", "MESSAGE")
    rows = []
    for s in statuses:
        step = "-" if s.step is None else (f"{s.step}/{s.total_steps}" if s.total_steps else str(s.step))
        pct = "-" if not s.total_steps or s.step is None else f"{100.0 * s.step / s.total_steps:.0f}"
        rate = s.steps_per_s
        attempt = str(s.attempt) + (f"+{s.restarts}r" if s.restarts else "")
        age = "-" if s.updated_at is None else format_duration(now - s.updated_at) + " ago"
        msg = (s.message or "").strip().splitlines()
        msg = msg[0] if msg else ""
        if len(msg) > message_width:
            msg = msg[: message_width - 3] + "..."
        rows.append((s.person, s.state, attempt, step, pct, "-" if rate is None else f"{rate:.3g}",
                     format_duration(s.eta_s), age, msg))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    counts = {st: sum(1 for s in statuses if s.state == st) for st in (*STATES, *JUDGED_STATES, "invalid")}
    lines.append("  ".join(f"{k}={v}" for k, v in counts.items() if v) or "no status files")
    return "\n".join(lines)
