"""The torch.distributed process group of a training run, bound to one address.

`env://` initialisation makes rank 0's TCPStore listen on every interface, and gloo
binds the address the host name resolves to, so a single-process run on a laptop or
a shared node would accept connections from the network. Here every socket of the
rendezvous binds MASTER_ADDR only: 127.0.0.1 for a single-process run (the default,
when no launcher set WORLD_SIZE), the address a launcher (torchrun, SLURM, Ray)
gives for a multi-process one. Rank 0 binds the store's listening socket itself and
hands it to TCPStore (`master_listen_fd`; under torchrun, whose agent serves the
store, every rank is a client); gloo and NCCL use the interface that
holds MASTER_ADDR unless GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME are set.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Mapping

import torch

#: MASTER_ADDR of a single-process run.
LOOPBACK = "127.0.0.1"
#: How long ranks wait for each other at the rendezvous.
TIMEOUT = datetime.timedelta(minutes=10)

#: What a single-process :func:`init_distributed` leaves in ``os.environ`` (beside MASTER_ADDR): a child process
#: that must make a process group of its own may not inherit them (nor would its port be free).
GROUP_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK")

_LISTENER: socket.socket | None = None  # rank 0's store socket, kept open for the process' lifetime


def environment_without_group(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``environ`` (default ``os.environ``) without :data:`GROUP_VARIABLES`: the environment of a child process
    that starts its own training (or its own single-process group)."""
    source = os.environ if environ is None else environ
    return {k: v for k, v in source.items() if k not in GROUP_VARIABLES}


def interface_of(address: str) -> str | None:
    """Name of the network interface that holds `address` (a host name or IP), or None."""
    import psutil

    try:
        infos = socket.getaddrinfo(address, None)
    except socket.gaierror:
        return None
    ips = {info[4][0] for info in infos}
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] in ips for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)):
            return name
    return None


def _listen(address: str, port: int) -> socket.socket:
    family, _, _, _, sockaddr = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(sockaddr)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot bind the rendezvous store to {address}:{port} (MASTER_ADDR:MASTER_PORT): "
                               f"{e.strerror}") from None
    sock.listen(128)
    return sock


def disable_shm_comm_op() -> None:
    """Keeps DeepSpeed from JIT-compiling its shared-memory CPU all-reduce op at start-up.

    DeepSpeed's CPU backend builds ``deepspeed_shm_comm`` with ninja and g++ in every fresh
    environment (and again whenever another install shares ~/.cache/torch_extensions), while the
    other workers wait on its file lock: measured 84 s of compiling plus 173 s of waiting in one
    training start on the shared 2-core machine. The op serves only DeepSpeed's inference
    all-reduce, which training never calls (gradients go through torch.distributed / gloo), so
    it is marked incompatible in DeepSpeed's own table of compatible ops (a module-level dict that
    DeepSpeed documents as editable), and the backend falls back to gloo."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed() -> tuple[int, int]:
    """Join the process group torchrun / Ray / SLURM set up (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT), or make a single-process one on 127.0.0.1; returns (rank, world size).

    Single-process runs take a free port (several persons train on one node at once)."""
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not torch.cuda.is_available():
        disable_shm_comm_op()
    if not torch.distributed.is_initialized():
        global _LISTENER
        if "WORLD_SIZE" not in os.environ:
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR=LOOPBACK, MASTER_PORT="0")
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        address = os.environ.get("MASTER_ADDR", LOOPBACK)
        port = int(os.environ.get("MASTER_PORT", "0"))
        iface = interface_of(address)
        if iface is not None:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", iface)
            os.environ.setdefault("NCCL_SOCKET_IFNAME", iface)
        # Under torchrun the agent already serves the store on MASTER_PORT: every rank is a client.
        serve_store = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
        if serve_store:
            _LISTENER = _listen(address, port)
            port = _LISTENER.getsockname()[1]
            os.environ["MASTER_PORT"] = str(port)
            store = torch.distributed.TCPStore(address, port, world, True, TIMEOUT,
                                               master_listen_fd=_LISTENER.fileno())
        else:
            store = torch.distributed.TCPStore(address, port, world, False, TIMEOUT)
        device = None
        if backend == "nccl":
            # Each process on its own GPU before the first collective (the trainer's set-up barrier runs before
            # DeepSpeed picks the device): NCCL otherwise put every process of a node on GPU 0 for it.
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=TIMEOUT,
                                             device_id=device)
    elif torch.distributed.get_world_size() == 1:
        # the single-process group of an earlier run of this process, kept for its lifetime: DeepSpeed reads its
        # rank from os.environ again, which a caller may have cleaned since (a child's environment, a test)
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend=backend, verbose=False)  # adopts the group above
    return torch.distributed.get_rank(), torch.distributed.get_world_size()
