"""Prometheus file-based service discovery: each exporter writes its own target file.

A training (``--train.metrics-targets-dir``) or renderer replica (``--renderer.metrics-targets-dir``) whose exporter
is bound writes ``<targets_dir>/<name>.json`` in Prometheus's file_sd format and removes it when it stops; the
``file_sd_configs`` jobs of ``cluster/monitoring/prometheus.yml`` read that folder, so hundreds of trainings on many
nodes are scraped without a hand-written target list. The folder must be one Prometheus can read (a shared file
system on a cluster). Both calls are best effort: a folder that cannot be written is a warning, never a failed
training or replica (monitoring must not fail work).
"""

from __future__ import annotations

import socket
import warnings
from pathlib import Path

from common.io import atomic_write_json

#: Bind addresses that mean "every interface": not an address Prometheus can scrape, so the node's name is written.
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})


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


def register(targets_dir: Path, name: str, host: str, port: int, labels: dict[str, str]) -> Path | None:
    """Write ``<targets_dir>/<name>.json`` (temporary file, then rename: Prometheus never reads half a file) naming
    the exporter at ``host:port`` with ``labels``. Returns the file, or None (with a warning naming it and the cause)
    when it could not be written."""
    path = target_file(targets_dir, name)
    entry = [{"targets": [target_address(host, port)], "labels": {k: str(v) for k, v in labels.items()}}]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, entry)
    except OSError as e:
        warnings.warn(f"{path}: cannot write the Prometheus target file ({e}); this exporter is not discovered",
                      RuntimeWarning, stacklevel=2)
        return None
    return path


def unregister(targets_dir: Path, name: str) -> None:
    """Remove ``<targets_dir>/<name>.json``; one already gone is fine, one that cannot be removed is a warning."""
    path = target_file(targets_dir, name)
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        warnings.warn(f"{path}: cannot remove the Prometheus target file ({e}); Prometheus reports the stopped "
                      "exporter as down", RuntimeWarning, stacklevel=2)
