"""Nothing a default run starts listens outside loopback (embedded Ray, Serve, the trainers'
rendezvous stores and Prometheus exporters), checked by listing the listening sockets of the
whole launch_all process tree while it runs."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil
import pytest
from pipeline_helpers import LAUNCH_ALL, REPO, TINY_DATA, TINY_TRAIN, random_tiny_base

from cluster.bind import is_loopback


def listening_sockets(root: psutil.Process) -> dict[tuple[str, int], str]:
    """(address, port) -> process name and title of every listening TCP socket of `root` and its descendants."""
    found = {}
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return found
    for p in procs:
        try:
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:  # Ray workers set their title in argv[0]
                    found[(c.laddr.ip, c.laddr.port)] = f"{p.name()} {(p.cmdline() or [''])[0]}"
        except (psutil.NoSuchProcess, psutil.AccessDenied, FileNotFoundError):
            continue
    return found


@pytest.mark.ray
@pytest.mark.slow
def test_default_run_listens_only_on_loopback(tmp_path):
    base = random_tiny_base(tmp_path / "base")
    args = ["--workdir", str(tmp_path / "work"), "--synthetic.persons", "2", *TINY_DATA, *TINY_TRAIN,
            "--train.base-model", str(base), "--train.metrics-port", "19640", "--max-retries", "0",
            "--min-free-gb", "0"]
    log = open(tmp_path / "launch_all.log", "w")
    proc = subprocess.Popen([sys.executable, str(LAUNCH_ALL), *args], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    root = psutil.Process(proc.pid)
    seen: dict[tuple[str, int], str] = {}
    try:
        while proc.poll() is None:
            for sock, name in listening_sockets(root).items():
                seen.setdefault(sock, name)  # the name when first seen (a Ray worker is renamed when idle)
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    out = (tmp_path / "launch_all.log").read_text()
    assert proc.returncode == 0, out[-4000:]
    names = " | ".join(sorted(set(seen.values())))
    # The run really started the services in question: Ray's GCS and raylet, the trainers (their
    # rendezvous store and exporter) and the Serve replicas.
    assert "gcs_server" in names and "raylet" in names and "ServeReplica" in names, names
    trainer_ports = {port for (_, port), name in seen.items() if "train-" in name}
    assert 19640 in trainer_ports and len(trainer_ports) >= 3, seen  # exporter + store + gloo at least
    exposed = {f"{ip}:{port}": name for (ip, port), name in seen.items() if not is_loopback(ip)}
    assert not exposed, f"listening outside loopback: {exposed}"
    summary = json.loads((tmp_path / "work" / "runs" / "summary.json").read_text())
    assert [r["ok"] for r in summary["results"]] == [True, True]
