"""Ray backend: one Ray task per person attempt, named after the person.

The distributed part is only this: submit ``run_attempt`` as a task that reserves the
job's CPUs/GPUs/memory (so with more persons than resources the tasks queue in Ray's
scheduler) and wait for the tasks; :func:`cluster.attempts.run_attempts`, the loop every
backend shares, resubmits failed attempts (an exception in the target, or a worker that
died) up to ``max_retries`` times. Ray's own task retries are disabled so that the attempt
number is known to the worker and the status file. Ray is joined or started by
:func:`cluster.ray_connect.connect_ray`, as the evaluation driver does.

In the Ray dashboard every task is listed as ``<task_prefix><person>`` (attempt 2+ gets a
``-a<N>`` suffix); ``ray.util.state.list_tasks`` shows the same names.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster import status as _status
from cluster.attempts import AttemptFailed, run_attempts, submit_first
from cluster.bind import LOOPBACK
from cluster.person_job import JobResult, PersonJob, check_jobs, exception_headline, run_attempt
from cluster.preflight import resolve_ray_address
from cluster.ray_connect import EmbeddedRay, connect_ray

log = logging.getLogger(__name__)

#: RayConfig fields that only an embedded Ray uses.
EMBEDDED_ONLY = ("num_cpus", "num_gpus", "object_store_memory_mb", "node_ip_address")


@dataclass
class RayConfig:
    """Configuration of :class:`RayBackend`."""

    status_dir: Path | None = None
    """Directory of per-person status files; must be on a filesystem all Ray nodes share.
    None writes none."""
    address: str | None = None
    """Ray cluster to join (``"host:port"`` of the GCS, or ``"auto"``). None: the cluster in
    ``RAY_ADDRESS`` when set (it is inside ``ray job submit``), else an embedded single-node
    Ray started in this process and shut down at the end. When Ray is already initialised
    in this process, that connection is used (and left open)."""
    num_cpus: int | None = None
    """Embedded Ray only: logical CPUs it offers (None: all cores of this machine)."""
    num_gpus: int | None = None
    """Embedded Ray only: GPUs it offers (None: autodetect)."""
    object_store_memory_mb: int | None = None
    """Embedded Ray only: object store size in MiB (None: Ray's default, 30% of RAM)."""
    node_ip_address: str | None = None
    """Embedded Ray only: IP address its node, workers and dashboard listen on. None: 127.0.0.1,
    so nothing is reachable from the network (see cluster.bind); a LAN address for a
    dashboard reachable from elsewhere."""
    runtime_env: dict[str, Any] | None = None
    """Job-level Ray runtime environment, e.g. ``{"env_vars": {"PYTHONPATH": "/repo"}}`` so
    workers of a joined cluster can import the target module."""
    task_prefix: str = "train-"
    """Prefix of the per-person task names shown in the dashboard."""

    def __post_init__(self) -> None:
        if self.address is not None:
            given = [k for k in EMBEDDED_ONLY if getattr(self, k) is not None]
            if given:
                raise ValueError(f"RayConfig: {', '.join(given)} only apply to an embedded Ray "
                                 f"(address=None), not when joining {self.address!r}")


def _attempt_task(job: PersonJob, attempt: int, status_dir: str | None) -> dict:
    return run_attempt(job, attempt, status_dir)


def max_node_resources() -> dict[str, float]:
    """Largest amount of each resource on any single alive node (a task needs one node)."""
    import ray

    best: dict[str, float] = {}
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        for k, v in node.get("Resources", {}).items():
            best[k] = max(best.get(k, 0.0), float(v))
    return best


def infeasible_reason(job: PersonJob, node_max: dict[str, float]) -> str | None:
    r = job.resources
    needs = {"CPU": r.cpus, "GPU": r.gpus}
    if r.memory_gb is not None:
        needs["memory"] = r.memory_gb * 2**30
    for k, v in needs.items():
        if v > 0 and v > node_max.get(k, 0.0) + 1e-9:
            have = node_max.get(k, 0.0)
            if k == "memory":
                return f"needs {v / 2**30:.1f} GiB memory but the largest Ray node offers {have / 2**30:.1f} GiB"
            return f"needs {v:g} {k} but the largest Ray node offers {have:g}"
    return None


class RayBackend:
    """Runs each person as named Ray tasks with resource reservations and bounded retries."""

    name = "ray"

    def __init__(self, config: RayConfig | None = None):
        self.config = config or RayConfig()
        #: Set by ``run_all``: True when it opened the Ray connection itself (embedded Ray or
        #: joined address) and therefore closed it again (``ray.shutdown``) at the end.
        self.connected = False

    def _connect(self) -> bool:
        import ray

        c = self.config
        given = [k for k in EMBEDDED_ONLY if getattr(c, k) is not None]
        if given and c.address is None and not ray.is_initialized() and resolve_ray_address(None) is not None:
            log.info("joining the Ray cluster in RAY_ADDRESS (%s): the embedded-Ray settings are not used",
                     resolve_ray_address(None))
        embedded = EmbeddedRay(num_cpus=c.num_cpus, num_gpus=c.num_gpus,
                               object_store_memory_mb=c.object_store_memory_mb, bind_host=c.node_ip_address or LOOPBACK)
        return connect_ray(c.address, embedded, runtime_env=c.runtime_env, log_to_driver=True)

    def run_all(self, jobs: list[PersonJob]) -> list[JobResult]:
        import ray

        check_jobs(jobs)
        sdir = str(Path(self.config.status_dir).resolve()) if self.config.status_dir is not None else None
        self.connected = self._connect()
        try:
            return self._run(jobs, sdir)
        finally:
            if self.connected:
                ray.shutdown()

    def _submit(self, job: PersonJob, attempt: int, sdir: str | None):
        import ray

        name = f"{self.config.task_prefix}{job.person}" + (f"-a{attempt}" if attempt > 1 else "")
        opts: dict[str, Any] = dict(name=name, num_cpus=job.resources.cpus, num_gpus=job.resources.gpus,
                                    max_retries=0, retry_exceptions=False)
        if job.resources.memory_gb is not None:
            opts["memory"] = int(job.resources.memory_gb * 2**30)
        if sdir is not None:
            # this driver owns the task (Ray's ownership): its death fails the task and Ray ends the job's workers,
            # embedded Ray or a joined cluster alike; a killed driver's queued persons never start
            _status.write_state(sdir, job.person, "queued", attempt=attempt, restarts=0,
                                message=f"submitted to Ray as task {name}", dies_with_writer=True)
        return ray.remote(_attempt_task).options(**opts).remote(job, attempt, sdir)

    def _run(self, jobs: list[PersonJob], sdir: str | None) -> list[JobResult]:
        results: dict[str, JobResult] = {}
        node_max = max_node_resources()
        feasible = []
        for job in jobs:
            reason = infeasible_reason(job, node_max)
            if reason is not None:
                msg = f"not submitted: {reason}"
                log.error("person %s %s", job.person, msg)
                if sdir is not None:
                    _status.write_state(sdir, job.person, "failed", attempt=0, message=msg)
                results[job.person] = JobResult(job.person, False, 0, error=msg)
                continue
            feasible.append(job)
        runner = _RayAttempts(self, sdir)
        started, unsubmitted = submit_first(feasible, runner)
        results.update(run_attempts(started, runner, sdir, unsubmitted=unsubmitted))
        return [results[j.person] for j in jobs]


class _RayAttempts:
    """:class:`cluster.attempts.AttemptRunner` of Ray tasks."""

    def __init__(self, backend: RayBackend, sdir: str | None):
        self.backend, self.sdir = backend, sdir

    def submit(self, job: PersonJob, attempt: int):
        return self.backend._submit(job, attempt, self.sdir)

    def wait(self, handles: list) -> list:
        import ray

        done, _ = ray.wait(handles, num_returns=1)
        return done

    def outcome(self, job: PersonJob, handle) -> tuple[dict, int]:
        import ray

        try:
            return ray.get(handle), 0
        except Exception as e:  # RayTaskError (target raised) or a dead worker/node
            if isinstance(e, ray.exceptions.RayTaskError) and e.cause is not None:
                # str(e) carries the remote traceback; lead with the target's own error
                raise AttemptFailed(f"{exception_headline(e.cause)}\n{exception_headline(e)[-3000:]}") from e
            raise AttemptFailed(exception_headline(e)) from e

    def cancel(self, handle) -> None:
        import ray

        ray.cancel(handle, force=True)

    def start_time(self, handle) -> None:
        return None
