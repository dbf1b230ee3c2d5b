"""The training process group listens on loopback only (rank 0's store and gloo's sockets)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

CHILD = """
import json, psutil, torch
from avatars.training.rendezvous import init_distributed
rank, world = init_distributed()
t = torch.ones(2)
torch.distributed.all_reduce(t)
listening = [c.laddr.ip for c in psutil.Process().net_connections("inet") if c.status == psutil.CONN_LISTEN]
print(json.dumps({"rank": rank, "world": world, "sum": t.tolist(), "listening": listening}))
"""


def test_single_process_group_listens_only_on_loopback():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "GLOO_SOCKET_IFNAME")}
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (out["rank"], out["world"], out["sum"]) == (0, 1, [1.0, 1.0])
    # torch's env:// store would listen on '::' (every interface); here the store and gloo bind 127.0.0.1
    assert len(out["listening"]) >= 2 and set(out["listening"]) == {"127.0.0.1"}, out["listening"]
