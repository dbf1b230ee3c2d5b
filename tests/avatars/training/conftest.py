from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def train_shards(tiny_dataset) -> Path:
    """Shard root of the tiny data set (persons 000, 001), shared read-only (tests/conftest.py)."""
    return tiny_dataset[2]


@pytest.fixture(scope="session")
def engine_resumes(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """(folder, {name: result}) of _engine_scripts.SCRIPTS, run in one child process; each script's checkpoint is
    in <folder>/<name>/ckpt, which only the test of that script reads. Its tests share the xdist group
    _engine_scripts.ENGINE_RESUMES, so that one worker makes it, once."""
    from _engine_scripts import run_resumes

    root = tmp_path_factory.mktemp("engine-resumes")
    return root, run_resumes(root)


#: What an in-process training's single-process group leaves in os.environ (avatars.training.rendezvous).
_GROUP_ENVIRONMENT = ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK", "MASTER_ADDR", "GLOO_SOCKET_IFNAME",
                      "NCCL_SOCKET_IFNAME")


@pytest.fixture(autouse=True)
def _no_process_group_variables_outlive_their_test():
    """A training run in this process joins a single-process group, kept for the process' lifetime as in the
    product, and sets its variables in os.environ. In a test worker the processes later tests started inherited
    them (every person of a later main job failed: 'cannot bind the rendezvous store to 127.0.0.1:<the old
    MASTER_PORT>: Address already in use'): they are put back as they were after each test."""
    saved = {k: os.environ.get(k) for k in _GROUP_ENVIRONMENT}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
