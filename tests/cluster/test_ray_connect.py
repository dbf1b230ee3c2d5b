"""The one way a run connects to Ray (cluster/ray_connect.py), with ray.init recorded, not run."""

from __future__ import annotations

import pytest
import ray

from cluster import ray_backend
from cluster.eval_driver import driver
from cluster.preflight import BackendUnavailable
from cluster.ray_connect import HIDE_UNRESERVED_GPUS, EmbeddedRay, connect_ray

HIDE = {"env_vars": HIDE_UNRESERVED_GPUS}  # every run's workers: see test_an_embedded_ray_starts_under_a_long_tmpdir


@pytest.fixture
def inits(monkeypatch):
    """ray.init calls (keyword arguments), with Ray never started; the environment variables
    connect_ray sets are undone after the test."""
    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: bool(calls))
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("TMPDIR", raising=False)  # a long one would add _temp_dir (test below)
    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")
    import ray._private.ray_constants as constants

    monkeypatch.setattr(constants, "ENABLE_RAY_CLUSTER", constants.ENABLE_RAY_CLUSTER)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "1")
    monkeypatch.delenv("RAY_USAGE_STATS_ENABLED")
    return calls


def test_embedded_ray_is_its_own_and_listens_on_loopback(inits, monkeypatch):
    import os

    assert connect_ray(None, EmbeddedRay(num_cpus=2, object_store_memory_mb=100, include_dashboard=False),
                       log_to_driver=False) is True
    assert inits == [dict(address="local", num_cpus=2, num_gpus=None, object_store_memory=100 * 2**20,
                          include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
                          dashboard_host="127.0.0.1", runtime_env=HIDE)]
    assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"  # Ray honours a loopback node IP
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"
    # already connected: that connection is used, nothing is started
    assert connect_ray(None) is False and len(inits) == 1


def test_a_tmpdir_too_long_for_rays_sockets_moves_the_embedded_session_to_tmp(inits, monkeypatch):
    """Ray roots its sockets in TMPDIR on Linux: a long one (a cluster's per-job folder) failed ray.init with
    'AF_UNIX path length cannot exceed 107 bytes'. Short ones, a RAY_TMPDIR the user set and a joined cluster
    are left to Ray."""
    monkeypatch.setenv("TMPDIR", "/scratch/local/" + "j" * 25)  # 40 bytes: one too many
    with pytest.warns(RuntimeWarning, match=r"TMPDIR \(/scratch/local/j+\) is too long a path for Ray's sockets"):
        connect_ray(None)
    assert inits[-1]["_temp_dir"] == "/tmp/ray"
    for env in ({"TMPDIR": "/scratch/local/" + "j" * 24}, {"RAY_TMPDIR": "/r"}, {"RAY_ADDRESS": "10.0.0.5:6379"}):
        inits.clear()
        with monkeypatch.context() as m:
            for name, value in env.items():
                m.setenv(name, value)
            connect_ray(None)
        assert "_temp_dir" not in inits[-1], env


@pytest.mark.ray
def test_an_embedded_ray_starts_under_a_long_tmpdir(tmp_path):
    """For real, in a fresh interpreter: the embedded Ray starts and computes with a 100-byte TMPDIR; and a task
    that reserves no GPU sees none (``CUDA_VISIBLE_DEVICES=""``: Ray 2.60 left it unset, every GPU visible, and
    a CPU person's training or a CPU renderer replica took a GPU Ray had given another task). One Ray start
    checks both: Ray sets the variable from the task's reservation on a machine without a GPU too."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tmpdir = tmp_path / ("t" * 100)
    tmpdir.mkdir()
    script = ("import ray\n"
              "from cluster.ray_connect import EmbeddedRay, connect_ray\n"
              "connect_ray(None, EmbeddedRay(num_cpus=1, include_dashboard=False), log_to_driver=False)\n"
              "print('session', ray.get(ray.remote(lambda: ray.get_runtime_context().get_node_id())"
              ".options(num_cpus=0).remote()) is not None)\n"
              "import os\n"
              "print('gpus', repr(ray.get(ray.remote(lambda: os.environ.get('CUDA_VISIBLE_DEVICES'))"
              ".options(num_cpus=0, num_gpus=0).remote())))\n"
              "ray.shutdown()\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240,
                          env={**env, "TMPDIR": str(tmpdir)}, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0 and "session True" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "too long a path for Ray's sockets" in proc.stderr
    assert "gpus ''" in proc.stdout, proc.stdout[-2000:]


def test_an_embedded_ray_that_times_out_starting_is_started_again_once(monkeypatch, capsys):
    """Ray's "node timed out during startup" (its raylet never registered) is retried once for the
    embedded Ray, after a shutdown of the half-started one; any other error, a second timeout, or a
    timeout joining a cluster is raised."""
    from cluster.ray_connect import NODE_START_TIMEOUT

    calls, shutdowns = [], []
    outcomes: list = []

    def init(**kw):
        calls.append(kw)
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(1))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    timeout = Exception(f"The current {NODE_START_TIMEOUT}. This could happen because ...")
    outcomes[:] = [timeout, None]
    assert connect_ray(None, EmbeddedRay(include_dashboard=False)) is True
    assert len(calls) == 2 and calls[0] == calls[1] and shutdowns == [1]
    assert "starting it again once" in capsys.readouterr().err
    outcomes[:] = [timeout, timeout]
    with pytest.raises(Exception, match=NODE_START_TIMEOUT):
        connect_ray(None)
    outcomes[:] = [RuntimeError("something else")]
    with pytest.raises(RuntimeError, match="something else"):
        connect_ray(None)
    outcomes[:] = [timeout]
    with pytest.raises(Exception, match=NODE_START_TIMEOUT):
        connect_ray("10.0.0.5:6379")
    assert outcomes == [] and len(shutdowns) == 2


def test_a_cluster_is_joined_without_the_embedded_settings(inits, monkeypatch):
    connect_ray("10.0.0.5:6379", EmbeddedRay(num_cpus=2, bind_host="0.0.0.0"), runtime_env={"env_vars": {"A": "1"}})
    assert inits == [dict(address="10.0.0.5:6379", runtime_env={"env_vars": {**HIDE_UNRESERVED_GPUS, "A": "1"}},
                          log_to_driver=True)]
    inits.clear()
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.6:6379")  # inside `ray job submit`
    connect_ray(None, EmbeddedRay(num_cpus=2))
    assert inits == [dict(address="10.0.0.6:6379", log_to_driver=True, runtime_env=HIDE)]


def test_auto_without_a_cluster_says_how_to_get_one(inits, monkeypatch):
    import ray._private.services as services

    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: None)
    with pytest.raises(BackendUnavailable, match="no running Ray cluster"):
        connect_ray("auto")
    assert inits == []


def test_training_backend_and_evaluation_driver_connect_through_it(inits, monkeypatch, tmp_path):
    """Both map their configs onto connect_ray as before: the training backend's embedded Ray
    prints its workers' output and has a dashboard, the evaluation's does neither."""
    backend = ray_backend.RayBackend(ray_backend.RayConfig(num_cpus=3, object_store_memory_mb=64,
                                                           node_ip_address="127.0.0.2"))
    assert backend._connect() is True
    assert inits[-1] == dict(address="local", num_cpus=3, num_gpus=None, object_store_memory=64 * 2**20,
                             log_to_driver=True, _node_ip_address="127.0.0.2", dashboard_host="127.0.0.2",
                             runtime_env=HIDE)
    inits.clear()
    config = driver.EvalDriverConfig(runs=tmp_path, shards=tmp_path, stores=tmp_path, reports_root=tmp_path,
                                     ray_num_cpus=1, metrics=("psnr",))
    monkeypatch.setattr("cluster.serve.deployment.ensure_serve", lambda: (_ for _ in ()).throw(RuntimeError("x")))
    stopped = []
    monkeypatch.setattr("cluster.serve.deployment.shutdown_serve_and_ray", lambda: stopped.append(True))
    with pytest.raises(RuntimeError, match="^x$"):
        driver._render_all(config, tmp_path, [], {}, {}, {}, {})
    assert inits == [dict(address="local", num_cpus=1, num_gpus=None, object_store_memory=512 * 2**20,
                          include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
                          dashboard_host="127.0.0.1", runtime_env=HIDE)]
    assert stopped == [True]  # the driver started this Ray, so it stops it


def test_launch_all_starts_one_ray_for_training_and_evaluation(inits, monkeypatch, tmp_path):
    """The main job's training (Ray backend) and evaluation connect through connect_ray as
    before, but to the one Ray the run started first; it is stopped once, at the end."""
    from cluster.eval_driver.driver import EvalSummary
    from cluster.person_job import JobResult
    from cluster.ray_connect import RaySession
    from jobs import launch_all

    stopped = []
    monkeypatch.setattr(ray, "is_initialized", lambda: len(inits) > len(stopped))
    monkeypatch.setattr(ray, "shutdown", lambda: stopped.append("ray"))
    monkeypatch.setattr("cluster.serve.deployment.shutdown_serve_and_ray", lambda: stopped.append("serve+ray"))
    monkeypatch.setattr(launch_all, "_data", lambda args, persons=None, clock=None: (["000", "001"], {}))
    monkeypatch.setattr(launch_all, "_base_model", lambda args, persons: None)
    monkeypatch.setattr(launch_all, "_trained", lambda args, persons, base: {})

    def run_all(jobs, config):  # the Ray backend, connecting as it does
        backend = ray_backend.RayBackend(config)
        assert backend._connect() is False  # the run's Ray: used, left open
        # every person's job shares one compiled-code folder (used with --compile)
        assert {j.kwargs["options"].compile_cache for j in jobs} == {(tmp_path / "work" / "compile-cache"
                                                                      / "train").resolve()}
        return [JobResult(j.person, True, 1, result={"steps": 1}) for j in jobs]

    def evaluate(args, persons):  # the evaluation driver, connecting as it does
        assert connect_ray(args.ray_address, EmbeddedRay(include_dashboard=False), log_to_driver=False) is False
        return EvalSummary("2025-01-01", tmp_path / "results.json", None, persons, {}, 0, 0.0, {})

    monkeypatch.setattr("cluster.orchestrate.run_all", run_all)
    monkeypatch.setattr(launch_all, "_evaluate", evaluate)
    import logging

    serve_log = logging.getLogger("ray.serve")
    monkeypatch.setattr(serve_log, "filters", [])
    monkeypatch.setattr(serve_log, "level", serve_log.level)
    args = launch_all.LaunchAllArgs(workdir=tmp_path / "work", min_free_gb=0)
    assert launch_all.main(args) == 0
    assert len(inits) == 1 and inits[0]["address"] == "local" and inits[0]["log_to_driver"] is False
    assert len(stopped) == 1
    # Serve's own notices stay off the terminal even after importing Serve resets its level
    record = lambda level, msg: logging.LogRecord("ray.serve", level, __file__, 1, msg, None, None)  # noqa: E731
    assert not serve_log.filter(record(logging.INFO, "Application 'avatars-1' is ready."))
    assert not serve_log.filter(record(logging.WARNING, "Failed to get queue length from Replica(id='x') within 0.1s"))
    assert serve_log.filter(record(logging.WARNING, "Replica 'x' died unexpectedly"))

    session = RaySession(None, EmbeddedRay(num_cpus=1))  # connect once, close once
    session.connect()
    session.connect()
    session.close()
    session.close()
    assert len(inits) == 2 and len(stopped) == 2


def test_embedded_ray_offers_the_gpus_it_is_given(inits):
    """EmbeddedRay.num_gpus and RayConfig.num_gpus reach ray.init as the embedded Ray's GPUs (None: Ray detects)."""
    assert connect_ray(None, EmbeddedRay(num_gpus=1)) is True
    assert inits[-1]["address"] == "local" and inits[-1]["num_gpus"] == 1
    inits.clear()
    assert ray_backend.RayBackend(ray_backend.RayConfig(num_gpus=2))._connect() is True
    assert inits[-1]["address"] == "local" and inits[-1]["num_gpus"] == 2


def test_evaluation_driver_ray_listens_on_its_bind_host_with_its_object_store(inits, monkeypatch, tmp_path):
    """EvalDriverConfig.ray_bind_host and ray_object_store_mb reach the embedded Ray the driver starts."""
    config = driver.EvalDriverConfig(runs=tmp_path, shards=tmp_path, stores=tmp_path, reports_root=tmp_path,
                                     metrics=("psnr",), ray_bind_host="127.0.0.2", ray_object_store_mb=96)
    monkeypatch.setattr("cluster.serve.deployment.ensure_serve", lambda: (_ for _ in ()).throw(RuntimeError("x")))
    monkeypatch.setattr("cluster.serve.deployment.shutdown_serve_and_ray", lambda: None)
    with pytest.raises(RuntimeError, match="^x$"):
        driver._render_all(config, tmp_path, [], {}, {}, {}, {})
    assert inits == [dict(address="local", num_cpus=None, num_gpus=None, object_store_memory=96 * 2**20,
                          include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.2",
                          dashboard_host="127.0.0.2", runtime_env=HIDE)]


@pytest.mark.parametrize("where", ["embedded", "joined", "RAY_ADDRESS", "connected before"])
def test_the_evaluation_driver_leaves_other_runs_serve_applications_on_a_cluster(inits, monkeypatch, tmp_path, where):
    """Its own embedded Ray goes with Serve; on a cluster (--ray-address, RAY_ADDRESS inside `ray job submit`, or a
    connection the process had) only its renderer application is deleted: serve.shutdown would delete every
    application on the cluster, other runs' renderers too. A connection it opened is closed."""
    calls = []
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("ray.shutdown"))
    monkeypatch.setattr("cluster.serve.deployment.deploy_renderer", lambda models, config, name, **kw: "handle")
    monkeypatch.setattr("cluster.serve.deployment.delete_renderer", lambda name: calls.append(f"delete {name}"))
    monkeypatch.setattr("cluster.serve.deployment.shutdown_serve_and_ray", lambda: calls.append("serve.shutdown"))
    if where == "RAY_ADDRESS":
        monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    if where == "connected before":
        inits.append({})
    config = driver.EvalDriverConfig(runs=tmp_path, shards=tmp_path, stores=tmp_path, reports_root=tmp_path,
                                     metrics=("psnr",), ray_address="10.0.0.5:6379" if where == "joined" else None)
    assert driver._render_all(config, tmp_path, [], {}, {}, {}, {}, app="avatars-run42") == 0
    assert calls == {"embedded": ["serve.shutdown"], "joined": ["delete avatars-run42", "ray.shutdown"],
                     "RAY_ADDRESS": ["delete avatars-run42", "ray.shutdown"],
                     "connected before": ["delete avatars-run42"]}[where]


@pytest.mark.parametrize("delete_fails", [False, True])
def test_a_renderer_that_fails_to_deploy_on_a_cluster_is_deleted_too(inits, monkeypatch, tmp_path, delete_fails):
    """serve.run raises on DEPLOY_FAILED (replicas that crash in their constructor) without deleting the application,
    and waits without end for GPUs a shared cluster lacks until Ctrl-C: the application was left on the cluster,
    a new one every night. It is deleted now; a deletion that fails is a warning, never in place of the error."""
    calls = []
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("ray.shutdown"))

    def deploy(models, config, name, **kw):
        raise RuntimeError("Deploying application avatars-run42 failed: replica constructor raised")

    def delete(name):
        calls.append(f"delete {name}")
        if delete_fails:
            raise ConnectionError("the controller went away")

    monkeypatch.setattr("cluster.serve.deployment.deploy_renderer", deploy)
    monkeypatch.setattr("cluster.serve.deployment.delete_renderer", delete)
    config = driver.EvalDriverConfig(runs=tmp_path, shards=tmp_path, stores=tmp_path, reports_root=tmp_path,
                                     metrics=("psnr",), ray_address="10.0.0.5:6379")
    with pytest.raises(RuntimeError, match="replica constructor raised"):
        driver._render_all(config, tmp_path, ["000"], {"000": None}, {}, {}, {}, app="avatars-run42")
    assert calls == ["delete avatars-run42", "ray.shutdown"]
