"""Checks, before any work starts, that the chosen backend is there.

A run that fails after the data stage because ``sbatch`` has no configuration, or because the
Ray cluster named by ``--ray-address`` is down, wastes the user's time and ends in a traceback
from deep inside submitit or Ray. :func:`check_backend` asks the backend a cheap question first
(``sinfo`` for SLURM, a TCP connection to the GCS for a Ray cluster, a bind to the address an
embedded Ray is to listen on) and raises
:class:`BackendUnavailable` with what is missing and how to get it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

#: How to get a SLURM configuration, appended to every SLURM problem.
SLURM_HINT = ("point SLURM_CONF at your cluster's slurm.conf (export SLURM_CONF=/etc/slurm/slurm.conf, or run on a "
              "login node where sinfo works), or start the single-node SLURM of this repository: "
              "`bash slurm/local/start-slurm.sh` (as root) and `export SLURM_CONF=/tmp/da-slurm/etc/slurm.conf`")
#: How to get a Ray cluster, appended to every Ray problem.
RAY_HINT = ("start one with `ray start --head --port 6379` (then --ray-address 127.0.0.1:6379), pass the address "
            "of a running cluster's head (host:port, `ray status` prints it), or leave --ray-address out to run "
            "on an embedded local Ray")


class BackendUnavailable(RuntimeError):
    """The backend cannot run jobs; the message says what is missing and how to get it."""


def _first_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for key in ("fatal", "Unable to contact", "error"):
        for ln in lines:
            if key in ln:
                return ln
    return lines[-1] if lines else "no output"


def check_slurm(partition: str | None = None, timeout_s: float = 30.0) -> list[str]:
    """Raises BackendUnavailable unless the SLURM commands exist and the controller answers
    (``sinfo`` lists the partitions) and ``partition`` (if given) is one of them.

    Returns warnings for what works without being complete: no accounting (``sacct``), which
    submitit needs to see jobs that were cancelled or killed by the node.
    """
    missing = [cmd for cmd in ("sbatch", "sinfo", "scancel") if shutil.which(cmd) is None]
    if missing:
        raise BackendUnavailable(f"--backend slurm: the SLURM client commands {', '.join(missing)} are not on "
                                 f"PATH; install SLURM's client tools (Debian: apt-get install slurm-client) "
                                 f"and {SLURM_HINT}")
    conf = os.environ.get("SLURM_CONF")
    where = f"SLURM_CONF={conf}" if conf else "SLURM_CONF is not set"
    if conf and not Path(conf).is_file():
        raise BackendUnavailable(f"--backend slurm: SLURM_CONF={conf} does not exist; {SLURM_HINT}")
    try:
        proc = subprocess.run(["sinfo", "--noheader", "--format=%P"], capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise BackendUnavailable(f"--backend slurm: sinfo did not answer within {timeout_s:g} s ({where}): the "
                                 f"SLURM controller (slurmctld) is not reachable; {SLURM_HINT}") from None
    if proc.returncode != 0:
        raise BackendUnavailable(f"--backend slurm: SLURM is not reachable ({where}): sinfo says "
                                 f"'{_first_error_line(proc.stderr + proc.stdout)}'; {SLURM_HINT}")
    partitions = [p.strip().rstrip("*") for p in proc.stdout.split() if p.strip()]
    if partition is not None and partition not in partitions:
        raise BackendUnavailable(f"--backend slurm: partition {partition!r} (--slurm.partition) does not exist on this "
                                 f"cluster; it has: {', '.join(partitions) or 'no partitions'}")
    warnings = []
    if shutil.which("sacct") is None:
        warnings.append("SLURM accounting (sacct) is not installed: a job cancelled or killed outside this run may "
                        "not be noticed")
    else:
        try:
            acct = subprocess.run(["sacct", "--noheader", "-X", "--format=JobID", "--starttime=now"],
                                  capture_output=True, text=True, timeout=timeout_s)
            if acct.returncode != 0:
                warnings.append(f"SLURM accounting does not answer (sacct: '{_first_error_line(acct.stderr)}'): a job "
                                "cancelled or killed outside this run may not be noticed; enable slurmdbd "
                                "(slurm/local/start-slurm.sh does with SLURM_ACCOUNTING=1)")
        except subprocess.TimeoutExpired:
            warnings.append(f"SLURM accounting (sacct) did not answer within {timeout_s:g} s")
    return warnings


def resolve_ray_address(address: str | None) -> str | None:
    """The GCS address ``host:port`` a Ray driver would join, or None for an embedded Ray.

    ``None`` joins ``RAY_ADDRESS`` when it is set (as inside ``ray job submit``); ``"auto"`` joins
    ``RAY_ADDRESS`` or the cluster the last ``ray start`` on this machine recorded, and raises
    BackendUnavailable when there is none.
    """
    if address is None:
        address = os.environ.get("RAY_ADDRESS") or None
        if address is None:
            return None
    if address == "auto":
        found = os.environ.get("RAY_ADDRESS")
        if not found:
            from ray._private.services import find_bootstrap_address

            found = find_bootstrap_address(None)
        if not found:
            raise BackendUnavailable(f"--ray-address auto: no running Ray cluster was found on this machine "
                                     f"(RAY_ADDRESS is not set and no `ray start` recorded one); {RAY_HINT}")
        address = found
    return address


def _host_port(address: str) -> tuple[str, int]:
    rest = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise BackendUnavailable(f"Ray address {address!r} is not host:port (e.g. 127.0.0.1:6379); {RAY_HINT}")
    return host.strip("[]"), int(port)


def check_ray(address: str | None, timeout_s: float = 5.0) -> None:
    """Raises BackendUnavailable unless ``address`` (see :func:`resolve_ray_address`) accepts a
    connection; an embedded Ray (no address) needs nothing."""
    resolved = resolve_ray_address(address)
    if resolved is None:
        return
    host, port = _host_port(resolved)
    named = f"--ray-address {address}" if address else f"RAY_ADDRESS={resolved}"
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise BackendUnavailable(f"{named}: no Ray cluster answers at {host}:{port} ({reason}); {RAY_HINT}") from None


def check_bind_host(host: str) -> None:
    """Raises BackendUnavailable unless ``host`` is an address of this machine (a socket can bind to
    it): an embedded Ray started on any other address waits for its own GCS without end, and says
    nothing that names the option."""
    try:
        infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
    else:
        reason = "no address"
        for family, kind, proto, _, address in infos:
            try:
                with socket.socket(family, kind, proto) as s:
                    s.bind(address)
                return
            except OSError as e:
                reason = e.strerror or str(e)
    raise BackendUnavailable(f"--ray-bind-host {host} is not an address of this machine ({reason}); give one of "
                             "its addresses (127.0.0.1, the default, or one `hostname -I` lists)")


def check_backend(backend: str, ray_address: str | None = None, slurm_partition: str | None = None,
                  evaluate: bool = True, ray_bind_host: str = "127.0.0.1") -> list[str]:
    """Checks what this run will use: the training backend, and the Ray cluster the evaluation
    joins (``ray_address``) when ``evaluate``; an embedded Ray's ``ray_bind_host`` must be an
    address of this machine. Returns warnings; raises BackendUnavailable."""
    warnings: list[str] = []
    if backend == "slurm":
        warnings += check_slurm(slurm_partition)
    if backend == "ray" or evaluate:
        check_ray(ray_address)
        if resolve_ray_address(ray_address) is None:  # an embedded Ray: started here, on that address
            check_bind_host(ray_bind_host)
    return warnings
