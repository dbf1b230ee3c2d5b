"""What one per-person job is, independent of where it runs.

A :class:`PersonJob` names an importable target ``"package.module:function"`` that every
backend calls as ``fn(person, **kwargs)`` and that returns a JSON-able dict. A target that
declares a ``status`` parameter also gets the attempt's :class:`cluster.status.StatusReporter`
(None when the run keeps no status files) to report its progress through. The target owns
its own checkpoint/resume logic: a backend may start it again for the same person after a
failure (bounded by ``max_retries``) or after a SLURM timeout/preemption requeue, and the
target is expected to continue from its last checkpoint.

:func:`run_attempt` is the single place where a target is actually called. It is shared by
all backends (local, Ray task, SLURM job), so the status-file protocol
(:mod:`cluster.status`) behaves the same everywhere.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from cluster import status as _status
from common.names import PERSON_ID_RE, PERSON_ID_RULE

#: The per-person training entry point (``jobs/train_person.py``'s ``run``).
DEFAULT_TARGET = "jobs.train_person:run"
#: Person ids become file names, Ray task names and SLURM job names: keep them simple (the capture contract's rule).
PERSON_RE = PERSON_ID_RE
#: The parameter through which a target receives its attempt's :class:`cluster.status.StatusReporter`.
STATUS_PARAM = "status"


@dataclass(frozen=True)
class Resources:
    """What one attempt of a job reserves on the cluster while it runs."""

    cpus: float = 1.0
    """CPU cores (Ray: ``num_cpus``, may be fractional; SLURM: ``--cpus-per-task``, rounded up)."""
    gpus: float = 0.0
    """GPUs (Ray: ``num_gpus``, may be fractional; SLURM: ``--gpus-per-node``, rounded up)."""
    memory_gb: float | None = None
    """Host memory in GiB (Ray: the ``memory`` resource; SLURM: ``--mem``). None: no reservation."""

    def __post_init__(self) -> None:
        if not (self.cpus > 0 and math.isfinite(self.cpus)):
            raise ValueError(f"Resources.cpus must be a positive number, got {self.cpus!r}")
        if not (self.gpus >= 0 and math.isfinite(self.gpus)):
            raise ValueError(f"Resources.gpus must be >= 0, got {self.gpus!r}")
        if self.memory_gb is not None and not (self.memory_gb > 0 and math.isfinite(self.memory_gb)):
            raise ValueError(f"Resources.memory_gb must be positive or None, got {self.memory_gb!r}")


@dataclass(frozen=True)
class PersonJob:
    """One person's job: which function to call, with what, on which resources."""

    person: str
    """Person id (:data:`shards.contract.PERSON_ID_RULE`); names the status file and the job."""
    target: str
    """Importable target ``"package.module:function"``, called as ``fn(person, **kwargs)``
    and returning a JSON-able dict."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the target; must be picklable (Ray/SLURM ship them to workers).
    ``status`` is reserved: :func:`run_attempt` passes the attempt's status reporter as it."""
    resources: Resources = field(default_factory=Resources)
    """Resources each attempt reserves; with more jobs than resources, jobs queue."""
    max_retries: int = 1
    """How many times a failed attempt (exception, killed worker, failed SLURM job) is
    started again. 0 = run once. SLURM timeout/preemption requeues are not counted here."""

    def __post_init__(self) -> None:
        if not PERSON_RE.match(self.person):
            raise ValueError(f"invalid person id {self.person!r}: use {PERSON_ID_RULE}")
        parse_target(self.target)
        if STATUS_PARAM in self.kwargs:
            raise ValueError(f"{self.person}: kwargs must not contain {STATUS_PARAM!r} (run_attempt passes the "
                             "attempt's status reporter as it)")
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"{self.person}: max_retries must be an int >= 0, got {self.max_retries!r}")


@dataclass
class JobResult:
    """The final outcome of one person's job, after all retries."""

    person: str
    """Person id."""
    ok: bool
    """True when the last attempt returned normally."""
    attempts: int
    """Attempts started (1 + retries used); at most ``1 + max_retries``."""
    result: dict | None = None
    """The target's return value on success, else None."""
    error: str | None = None
    """Error text of the last failed attempt (exception + traceback tail), else None."""
    duration_s: float = 0.0
    """Wall seconds from the first submission to the final outcome (includes queueing)."""
    restarts: int = 0
    """SLURM timeout/preemption requeues of the last attempt (0 on other backends)."""

    def to_json(self) -> dict:
        return asdict(self)


def parse_target(target: str) -> tuple[str, str]:
    """Split ``"package.module:function"``; raise ValueError with the expected form."""
    module, sep, name = target.partition(":")
    if not sep or not module or not name or not name.isidentifier():
        raise ValueError(f"target {target!r} must look like 'package.module:function'")
    return module, name


def resolve_target(target: str) -> Callable[..., Any]:
    """Import the target function. Raises ImportError/AttributeError naming the target."""
    module_name, name = parse_target(target)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"cannot import module {module_name!r} of target {target!r}: {e}") from e
    try:
        fn = getattr(module, name)
    except AttributeError:
        raise AttributeError(f"module {module_name!r} has no function {name!r} (target {target!r})") from None
    if not callable(fn):
        raise TypeError(f"target {target!r} is not callable")
    return fn


def takes_status(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` declares a ``status`` parameter that can be passed by keyword."""
    try:
        param = inspect.signature(fn).parameters.get(STATUS_PARAM)
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    return param is not None and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)


#: The most of an error's first line (its message) kept in status files, results, summaries and logs: a target's
#: exception with a megabyte message was copied uncut into each (a 5 MB status file, summary.json and log line).
MESSAGE_CHARS = 1000


def short_error(text: str, limit_chars: int = 4000) -> str:
    """An error's text (a headline, then a traceback) with its first line cut to :data:`MESSAGE_CHARS` and the rest
    to its last ``limit_chars`` characters."""
    head, newline, rest = text.partition("\n")
    if len(head) > MESSAGE_CHARS + 40:  # room for the note: a text cut once is not cut again
        head = f"{head[:MESSAGE_CHARS]}... ({len(head)} characters)"
    if len(rest) > limit_chars:
        rest = "...\n" + rest[-limit_chars:]
    return head + newline + rest


def exception_headline(exc: BaseException) -> str:
    """``Type: message``; an exception whose ``__str__`` raises is named by its type: formatting a person's error
    must not fail the job loop in place of the person (its status file stayed ``running``)."""
    try:
        message = str(exc)
    except Exception as e:
        message = f"<str() of this {type(exc).__name__} raised {type(e).__name__}>"
    return f"{type(exc).__name__}: {message}"


def format_exception(exc: BaseException, limit_chars: int = 4000) -> str:
    """``Type: message`` followed by the traceback tail, short enough for a status file (:func:`short_error`)."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))  # it survives a bad __str__
    return short_error(f"{exception_headline(exc)}\n{text}", limit_chars)


def run_attempt(
    job: PersonJob,
    attempt: int,
    status_dir: Path | str | None,
    restarts: int = 0,
) -> dict:
    """Call the job's target once, with the status file kept up to date.

    Writes ``running`` before the call, ``succeeded`` after it, ``failed`` (with the error
    text) when it raises, and re-raises. A target with a ``status`` parameter gets this
    attempt's :class:`cluster.status.StatusReporter` (None without ``status_dir``) to write its
    progress through. Returns the target's result, which must be a JSON-able dict (checked
    here, so a bad return value fails the job instead of the driver).
    """
    reporter = None
    if status_dir is not None:
        reporter = _status.StatusReporter(Path(status_dir), job.person, attempt=attempt, restarts=restarts)
        reporter.set_state("running", message=f"attempt {attempt}" + (f", restart {restarts}" if restarts else ""))
    try:
        fn = resolve_target(job.target)
        kwargs = {**job.kwargs, STATUS_PARAM: reporter} if takes_status(fn) else job.kwargs
        result = fn(job.person, **kwargs)
        if not isinstance(result, dict):
            raise TypeError(f"target {job.target} returned {type(result).__name__}, expected a dict")
        json.dumps(result)  # JSON-able or TypeError
    except Exception as e:  # not BaseException: SystemExit is submitit's requeue exit
        if reporter is not None:
            reporter.set_state("failed", message=format_exception(e, limit_chars=1500))
        raise
    if reporter is not None:
        reporter.set_state("succeeded", message="")
    return result


def check_jobs(jobs: list[PersonJob]) -> None:
    """Reject an empty job list, non-PersonJob items and duplicate persons."""
    if not jobs:
        raise ValueError("no jobs to run")
    seen: set[str] = set()
    for j in jobs:
        if not isinstance(j, PersonJob):
            raise TypeError(f"expected PersonJob, got {type(j).__name__}")
        if j.person in seen:
            raise ValueError(f"person {j.person!r} appears twice in the job list")
        seen.add(j.person)
