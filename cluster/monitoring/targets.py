"""Prometheus file-based service discovery: each exporter writes its own target file.

A training (``--train.metrics-targets-dir``) or renderer replica (``--renderer.metrics-targets-dir``) whose exporter
is bound writes ``<targets_dir>/<name>.json`` in Prometheus's file_sd format and removes it when it stops; the
``file_sd_configs`` jobs of ``cluster/monitoring/prometheus.yml`` read that folder, so hundreds of trainings on many
nodes are scraped without a hand-written target list. The folder must be one Prometheus can read (a shared file
system on a cluster). All of it is best effort: a folder that cannot be written is a warning, never a failed
training or replica (monitoring must not fail work).

A process that is killed (SIGKILL, the OOM killer, a lost node) never removes its file, and Prometheus would scrape
that target as down for good. So each file records its writer, as the status files record their queuer
(:mod:`cluster.status`): host, pid, ``pid_space`` (boot id and pid namespace) and process start time (UNIX
seconds, and seconds since boot, which a change of the system clock does not move), in labels
named ``__writer_*`` (Prometheus accepts them in file_sd and drops every ``__`` label after relabelling: they are no
label of the scraped series). While a process has a target registered, a thread of it touches the file every
:data:`HEARTBEAT_S` seconds (and writes it again if it was removed). :func:`sweep`, run by every :func:`register`
and by ``launch_all`` at the start and end of a night, removes the files of writers that are gone:

* a writer in this ``pid_space`` (this host, boot and pid namespace): when its pid is gone or now names a later
  process (another start time since boot; files without it: another start time in UNIX seconds), checked at once;
* a writer that cannot be checked from here (another host, container or boot): when its file has not been touched
  for :data:`ABANDONED_AFTER_S`; a live writer touches it every :data:`HEARTBEAT_S`;
* files without a writer record (written by earlier versions, or by another tool into a shared folder) are left:
  whether their process lives cannot be told (remove them by hand once their process is gone).

A live writer's file is never removed by the pid check; one removed by the age check (its node lost the shared file
system for an hour, or a race with a sweep) is written again by its next heartbeat.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
import warnings
from pathlib import Path

from cluster.status import process_gone, this_process
from common.io import atomic_write_json

#: Bind addresses that mean "every interface": not an address Prometheus can scrape, so the node's name is written.
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})
#: Seconds between two touches of a registered target file by its live writer.
HEARTBEAT_S = 60.0
#: Seconds without a touch after which a target file whose writer cannot be checked by pid from the sweeping process
#: is taken as abandoned: 60 missed heartbeats, far beyond a shared file system's attribute caching (60 s by default
#: on NFS) and the clock skew between nodes (the file server sets the time of a touch).
ABANDONED_AFTER_S = 3600.0
#: Label prefix of the writer record: Prometheus drops labels starting with ``__`` after relabelling.
WRITER_PREFIX = "__writer_"
WRITER_FIELDS = ("host", "pid", "pid_space", "started_at", "started_boot")
#: Writer fields that files of earlier versions lack (read as unknown).
WRITER_OPTIONAL = ("started_boot",)

log = logging.getLogger(__name__)
_lock = threading.Lock()
#: Target files this process registered: path -> (the file's content, its writer labels).
_registered: dict[Path, tuple[list, dict[str, str]]] = {}
_heartbeat_thread: threading.Thread | None = None
_wake = threading.Event()
_touch_failed: set[Path] = set()  # said once until a touch succeeds again


def target_address(host: str, port: int) -> str:
    """``host:port`` as Prometheus scrapes it: a wildcard bind address becomes this node's name, an IPv6 address is
    bracketed."""
    if host in WILDCARD_HOSTS:
        host = socket.getfqdn()
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def target_file(targets_dir: Path, name: str) -> Path:
    return Path(targets_dir) / f"{name}.json"


def writer_labels() -> dict[str, str]:
    """This process as a target file records its writer (:mod:`cluster.status`'s record of a queuer): host, pid,
    pid_space, start time; an unknown one is an empty string."""
    me = this_process()
    return {f"{WRITER_PREFIX}{key}": "" if me[key] is None else str(me[key]) for key in WRITER_FIELDS}


def register(targets_dir: Path, name: str, host: str, port: int, labels: dict[str, str]) -> Path | None:
    """Write ``<targets_dir>/<name>.json`` (temporary file, then rename: Prometheus never reads half a file) naming
    the exporter at ``host:port`` with ``labels`` and this process as its writer, and keep it touched until
    :func:`unregister`. The files of processes that are gone are removed first (:func:`sweep`). Returns the file, or
    None (with a warning naming it and the cause) when it could not be written."""
    path = target_file(targets_dir, name)
    writer = writer_labels()
    entry = [{"targets": [target_address(host, port)],
              "labels": {**{k: str(v) for k, v in labels.items()}, **writer}}]
    sweep(targets_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _lock:
            atomic_write_json(path, entry)
            _registered[path] = (entry, writer)
    except OSError as e:
        warnings.warn(f"{path}: cannot write the Prometheus target file ({e}); this exporter is not discovered",
                      RuntimeWarning, stacklevel=2)
        return None
    _start_heartbeat()
    return path


def unregister(targets_dir: Path, name: str) -> None:
    """Remove ``<targets_dir>/<name>.json`` and stop touching it; one already gone is fine, one that another process
    wrote since (its writer record is not this process's) is left to it, one that cannot be removed is a warning."""
    path = target_file(targets_dir, name)
    with _lock:
        _registered.pop(path, None)
        try:
            writer = _read_writer(path)
        except OSError:
            writer = None  # unreadable: removed as before writer records
        if writer is not None and writer != writer_labels():
            return  # written over by another process (a retry of the same name elsewhere) that serves it now
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            warnings.warn(f"{path}: cannot remove the Prometheus target file ({e}); Prometheus reports the stopped "
                          "exporter as down", RuntimeWarning, stacklevel=2)


def _read_writer(path: Path) -> dict[str, str] | None:
    """The writer record of target file ``path``: its ``__writer_*`` labels, or None when it has none (no file, one
    of an earlier version or of another tool, one that does not parse). A file that cannot be read is an OSError."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        labels = json.loads(text)[0]["labels"]
        writer = {f"{WRITER_PREFIX}{key}": labels[f"{WRITER_PREFIX}{key}"] for key in WRITER_FIELDS
                  if key not in WRITER_OPTIONAL or f"{WRITER_PREFIX}{key}" in labels}
    except (ValueError, LookupError, TypeError):
        return None
    return writer if all(isinstance(v, str) for v in writer.values()) else None


def _writer_gone(writer: dict[str, str], touched: float, now: float) -> str | None:
    """Why the process of ``writer`` is gone, or None when it is not, or not known to be."""
    def field(key: str) -> str:
        return writer.get(f"{WRITER_PREFIX}{key}", "")

    def seconds(key: str) -> float | None:
        try:
            value = float(field(key)) if field(key) else None
        except ValueError:
            return None
        return value if value is not None and math.isfinite(value) else None

    pid = int(field("pid")) if field("pid").isdigit() else None
    who = f"process {field('pid') or '?'} on {field('host') or 'an unknown host'}"
    gone = process_gone(pid, field("pid_space") or None, started_at=seconds("started_at"),
                        started_boot=seconds("started_boot"), last_write=touched)
    if gone:
        return f"{who} is gone (killed?)"
    if gone is None and now - touched > ABANDONED_AFTER_S:
        return f"{who}, not checkable from here, has not touched it for {now - touched:.0f} s"
    return None


def sweep(targets_dir: Path) -> list[Path]:
    """Remove (and return) the target files in ``targets_dir`` whose writer is gone (see the module docstring), and
    temporary files of killed writes older than :data:`ABANDONED_AFTER_S`, each said in a warning of the log. Best
    effort: a folder that is missing or cannot be read or written is no error."""
    folder, now, removed = Path(targets_dir), time.time(), []
    try:
        names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".json"))
    except OSError:
        return removed
    mine = writer_labels()
    for name in names:
        path = folder / name
        try:
            touched = path.stat().st_mtime
        except OSError:
            continue  # removed meanwhile
        if name.startswith("."):  # common.io.atomic_file's temporary file (a write takes milliseconds), or another's
            old = name.endswith(".tmp.json") and now - touched > ABANDONED_AFTER_S
            why = "a temporary file of a write that did not finish" if old else None
        else:
            try:
                writer = _read_writer(path)
            except OSError:
                continue
            why = None if writer is None or writer == mine else _writer_gone(writer, touched, now)
        if why is None:
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as e:
            log.warning("%s: cannot remove the Prometheus target file of an exporter that is gone (%s): %s", path,
                        why, e)
            continue
        log.warning("%s: removed the Prometheus target file: %s", path, why)
        removed.append(path)
    return removed


def heartbeat() -> None:
    """Touch each target file this process registered; one removed meanwhile is written again (its folder still
    there), one another process wrote over is that one's now (no longer touched). Run every :data:`HEARTBEAT_S`
    by a daemon thread while any is registered."""
    with _lock:
        for path, (entry, writer) in list(_registered.items()):
            try:
                found = _read_writer(path)
                if found == writer:
                    os.utime(path)
                    _touch_failed.discard(path)
                elif path.exists():  # written over (a retry of the same name elsewhere): that writer's file
                    del _registered[path]
                elif path.parent.is_dir():
                    atomic_write_json(path, entry)
                    log.warning("%s: wrote the Prometheus target file again: it was removed while its exporter runs",
                                path)
                else:  # its folder was removed: not made again
                    del _registered[path]
            except OSError as e:
                if path not in _touch_failed:
                    _touch_failed.add(path)
                    log.warning("%s: cannot touch the Prometheus target file (%s); a sweep on another node takes it "
                                "as abandoned after %.0f s (tried again every %.0f s)", path, e, ABANDONED_AFTER_S,
                                HEARTBEAT_S)


def _heartbeats() -> None:
    global _heartbeat_thread
    while True:
        _wake.wait(HEARTBEAT_S)
        _wake.clear()
        with _lock:
            if not _registered:
                _heartbeat_thread = None
                return
        heartbeat()


def _start_heartbeat() -> None:
    global _heartbeat_thread
    with _lock:
        if _heartbeat_thread is None or not _heartbeat_thread.is_alive():
            _heartbeat_thread = threading.Thread(target=_heartbeats, name="prometheus-target-heartbeat", daemon=True)
            _heartbeat_thread.start()
