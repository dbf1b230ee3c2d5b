"""Ray backend: one Ray task per person attempt, named after the person.

The distributed part is only this: submit ``run_attempt`` as a task that reserves the
job's CPUs/GPUs/memory (so with more persons than resources the tasks queue in Ray's
scheduler), wait for results, and resubmit failed attempts (an exception in the target, or
a worker that died) up to ``max_retries`` times. Ray's own task retries are disabled so
that the attempt number is known to the worker and the status file.

In the Ray dashboard every task is listed as ``<task_prefix><person>`` (attempt 2+ gets a
``-a<N>`` suffix); ``ray.util.state.list_tasks`` shows the same names.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster import status as _status
from cluster.bind import LOOPBACK, embedded_ray_bind
from cluster.person_job import JobResult, PersonJob, check_jobs, run_attempt
from cluster.preflight import resolve_ray_address

log = logging.getLogger(__name__)


@dataclass
class RayConfig:
    """Configuration of :class:`RayBackend`."""

    #: Directory of per-person status files; must be on a filesystem all Ray nodes share.
    #: None writes none.
    status_dir: Path | None = None
    #: Ray cluster to join (``"host:port"`` of the GCS, or ``"auto"``). None: the cluster in
    #: ``RAY_ADDRESS`` when set (it is inside ``ray job submit``), else an embedded single-node
    #: Ray started in this process and shut down at the end. When Ray is already initialised
    #: in this process, that connection is used (and left open).
    address: str | None = None
    #: Embedded Ray only: logical CPUs it offers (None: all cores of this machine).
    num_cpus: int | None = None
    #: Embedded Ray only: GPUs it offers (None: autodetect).
    num_gpus: int | None = None
    #: Embedded Ray only: object store size in MiB (None: Ray's default, 30% of RAM).
    object_store_memory_mb: int | None = None
    #: Embedded Ray only: IP address its node, workers and dashboard listen on. None: 127.0.0.1,
    #: so nothing is reachable from the network (see cluster.bind); a LAN address for a
    #: dashboard reachable from elsewhere.
    node_ip_address: str | None = None
    #: Job-level Ray runtime environment, e.g. ``{"env_vars": {"PYTHONPATH": "/repo"}}`` so
    #: workers of a joined cluster can import the target module.
    runtime_env: dict[str, Any] | None = None
    #: Prefix of the per-person task names shown in the dashboard.
    task_prefix: str = "train-"

    def __post_init__(self) -> None:
        if self.address is not None:
            embedded_only = {k: getattr(self, k) for k in
                             ("num_cpus", "num_gpus", "object_store_memory_mb", "node_ip_address")}
            given = [k for k, v in embedded_only.items() if v is not None]
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
        if ray.is_initialized():
            return False
        kwargs: dict[str, Any] = dict(runtime_env=c.runtime_env, log_to_driver=True)
        address = resolve_ray_address(c.address)
        if address is None:
            # "local": a new embedded Ray even when a `ray start` head runs on this machine (without
            # it ray.init joins that head, whose resources and settings are not ours)
            kwargs.update(address="local", num_cpus=c.num_cpus, num_gpus=c.num_gpus)
            if c.object_store_memory_mb is not None:
                kwargs["object_store_memory"] = int(c.object_store_memory_mb) * 2**20
            kwargs.update(embedded_ray_bind(c.node_ip_address or LOOPBACK))
        else:
            if c.address is None and any(getattr(c, k) is not None for k in
                                         ("num_cpus", "num_gpus", "object_store_memory_mb", "node_ip_address")):
                log.info("joining the Ray cluster in RAY_ADDRESS (%s): the embedded-Ray settings are not used",
                         address)
            kwargs["address"] = address
        ray.init(**kwargs)
        return True

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
            _status.write_state(sdir, job.person, "queued", attempt=attempt, restarts=0,
                                message=f"submitted to Ray as task {name}")
        return ray.remote(_attempt_task).options(**opts).remote(job, attempt, sdir)

    def _run(self, jobs: list[PersonJob], sdir: str | None) -> list[JobResult]:
        import ray

        results: dict[str, JobResult] = {}
        node_max = max_node_resources()
        pending: dict[Any, tuple[PersonJob, int, float]] = {}
        for job in jobs:
            reason = infeasible_reason(job, node_max)
            if reason is not None:
                msg = f"not submitted: {reason}"
                log.error("person %s %s", job.person, msg)
                if sdir is not None:
                    _status.write_state(sdir, job.person, "failed", attempt=0, message=msg)
                results[job.person] = JobResult(job.person, False, 0, error=msg)
                continue
            pending[self._submit(job, 1, sdir)] = (job, 1, time.time())
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                ref = done[0]
                job, attempt, t0 = pending.pop(ref)
                try:
                    value = ray.get(ref)
                except Exception as e:  # RayTaskError (target raised) or a dead worker/node
                    if isinstance(e, ray.exceptions.RayTaskError) and e.cause is not None:
                        # str(e) carries the remote traceback; lead with the target's own error
                        err = f"{type(e.cause).__name__}: {e.cause}\n{str(e)[-3000:]}"
                    else:
                        err = f"{type(e).__name__}: {e}"
                    if attempt <= job.max_retries:
                        log.warning("person %s attempt %d failed, retrying: %s", job.person, attempt,
                                    err.splitlines()[0])
                        pending[self._submit(job, attempt + 1, sdir)] = (job, attempt + 1, t0)
                        continue
                    log.error("person %s failed after %d attempt(s): %s", job.person, attempt, err.splitlines()[0])
                    if sdir is not None:  # a killed worker could not write its own verdict
                        _status.write_state(sdir, job.person, "failed", attempt=attempt, message=err[:1500])
                    results[job.person] = JobResult(job.person, False, attempt, error=err, duration_s=time.time() - t0)
                    continue
                log.info("person %s succeeded (attempt %d)", job.person, attempt)
                results[job.person] = JobResult(job.person, True, attempt, result=value, duration_s=time.time() - t0)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        return [results[j.person] for j in jobs]
