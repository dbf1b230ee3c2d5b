"""The single-process CPU start-up compiles nothing: DeepSpeed's shm all-reduce op is not built."""

import subprocess
import sys

import pytest

from avatars.training.rendezvous import environment_without_group

CHILD = """
import os, torch
from avatars.training.trainer import init_distributed
assert init_distributed() == (0, 1)
import deepspeed.comm.comm as dscomm
assert dscomm.cdb.shm_comm_op is None, "DeepSpeed built its shm comm op"
assert not os.listdir(os.environ["TORCH_EXTENSIONS_DIR"]), os.listdir(os.environ["TORCH_EXTENSIONS_DIR"])
torch.distributed.destroy_process_group()
print("ok")
"""


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU start-up path")
def test_cpu_init_builds_no_extension(tmp_path):
    env = environment_without_group()
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path)  # an empty cache: a build would land here
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-3000:]


def test_each_process_takes_its_local_gpu_before_the_group_starts(monkeypatch):
    """On CUDA, LOCAL_RANK's GPU is made current and bound to the group before any collective (the trainer's set-up
    barrier runs before DeepSpeed chooses the device: NCCL had put every process of a node on GPU 0). CUDA stood in
    for on this CPU machine: the group start is recorded and stopped there."""
    import torch

    from avatars.training import rendezvous

    calls = []

    class Started(Exception):
        pass

    def init_process_group(backend, **kwargs):
        calls.append(("init", backend, kwargs["device_id"]))
        raise Started

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    monkeypatch.setattr(rendezvous, "_LISTENER", None)
    for key, value in dict(RANK="0", LOCAL_RANK="3", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="0").items():
        monkeypatch.setenv(key, value)
    with pytest.raises(Started):
        rendezvous.init_distributed()
    assert calls == [("set_device", torch.device("cuda", 3)), ("init", "nccl", torch.device("cuda", 3))]
    rendezvous._LISTENER.detach()  # its descriptor is the store's, which closes it
