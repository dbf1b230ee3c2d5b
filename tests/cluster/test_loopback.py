"""Nothing a default run starts listens outside loopback (embedded Ray, Serve, the trainers'
rendezvous stores and Prometheus exporters), checked by listing the listening sockets of the
whole launch_all process tree while it runs."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import struct
import subprocess
import sys
import time

import psutil
import pytest
from pipeline_helpers import LAUNCH_ALL, REPO, TINY_DATA, TINY_TRAIN, random_tiny_base

from cluster.bind import is_loopback, serve_replica_grpc_on_node_ip

#: Linux's sock_diag netlink interface (linux/sock_diag.h, linux/inet_diag.h).
NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY, NLMSG_ERROR, NLMSG_DONE, TCP_LISTEN = 4, 20, 2, 3, 10
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300


def _sock_diag_dump(link: socket.socket, family: int):
    """The payloads (struct inet_diag_msg) of the kernel's answer to a dump of `family`'s listening TCP sockets."""
    # struct inet_diag_req_v2: family, protocol, extensions, pad, states, an empty inet_diag_sockid
    request = struct.pack("=BBBBI48x", family, socket.IPPROTO_TCP, 0, 0, 1 << TCP_LISTEN)
    link.send(struct.pack("=IHHII", 16 + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
              + request)
    while True:
        data, offset = link.recv(1 << 16), 0
        while offset + 16 <= len(data):
            length, kind = struct.unpack_from("=IH", data, offset)
            if kind == NLMSG_DONE:
                return
            if kind == NLMSG_ERROR:
                raise OSError(-struct.unpack_from("=i", data, offset + 16)[0], "sock_diag request refused")
            yield data[offset + 16:offset + length]
            offset += (length + 3) & ~3


def _listening() -> dict[int, tuple[str, int]]:
    """socket inode -> (address, port) of every listening TCP socket on this machine, asked of the kernel's
    sock_diag netlink interface as `ss -ltn` does: it walks the listening sockets alone, in ~0.06 ms, where
    reading /proc/net/tcp and tcp6 walks the whole connection table, ~9 ms of CPU a poll on this machine
    (about a third of the test process's CPU at 10 polls a second, taken from the training beside it)."""
    found = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as link:
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in _sock_diag_dump(link, family):  # struct inet_diag_msg: sport at 4, src at 8, inode at 68
                address = msg[8:12] if family == socket.AF_INET else msg[8:24]
                found[struct.unpack_from("=I", msg, 68)[0]] = (str(ipaddress.ip_address(address)),
                                                              struct.unpack_from("!H", msg, 4)[0])
    return found


def _owners(root: psutil.Process, inodes: set[int]) -> dict[int, str]:
    """inode -> process name and title, for the sockets among `inodes` held by `root` or a descendant."""
    wanted = {f"socket:[{i}]": i for i in inodes}
    owners = {}
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return owners
    for p in procs:
        try:
            links = set()
            for fd in os.listdir(f"/proc/{p.pid}/fd"):
                try:
                    links.add(os.readlink(f"/proc/{p.pid}/fd/{fd}"))
                except OSError:  # closed meanwhile
                    pass
            hits = links & wanted.keys()
            if hits:  # Ray workers set their title in argv[0]
                name = f"{p.name()} {(p.cmdline() or [''])[0]}"
                owners.update({wanted[h]: name for h in hits})
        except (psutil.NoSuchProcess, psutil.AccessDenied, FileNotFoundError, ProcessLookupError):
            continue
    return owners


def listening_sockets(root: psutil.Process, known: dict[int, tuple]) -> dict[tuple[str, int], str]:
    """(address, port) -> process name and title of the listening TCP sockets of `root` and its
    descendants that are not in `known` yet (inode -> (address, port) or None for another process's;
    updated). A socket nobody in the tree holds is given up after 50 polls (another developer's)."""
    sockets = _listening()
    fresh = {i for i in sockets if not (i in known and known[i][0] != "?")}
    owners = _owners(root, fresh) if fresh else {}
    found = {}
    for i in fresh:
        if i in owners:
            known[i] = sockets[i]
            found[sockets[i]] = owners[i]
        else:
            tries = known.get(i, ("?", 0))[1] + 1
            known[i] = ("?", tries) if tries < 50 else ("foreign", 0)
    return found


@pytest.mark.ray
@pytest.mark.slow
def test_default_run_listens_only_on_loopback(tmp_path):
    base = random_tiny_base(tmp_path / "base")
    args = ["--workdir", str(tmp_path / "work"), "--synthetic.persons", "2", *TINY_DATA, *TINY_TRAIN,
            "--train.base-model", str(base), "--train.metrics-port", "19640", "--max-retries", "0",
            "--min-free-gb", "0", "--eval-parallel-persons", "1"]  # one replica: its sockets are every replica's
    log = open(tmp_path / "launch_all.log", "w")
    proc = subprocess.Popen([sys.executable, str(LAUNCH_ALL), *args], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    root = psutil.Process(proc.pid)
    seen: dict[tuple[str, int], str] = {}
    known = dict.fromkeys(_listening(), ("foreign", 0))  # what listened before the run
    try:
        while proc.poll() is None:
            for sock, name in listening_sockets(root, known).items():
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


def test_serve_replica_grpc_server_moves_to_a_loopback_node_ip(monkeypatch):
    """Serve (2.60) binds each replica's inter-deployment gRPC server to [::]:0; on a loopback node
    the replica binds it to the node IP, elsewhere Ray's behaviour is kept."""
    import inspect

    from ray.serve._private import replica

    assert '"[::]:0"' in inspect.getsource(replica), "Ray no longer binds [::]:0: revisit cluster.bind"
    monkeypatch.setattr(replica, "add_port_to_grpc_server", replica.add_port_to_grpc_server)  # undone after
    calls = []

    class Server:
        def add_insecure_port(self, address):
            calls.append(address)
            return 4321

    assert not serve_replica_grpc_on_node_ip("10.1.2.3")
    assert replica.add_port_to_grpc_server(Server(), "[::]:0") == 4321
    assert serve_replica_grpc_on_node_ip("127.0.0.1") and serve_replica_grpc_on_node_ip("127.0.0.1")
    replica.add_port_to_grpc_server(Server(), "[::]:0")
    replica.add_port_to_grpc_server(Server(), "[::]:7000")
    assert calls == ["[::]:0", "127.0.0.1:0", "127.0.0.1:7000"]


def test_the_listening_sockets_are_read_with_address_port_and_inode():
    """The netlink reader sees every listening TCP socket, IPv4 and IPv6, loopback or not, by the inode
    the process tree's file descriptors name; a connected socket is not listening."""
    opened = []
    try:
        for family, host in [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::1"),
                             (socket.AF_INET6, "::")]:
            s = socket.socket(family)
            s.bind((host, 0))
            s.listen()
            opened.append(s)
        client = socket.create_connection(opened[0].getsockname())
        opened.append(client)
        found = _listening()
        for s in opened[:4]:
            host, port = s.getsockname()[:2]
            assert found[os.fstat(s.fileno()).st_ino] == (host, port)
        assert os.fstat(client.fileno()).st_ino not in found
    finally:
        for s in opened:
            s.close()
