"""Where the services of a run listen: loopback unless the user asks otherwise.

An embedded Ray (the default of `jobs/launch_all.py` and the evaluation driver) starts a
GCS, a raylet, an object manager, agents, a dashboard and one gRPC server per worker
and Serve replica. Ray binds them to the node IP, and on Linux it resolves that from the
default route and ignores a loopback `_node_ip_address`, unless
`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, which Ray reads when it is imported. With both,
every one of those ports listens on 127.0.0.1 (measured with ray 2.60), except one: Serve
starts each replica's inter-deployment gRPC server on ``[::]:0`` (all interfaces, hard-coded),
which :func:`serve_replica_grpc_on_node_ip` moves onto a loopback node IP. Other hosts keep
Ray's own behaviour (a node IP; several servers listen on all interfaces).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys

#: The default address of every service a run starts.
LOOPBACK = "127.0.0.1"
_RAY_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1, ::ffff:127.x and names that resolve only to them (e.g. 'localhost')."""
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        pass
    else:
        mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1, how dual-stack sockets show IPv4
        return (mapped or ip).is_loopback
    try:
        addrs = {info[4][0].split("%")[0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        return False
    return bool(addrs) and all(is_loopback(a) for a in addrs)


def embedded_ray_bind(host: str = LOOPBACK) -> dict:
    """`ray.init` keyword arguments for an embedded single-node Ray listening on `host`.

    For a loopback `host` this also makes Ray honour it: the environment variable for
    the processes Ray starts (they import Ray afresh), and Ray's constant in this process
    when Ray is already imported (e.g. by an earlier stage of the same run).
    """
    if is_loopback(host):
        os.environ[_RAY_CLUSTER_ENV] = "0"
        constants = sys.modules.get("ray._private.ray_constants")
        if constants is not None:
            constants.ENABLE_RAY_CLUSTER = False
    return {"_node_ip_address": host, "dashboard_host": host}


def serve_replica_grpc_on_node_ip(node_ip: str) -> bool:
    """In a Serve replica on a node whose IP is loopback: its inter-deployment gRPC server listens
    on that IP instead of ``[::]`` (Ray connects to it at the node IP, so nothing else changes).

    Call it in the deployment's constructor: the replica starts that server after the constructor
    returns. Returns whether it applied (only for a loopback ``node_ip``; idempotent)."""
    if not is_loopback(node_ip):
        return False
    from ray.serve._private import replica

    add_port = replica.add_port_to_grpc_server
    if getattr(add_port, "_loopback", False):
        return True
    host = f"[{node_ip}]" if ":" in node_ip else node_ip

    def add_port_on_node_ip(server, address: str):
        if address.startswith("[::]:"):
            address = f"{host}:{address.rsplit(':', 1)[1]}"
        return add_port(server, address)

    add_port_on_node_ip._loopback = True
    replica.add_port_to_grpc_server = add_port_on_node_ip
    return True
