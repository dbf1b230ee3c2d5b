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
