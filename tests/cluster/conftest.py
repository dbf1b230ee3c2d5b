"""Fixtures that start real engines for the orchestration tests and stop them by PID.

* ``ray_head``: ``ray start --head --block`` on 127.0.0.1 in its own process group; stopped
  by signalling that group (never ``ray stop``, which would kill other users' Ray).
* ``slurm_cluster``: the repository's ``slurm/local/start-slurm.sh`` (single-node SLURM +
  munge + slurmdbd/MariaDB) on non-default ports under /tmp/da-slurm-test, stopped with
  ``stop-slurm.sh --purge``. Tests using it are marked ``slurm`` and skipped when the
  packages are absent and cannot be installed (not root, no apt).
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent

# RAY_AUTH_MODE=token: `ray start` enables token auth but a driver joining by address only sends the
# token when told to (measured with ray 2.60). The token: a file of this test session, so that `ray start`
# finds one on a fresh machine too (it refuses to start without ~/.ray/auth_token, which only an embedded
# ray.init creates: the suite passed or failed by test order) and the user's ~/.ray is left alone.
_TOKEN_DIR = Path(tempfile.mkdtemp(prefix="da-ray-token-"))
(_TOKEN_DIR / "auth_token").write_text(secrets.token_hex(32))
atexit.register(shutil.rmtree, _TOKEN_DIR, True)
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(_TOKEN_DIR / "auth_token")}
# Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it is imported: set these before any test
# module imports ray (otherwise a driver given 127.0.0.1 dials the eth0 address instead). Set, not
# defaulted: the heads started here read RAY_ENV and the drivers the tests start inherit os.environ, and the
# two must hold the same token. An xdist worker inherits the controller's environment, which holds the
# controller's own token path whenever this conftest was among its initial ones (`pytest tests/cluster/...`):
# the head then ran on the worker's token and every driver was refused (InvalidAuthToken).
os.environ.update(RAY_ENV)
SLURM_BASE = Path(os.environ.get("DA_TEST_SLURM_BASE", "/tmp/da-slurm-test"))
SLURM_PORT_BASE = os.environ.get("DA_TEST_SLURM_PORT_BASE", "16817")
SLURM_MARIADB_PORT = os.environ.get("DA_TEST_SLURM_MARIADB_PORT", "13307")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slurm: needs a local SLURM (started by the test suite; skipped if it cannot be installed)")
    config.addinivalue_line("markers", "ray: starts a local Ray cluster")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.2)
    return False


@pytest.fixture
def ray_env(monkeypatch):
    """Environment every Ray test needs (loopback binding, no usage stats)."""
    for k, v in RAY_ENV.items():
        monkeypatch.setenv(k, v)
    if "ray" in sys.modules:  # imported before this conftest (by another test package)
        from ray._private import ray_constants
        monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)


class RayHead:
    def __init__(self, address: str, dashboard_port: int, proc: subprocess.Popen, temp_dir: str):
        self.address = address
        self.dashboard_url = f"http://127.0.0.1:{dashboard_port}"
        self.proc = proc
        self.temp_dir = temp_dir


@pytest.fixture(scope="session")
def ray_head():
    port, dash = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayt", dir="/tmp")  # short: Ray's socket paths are length-limited
    # No drain on SIGTERM: Ray 2.60 lets a node that held Serve replicas or jobs drain for up to 30 s, and
    # nothing is left to route to at the session's end (the teardown took 30 s, 4 s without).
    env = {**os.environ, **RAY_ENV, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--port", str(port), "--num-cpus", "2", "--num-gpus", "0",
           "--object-store-memory", str(100 * 2**20), "--temp-dir", temp_dir,
           "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--disable-usage-stats"]
    log = open(Path(temp_dir) / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        if not (_wait_port(port, 60) and _wait_port(dash, 60)):
            raise RuntimeError(f"ray head did not come up; see {log.name}:\n{Path(log.name).read_text()[-3000:]}")
        yield RayHead(f"127.0.0.1:{port}", dash, proc, temp_dir)
    finally:
        _stop_group(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the `ray start --block` process (it stops what it started), then SIGKILL
    whatever is left in the process group this fixture created."""
    pgid = proc.pid  # start_new_session: the group id is the leader's pid
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="session")
def slurm_cluster():
    """Start a single-node SLURM for the session; yields the SLURM_CONF path."""
    start, stop = REPO / "slurm/local/start-slurm.sh", REPO / "slurm/local/stop-slurm.sh"
    if shutil.which("slurmctld") is None and (os.geteuid() != 0 or shutil.which("apt-get") is None):
        pytest.skip("SLURM is not installed and cannot be installed here (needs root + apt-get)")
    # OMP_NUM_THREADS as a user's shell may export it: it must not shrink the node (test_cluster_slurm.py)
    env = {**os.environ, "SLURM_BASE": str(SLURM_BASE), "SLURM_PORT_BASE": SLURM_PORT_BASE,
           "SLURM_MARIADB_PORT": SLURM_MARIADB_PORT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(start)], env=env, capture_output=True, text=True, timeout=900)
    try:
        if proc.returncode != 0:
            if shutil.which("slurmctld") is None:
                pytest.skip(f"could not install SLURM with apt-get:\n{proc.stderr[-2000:]}")
            raise RuntimeError(f"start-slurm.sh failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                               f"{proc.stderr[-3000:]}")
        conf = str(SLURM_BASE / "etc/slurm.conf")
        saved = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = conf
        try:
            yield conf
        finally:
            if saved is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = saved
    finally:
        subprocess.run(["bash", str(stop), "--purge"], env=env, capture_output=True, timeout=300)


@pytest.fixture
def workload_env(monkeypatch):
    """Lets job processes (SLURM jobs inherit this environment) import `workloads`."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])))
