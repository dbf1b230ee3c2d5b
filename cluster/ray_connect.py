"""How every part of a run connects to Ray: one :func:`connect_ray` for the training backend and
the evaluation driver (and so for ``jobs/launch_all.py``, which runs both in one process).

A run either joins a cluster (``--ray-address``, or ``RAY_ADDRESS`` inside ``ray job submit``) or
starts an embedded single-node Ray in its own process. The embedded one is always a new Ray of its
own (``address="local"``: without it ``ray.init`` joins any ``ray start`` head on the machine, whose
resources and settings are not the run's) and listens on loopback unless the user names another
address (:mod:`cluster.bind`), and keeps its sockets under a temporary root short enough for them
(:func:`embedded_ray_temp_dir`). When this process is already connected (an earlier stage, a test,
a user's notebook) that connection is used and left open; :class:`RaySession` is how
``jobs/launch_all.py`` keeps one Ray for its training and its evaluation.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any

from cluster.bind import LOOPBACK, embedded_ray_bind
from cluster.preflight import resolve_ray_address
from common.io import SUN_PATH_MAX, fits_unix_socket

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedRay:
    """What an embedded Ray offers and where it listens; unused when a cluster is joined."""

    num_cpus: int | None = None
    """Logical CPUs (None: every core of this machine)."""
    num_gpus: int | None = None
    """GPUs (None: Ray detects them)."""
    object_store_memory_mb: int | None = None
    """Object store size in MiB (None: Ray's default, 30% of RAM)."""
    bind_host: str = LOOPBACK
    """The address its node, workers and dashboard listen on (127.0.0.1: nothing reachable from
    the network)."""
    include_dashboard: bool | None = None
    """Start the Ray dashboard (None: Ray's default, on when its packages are installed)."""


#: What Ray appends to its temporary root for its longest socket (a 7-digit PID, Linux's largest).
RAY_SOCKET_SUFFIX = len("/ray/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store")
#: Where Ray puts its files on Linux when neither RAY_TMPDIR nor TMPDIR names a folder.
RAY_FALLBACK_TEMP_DIR = "/tmp/ray"


def embedded_ray_temp_dir() -> str | None:
    """The temporary folder for an embedded Ray's session, where Ray's own choice cannot hold its sockets; None
    where it can. On Linux Ray roots its sockets in ``TMPDIR`` (unless ``RAY_TMPDIR`` is set), and a ``TMPDIR``
    longer than ~39 bytes, as clusters' per-job folders often are, failed ``ray.init`` with 'AF_UNIX path length
    cannot exceed 107 bytes'. Then the session goes under ``/tmp/ray`` (Ray's default without ``TMPDIR``), with
    a warning. A ``RAY_TMPDIR`` the user set is theirs: Ray's own error names it if it is too long."""
    root = os.environ.get("TMPDIR")
    if "RAY_TMPDIR" in os.environ or not sys.platform.startswith("linux") or not root:
        return None
    if fits_unix_socket(root, RAY_SOCKET_SUFFIX):
        return None
    warnings.warn(f"TMPDIR ({root}) is too long a path for Ray's sockets under it ({SUN_PATH_MAX} bytes at most "
                  f"with the {RAY_SOCKET_SUFFIX} Ray adds): the embedded Ray keeps its session under "
                  f"{RAY_FALLBACK_TEMP_DIR} instead (RAY_TMPDIR chooses another root)", RuntimeWarning, stacklevel=3)
    return RAY_FALLBACK_TEMP_DIR


#: Since Ray 2.5x a task or actor that reserves no GPU (``num_gpus=0``: a CPU person's training, a CPU renderer
#: replica) sees every GPU of its node (Ray no longer sets ``CUDA_VISIBLE_DEVICES=""`` for it), and the renderer's
#: and the trainer's "CUDA when available" then put it on a GPU that Ray gave to another task. This restores
#: Ray's earlier rule in every worker of a run; a ``runtime_env`` that sets the variable itself wins.
HIDE_UNRESERVED_GPUS = {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1"}


def job_runtime_env(runtime_env: dict[str, Any] | None) -> dict[str, Any]:
    """``runtime_env`` (the run's own, if any) with :data:`HIDE_UNRESERVED_GPUS` among its ``env_vars``."""
    env = dict(runtime_env or {})
    env["env_vars"] = {**HIDE_UNRESERVED_GPUS, **(env.get("env_vars") or {})}
    return env


def ray_init_kwargs(address: str | None, embedded: EmbeddedRay = EmbeddedRay(), *,
                    runtime_env: dict[str, Any] | None = None, log_to_driver: bool = True) -> dict[str, Any]:
    """The ``ray.init`` keyword arguments :func:`connect_ray` uses: join ``address`` (resolved as
    :func:`cluster.preflight.resolve_ray_address` does), or, when that is None, start ``embedded``.

    For a loopback ``embedded.bind_host`` this also makes Ray honour it (see :func:`embedded_ray_bind`); the job's
    runtime environment hides the GPUs from the workers that reserve none (:data:`HIDE_UNRESERVED_GPUS`)."""
    kwargs: dict[str, Any] = {"log_to_driver": log_to_driver, "runtime_env": job_runtime_env(runtime_env)}
    resolved = resolve_ray_address(address)
    if resolved is not None:
        kwargs["address"] = resolved
        return kwargs
    kwargs.update(address="local", num_cpus=embedded.num_cpus, num_gpus=embedded.num_gpus)
    if embedded.object_store_memory_mb is not None:
        kwargs["object_store_memory"] = int(embedded.object_store_memory_mb) * 2**20
    if embedded.include_dashboard is not None:
        kwargs["include_dashboard"] = embedded.include_dashboard
    temp_dir = embedded_ray_temp_dir()
    if temp_dir is not None:
        kwargs["_temp_dir"] = temp_dir  # ray.init's root for this node's session, as `ray start --temp-dir`
    kwargs.update(embedded_ray_bind(embedded.bind_host))
    return kwargs


NODE_START_TIMEOUT = "node timed out during startup"
"""What ``ray.init`` raises when its new node's raylet does not register within Ray's 30 s."""


def connect_ray(address: str | None, embedded: EmbeddedRay = EmbeddedRay(), *,
                runtime_env: dict[str, Any] | None = None, log_to_driver: bool = True) -> bool:
    """``ray.init`` unless this process is already connected. Returns whether this call connected
    (joined a cluster or started the embedded Ray): then the caller ``ray.shutdown()``\\ s when done.

    Ray's usage statistics are off unless ``RAY_USAGE_STATS_ENABLED`` says otherwise (a run sends
    nothing to the network on its own)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs = ray_init_kwargs(address, embedded, runtime_env=runtime_env, log_to_driver=log_to_driver)
    try:
        ray.init(**kwargs)
    except Exception as e:
        if kwargs.get("address") != "local" or NODE_START_TIMEOUT not in str(e):
            raise
        # Seen on the 2-core machine (twice in a day of test runs, once at load 1): the embedded node's raylet
        # never registered in Ray's 30 s. A new start gets new ports and processes; a second failure is raised.
        print(f"ray_connect: the embedded Ray did not start ({e}); starting it again once", file=sys.stderr)
        ray.shutdown()
        ray.init(**kwargs)
    return True


def leave_ray(address: str | None, started: bool, serve_app: str | None = None) -> None:
    """Leave Ray as a stage found it. ``started``: the stage's :func:`connect_ray` connected (True) or found this
    process connected (False); ``serve_app``: the Serve application the stage deployed, if any.

    Only an embedded Ray (``started`` with no cluster to join at ``address``) is the stage's own: Serve and Ray
    stop with it. On a cluster, joined here or before, Serve is shared with other runs and their applications:
    only ``serve_app`` is deleted (``serve.shutdown`` would delete every application on the cluster), then the
    connection this stage opened is closed."""
    import ray

    if started and resolve_ray_address(address) is None:
        if "ray.serve" in sys.modules:  # a stage used Serve: its controller goes without the error wall
            from cluster.serve.deployment import shutdown_serve_and_ray

            shutdown_serve_and_ray()
        else:
            ray.shutdown()
        return
    try:
        if serve_app is not None:
            from cluster.serve.deployment import delete_renderer

            try:
                delete_renderer(serve_app)
            except Exception as e:  # never in place of the stage's own error (a renderer that failed to deploy)
                log.warning("could not delete the Serve application %r: %s", serve_app, e)
    finally:
        if started:
            ray.shutdown()


class RaySession:
    """One Ray for several stages of a run: the first :meth:`connect` starts (or joins) it, later
    ones and every stage's own :func:`connect_ray` use it, :meth:`close` stops Serve and Ray if
    this session started them. Starting the embedded Ray costs 5-7 CPU s and 10-20 s: the main
    job pays it once for its training and its evaluation instead of once each."""

    def __init__(self, address: str | None, embedded: EmbeddedRay = EmbeddedRay(), *, log_to_driver: bool = True):
        self.address, self.embedded, self.log_to_driver = address, embedded, log_to_driver
        self.started = False

    def connect(self) -> None:
        if not self.started:
            self.started = connect_ray(self.address, self.embedded, log_to_driver=self.log_to_driver)

    def close(self) -> None:
        """Stop what :meth:`connect` started: an embedded Ray and the Serve a stage started on it,
        or the connection to a joined cluster (whose Serve other runs may use: left running)."""
        if not self.started:
            return
        self.started = False
        leave_ray(self.address, started=True)

    def __enter__(self) -> "RaySession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
