"""SLURM backend through submitit: one job per person or one job array for all persons.

Every submitted callable is a :class:`PersonRunner`, a ``submitit.helpers.Checkpointable``.
When SLURM signals the job (USR2, ``signal_delay_s`` before the time limit, or on
preemption), submitit calls ``PersonRunner.checkpoint``, which records the restart in the
status file and returns the *same call*; submitit pickles it and requeues the job. The
target then starts again and continues from its own last checkpoint. Timeouts are requeued
up to ``max_requeues`` times per attempt (submitit's ``slurm_max_num_timeout``; preemptions
are requeued without limit).

Failed attempts (the target raised, the job died, or sbatch refused the submission) are
resubmitted as single jobs up to the person's ``max_retries`` by
:func:`cluster.attempts.run_attempts`, the retry loop every backend shares; a submission that
fails fails only its persons, the others are submitted and run. Job resources (CPUs, GPUs,
memory) come from each ``PersonJob.resources``; persons with identical resources share one array.
"""

from __future__ import annotations

import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster import status as _status
from cluster.attempts import AttemptFailed, cancel_all, run_attempts, submission_error, submit_first
from cluster.person_job import JobResult, PersonJob, Resources, check_jobs, run_attempt

log = logging.getLogger(__name__)

try:  # submitit is a hard dependency of the project; keep this module importable without it
    from submitit.helpers import Checkpointable
except ImportError:  # pragma: no cover
    Checkpointable = object  # type: ignore[misc,assignment]


#: Where submitit's files go when ``SlurmConfig.log_dir`` is not given.
DEFAULT_LOG_DIR = Path("runs/slurm")
#: The most seconds ``sbatch --signal=<sig>@<seconds>`` takes.
SLURM_MAX_SIGNAL_DELAY_S = 65535



#: The most tasks of one job array: SLURM's default MaxArraySize (1001) allows the indices 0..1000, and sbatch
#: refused a larger array whole (every person's first attempt failed and each was then submitted alone). A site with
#: a smaller MaxArraySize has its arrays refused the same way: their persons are submitted one by one.
MAX_ARRAY_TASKS = 1000

@dataclass
class SlurmConfig:
    """Configuration of :class:`SlurmBackend` (cluster-side settings; per-job resources
    come from ``PersonJob.resources``)."""

    status_dir: Path | None = None
    """Directory of per-person status files (must be on a filesystem the nodes share).
    None writes none."""
    log_dir: Path | None = None
    """submitit folder for sbatch scripts, pickles and logs (one subfolder per job id);
    must be on a shared filesystem. None: ``runs/slurm`` (``jobs/launch_all.py``: ``<workdir>/slurm``)."""
    partition: str | None = None
    """SLURM partition (``--partition``); None uses the cluster's default partition."""
    time_min: int = 60
    """Time limit of one run in minutes (``--time``); longer trainings are requeued."""
    array: bool = True
    """True: submit all persons (with equal resources) as one job array; False: one job
    per person, named ``<job_prefix><person>``."""
    array_parallelism: int = 256
    """At most this many array tasks run at once (``--array=0-N%P``)."""
    max_requeues: int = 3
    """Timeout requeues allowed per attempt (submitit ``slurm_max_num_timeout``)."""
    signal_delay_s: int = 90
    """SLURM sends USR2 this many seconds before the time limit (``--signal=USR2@N``);
    the target must be able to stop within this margin. SLURM checks on a ~30 s grid.
    At least 1 and less than ``time_min`` in seconds (more would signal the job as it starts: it
    would requeue at once, every time, until ``max_requeues``)."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run in the sbatch script before the job (e.g. ``source .venv/bin/activate``,
    ``module load cuda``)."""
    additional_parameters: dict[str, str] = field(default_factory=dict)
    """Extra ``#SBATCH`` options, e.g. ``{"account": "avatars", "qos": "high"}``; on the command line
    ``--slurm.additional-parameters account avatars qos high`` (as str: a typed ``Any`` had kept tyro from offering
    the option at all)."""
    job_prefix: str = "train-"
    """Job name prefix (``--job-name``); array jobs are named ``<job_prefix>array``."""
    poll_interval_s: float = 5.0
    """Seconds between two polls of the jobs' state (one ``sacct`` call for all jobs each time): a job
    that dies without a result is noticed within this plus ``result_wait_s``."""
    result_wait_s: float = 15.0
    """How long a job SLURM reports finished may take to show its result file (a slow shared file
    system) before it counts as died without a result (submitit's default: 15 s)."""

    def __post_init__(self) -> None:
        # refused when the command line is parsed (exit code 2), not while jobs are queued or running
        if self.time_min < 1:
            raise ValueError(f"--slurm.time-min must be at least 1 minute, got {self.time_min}")
        if self.array_parallelism < 1:
            raise ValueError(f"--slurm.array-parallelism must be at least 1, got {self.array_parallelism}")
        if self.max_requeues < 0:
            raise ValueError(f"--slurm.max-requeues must be 0 or more, got {self.max_requeues}")
        # NaN passed "<= 0" and failed in time.sleep only while waiting on submitted jobs; inf waited forever
        if not (math.isfinite(self.poll_interval_s) and self.poll_interval_s > 0):
            raise ValueError(f"--slurm.poll-interval-s must be a finite number > 0, got {self.poll_interval_s}")
        if not (math.isfinite(self.result_wait_s) and self.result_wait_s >= 0):
            raise ValueError(f"--slurm.result-wait-s must be a finite number >= 0, got {self.result_wait_s}")
        limit_s = self.time_min * 60
        if not 1 <= self.signal_delay_s < min(limit_s, SLURM_MAX_SIGNAL_DELAY_S + 1):
            raise ValueError(
                f"--slurm.signal-delay-s must be at least 1 and less than the time limit (--slurm.time-min "
                f"{self.time_min}: {limit_s} s; SLURM takes at most {SLURM_MAX_SIGNAL_DELAY_S}), got "
                f"{self.signal_delay_s}: SLURM signals the job that many seconds before its limit, so a larger "
                "delay signals it as soon as it starts and every job requeues at once until --slurm.max-requeues; "
                "0 no earlier than the limit, when it is killed (and sbatch refuses less)")


class PersonRunner(Checkpointable):
    """The callable submitit runs on the node: one attempt of one person's job, resumable."""

    def __init__(self, job: PersonJob, attempt: int, status_dir: str | None):
        self.job = job
        self.attempt = attempt
        self.status_dir = status_dir
        #: Timeout/preemption requeues so far (carried in the pickle across requeues).
        self.restarts = 0

    def __call__(self) -> dict:
        # A requeue that did not go through `checkpoint` (`scontrol requeue`, a node failure with
        # --requeue, an admin's preemption without a signal) restarts the original pickle: SLURM's
        # own counter is then the only record of it.
        self.restarts = max(self.restarts, slurm_restart_count())
        _take_a_killed_requeue_as_done()
        result = run_attempt(self.job, self.attempt, self.status_dir, restarts=self.restarts)
        return {"result": result, "restarts": self.restarts}

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Called by submitit on USR2: requeue this same call; the target resumes itself."""
        from submitit.helpers import DelayedSubmission

        self.restarts += 1
        if self.status_dir is not None:
            _status.write_state(self.status_dir, self.job.person, "queued", attempt=self.attempt,
                                restarts=self.restarts,
                                message=f"requeued after timeout/preemption (restart {self.restarts})",
                                dies_with_writer=False)  # written by the job itself, which SLURM runs again
        return DelayedSubmission(self, *args, **kwargs)


def _take_a_killed_requeue_as_done() -> None:
    """Wrap submitit's USR2 handler (installed before the job's call) so that a requeue killed by itself ends
    the job the way a requeue does.

    ``scontrol requeue``, run by the handler from inside the job, is one of the job's processes: the requeue
    it asks for ends them all with SIGTERM, sometimes before ``scontrol`` itself has exited. submitit then
    raises ``CalledProcessError`` into the training, which is recorded as a failed person, while SLURM runs
    the job again (seen on CI). A ``scontrol requeue`` ended by a signal means the job is being ended
    (requeued, or cancelled at that moment): exit without a result as after a requeue; the status file
    already says ``queued``. A requeue SLURM refuses (a nonzero exit code) still fails the attempt."""
    from submitit.core.job_environment import JobEnvironment, SignalHandler

    sig = JobEnvironment._usr_sig()
    handler = signal.getsignal(sig)
    if not isinstance(getattr(handler, "__self__", None), SignalHandler):
        return  # not inside a submitit job's main thread (or wrapped already)

    def requeue(signum: int, frame: Any) -> None:
        try:
            handler(signum, frame)
        except subprocess.CalledProcessError as e:
            if e.returncode >= 0 or list(e.cmd[:2]) != ["scontrol", "requeue"]:
                raise
            log.warning("%s was ended by signal %d, as the job's own processes are on a requeue: the job is "
                        "being requeued", " ".join(map(str, e.cmd)), -e.returncode)
            sys.exit(-1)  # what submitit does after a requeue that returned

    signal.signal(sig, requeue)


def slurm_restart_count() -> int:
    """How many times SLURM has requeued the job this process runs in (SLURM_RESTART_COUNT; 0 outside SLURM)."""
    try:
        return max(0, int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0))
    except ValueError:
        return 0


_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b.*)$")


def _headline(text: str) -> str | None:
    """The last ``SomeError: message`` line of a traceback text (submitit's FailedJobError)."""
    found = None
    for line in text.splitlines():
        m = _EXC_LINE.match(line)
        if m and not line.startswith("submitit."):
            found = m.group(1)
    return found


def _resource_params(r: Resources) -> dict[str, Any]:
    params: dict[str, Any] = {"cpus_per_task": max(1, math.ceil(r.cpus))}
    if r.gpus > 0:
        params["gpus_per_node"] = math.ceil(r.gpus)
    if r.memory_gb is not None:
        params["mem_gb"] = math.ceil(r.memory_gb)
    return params


class SlurmBackend:
    """Submits persons to SLURM with submitit and waits for all of them."""

    name = "slurm"

    def __init__(self, config: SlurmConfig | None = None):
        self.config = config or SlurmConfig()
        #: SLURM job ids submitted so far, per person (all attempts), for logs and tests.
        self.job_ids: dict[str, list[str]] = {}

    def _executor(self, resources: Resources, name: str):
        import submitit

        c = self.config
        ex = submitit.AutoExecutor(folder=Path(c.log_dir or DEFAULT_LOG_DIR).resolve() / "%j", cluster="slurm",
                                   slurm_max_num_timeout=c.max_requeues)
        params: dict[str, Any] = dict(
            name=name, timeout_min=c.time_min, nodes=1, tasks_per_node=1,
            slurm_signal_delay_s=c.signal_delay_s, slurm_array_parallelism=c.array_parallelism,
            slurm_setup=list(c.setup), **_resource_params(resources))
        if c.partition is not None:
            params["slurm_partition"] = c.partition
        if c.additional_parameters:
            params["slurm_additional_parameters"] = dict(c.additional_parameters)
        ex.update_parameters(**params)
        return ex

    def _queued(self, sdir, job: PersonJob, attempt: int, sub) -> None:
        sub._results_timeout_s = self.config.result_wait_s  # submitit's wait for the result file
        self.job_ids.setdefault(job.person, []).append(sub.job_id)
        if sdir is not None:
            # an sbatch'd job stays in SLURM's queue when this driver dies: never judged lost by the driver's death
            _status.write_state(sdir, job.person, "queued", attempt=attempt, restarts=0,
                                message=f"SLURM job {sub.job_id}", dies_with_writer=False)

    def _submit_one(self, job: PersonJob, attempt: int, sdir):
        ex = self._executor(job.resources, f"{self.config.job_prefix}{job.person}")
        sub = ex.submit(PersonRunner(job, attempt, sdir))
        self._queued(sdir, job, attempt, sub)
        return sub

    def _submit_array(self, resources: Resources, group: list[PersonJob], sdir) -> list[tuple[PersonJob, Any]]:
        """Attempt 1 of ``group`` as one job array (one sbatch call: all of it is submitted or none)."""
        ex = self._executor(resources, f"{self.config.job_prefix}array")
        subs = []
        with ex.batch():
            for job in group:
                subs.append(ex.submit(PersonRunner(job, 1, sdir)))
        for job, sub in zip(group, subs):
            self._queued(sdir, job, 1, sub)
        return list(zip(group, subs))

    def _submit_initial(self, jobs: list[PersonJob], runner: _SlurmAttempts,
                        sdir) -> tuple[list[tuple[PersonJob, Any]], list[tuple[PersonJob, str]]]:
        """Attempt 1 of every job: (submitted with their handle, unsubmitted with the error). A
        submission that raises fails only its persons (a group's array: every person of it); an
        interrupt cancels the jobs already sent to SLURM."""
        if not self.config.array:
            return submit_first(jobs, runner)
        groups: dict[Resources, list[PersonJob]] = {}
        for job in jobs:
            groups.setdefault(job.resources, []).append(job)
        arrays = [(resources, whole[first:first + MAX_ARRAY_TASKS]) for resources, whole in groups.items()
                  for first in range(0, len(whole), MAX_ARRAY_TASKS)]
        started: list[tuple[PersonJob, Any]] = []
        unsubmitted: list[tuple[PersonJob, str]] = []
        try:
            for resources, group in arrays:
                try:
                    started += self._submit_array(resources, group, sdir)
                except Exception as e:  # these persons' attempt 1 failed; the other groups go on
                    unsubmitted += [(job, submission_error(e)) for job in group]
        except BaseException:
            cancel_all(runner, [sub for _, sub in started])
            raise
        return started, unsubmitted

    def run_all(self, jobs: list[PersonJob]) -> list[JobResult]:
        check_jobs(jobs)
        sdir = str(Path(self.config.status_dir).resolve()) if self.config.status_dir is not None else None
        runner = _SlurmAttempts(self, sdir)
        started, unsubmitted = self._submit_initial(jobs, runner, sdir)
        results = run_attempts(started, runner, sdir, unsubmitted=unsubmitted)
        return [results[j.person] for j in jobs]

    @staticmethod
    def _restarts_from_status(sdir, person: str) -> int:
        if sdir is None:
            return 0
        for s in _status.read_status(sdir, [person]):  # its own file: every failure read them all (n^2 at scale)
            return s.restarts
        return 0


class _SlurmAttempts:
    """:class:`cluster.attempts.AttemptRunner` of submitit jobs; failed attempts are resubmitted
    as single jobs."""

    def __init__(self, backend: SlurmBackend, sdir: str | None):
        self.backend, self.sdir = backend, sdir

    def submit(self, job: PersonJob, attempt: int):
        return self.backend._submit_one(job, attempt, self.sdir)

    def wait(self, handles: list) -> list:
        while True:
            # One sacct call for every job per poll: submitit's own watcher backs off to one call a
            # minute and only then notices a job that died without a result (~4 min measured).
            handles[0].watcher.update()
            done = [sub for sub in handles if sub.done()]
            if done:
                return done
            time.sleep(self.backend.config.poll_interval_s)

    def outcome(self, job: PersonJob, sub) -> tuple[dict, int]:
        try:
            out = sub.result()
        except Exception as e:  # FailedJobError / UncompletedJobError
            err = f"{_headline(str(e)) or type(e).__name__} (SLURM job {sub.job_id})\n{e}"
            raise AttemptFailed(err, restarts=self.backend._restarts_from_status(self.sdir, job.person)) from e
        return out["result"], out["restarts"]

    def cancel(self, sub) -> None:
        sub.cancel(check=False)

    def start_time(self, handle) -> None:
        return None
