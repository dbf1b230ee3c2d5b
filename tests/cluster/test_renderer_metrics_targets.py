"""launch_all's evaluation renderer and Prometheus: --eval-metrics-port / --eval-metrics-host give each Serve
replica an exporter (off by default, loopback unless told otherwise) whose file_sd target goes where the trainings'
go, and launch_all sweeps that folder of the targets of killed exporters at the start and end of its run."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_serve import make_model_dir, make_requests, serve_ray  # noqa: F401  (serve_ray: a fixture)


def _args(tmp_path: Path, *flags: str):
    from jobs import launch_all
    from jobs._presets import preset_cli

    return preset_cli(launch_all.PRESETS, default="tiny", description="d",
                      args=["--workdir", str(tmp_path / "work"), *flags])


def _renderer_config(tmp_path: Path, monkeypatch, *flags: str):
    """The RendererConfig launch_all's evaluation deploys with ``flags``."""
    import cluster.eval_driver.driver as driver
    from jobs import launch_all

    seen = []
    monkeypatch.setattr(driver, "run_evaluation", lambda config: seen.append(config))
    launch_all._evaluate(_args(tmp_path, *flags), ["017"])
    return seen[0].renderer


def test_the_renderer_gets_an_exporter_and_its_target_folder_only_when_asked(tmp_path: Path, monkeypatch) -> None:
    work = (tmp_path / "work").resolve()
    default = _renderer_config(tmp_path, monkeypatch)
    assert (default.metrics_port, default.metrics_targets_dir) == (None, None)
    asked = _renderer_config(tmp_path, monkeypatch, "--eval-metrics-port", "9500")
    assert (asked.metrics_port, asked.metrics_host) == (9500, "127.0.0.1")
    assert asked.metrics_targets_dir == work / "monitoring" / "targets"  # beside the trainings'
    both = _renderer_config(tmp_path, monkeypatch, "--eval-metrics-port", "0", "--eval-metrics-host", "0.0.0.0",
                            "--train.metrics-port", "9400", "--train.metrics-targets-dir", str(tmp_path / "sd"))
    assert (both.metrics_port, both.metrics_host, both.metrics_targets_dir) == (0, "0.0.0.0", (tmp_path / "sd"))


@pytest.mark.parametrize(("flags", "message"), [
    (["--eval-metrics-port", "65500"], "--eval-metrics-port must be 1 to 65472"),
    (["--eval-metrics-port", "-1"], "--eval-metrics-port must be 1 to 65472"),
    (["--eval-metrics-port", "9500", "--eval-metrics-host", "node1:9500"], "--eval-metrics-host 'node1:9500': "),
    (["--eval-metrics-port", "9500", "--eval-metrics-host", ""], "--eval-metrics-host '': empty"),
    (["--eval-metrics-host", "0.0.0.0"], "--eval-metrics-host needs --eval-metrics-port"),
])
def test_bad_renderer_metrics_options_are_refused_before_any_work(tmp_path: Path, flags, message) -> None:
    from jobs.launch_all import check_options

    assert message in (check_options(_args(tmp_path, *flags)) or "")


def _dead_writer_file(path: Path) -> Path:
    """A target file whose writer (a process of this host, already exited) is gone."""
    from cluster.monitoring import targets

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    labels = {**targets.writer_labels(), "__writer_pid": str(proc.pid), "__writer_started_at": "1000.0"}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{"targets": ["127.0.0.1:9400"], "labels": labels}]))
    return path


@pytest.mark.parametrize("flag", ["--train.metrics-port", "--eval-metrics-port"])
def test_launch_all_sweeps_its_targets_folder_at_the_start_and_the_end(tmp_path: Path, monkeypatch, flag) -> None:
    """A file a killed exporter left before the run is gone when the data stage starts; one left during the run (a
    training killed on its last attempt) is gone when the run ends."""
    from jobs import launch_all

    args = _args(tmp_path, flag, "0", "--no-evaluate")
    folder = tmp_path / "work" / "monitoring" / "targets"
    before = _dead_writer_file(folder / "training-017.json")
    during = folder / "training-018.json"

    def data(args, persons=None, clock=None):
        assert not before.exists(), "not swept at the start"
        _dead_writer_file(during)
        return [], {"018": "killed"}

    monkeypatch.setattr(launch_all, "_data", data)
    launch_all._run(args, SimpleNamespace(close=lambda: None), time.time())
    assert not during.exists() and list(folder.iterdir()) == []


def test_launch_all_without_metrics_sweeps_nothing(tmp_path: Path, monkeypatch) -> None:
    from jobs import launch_all

    dead = _dead_writer_file(tmp_path / "work" / "monitoring" / "targets" / "training-017.json")
    monkeypatch.setattr(launch_all, "_data", lambda args, persons=None, clock=None: ([], {"017": "x"}))
    launch_all._run(_args(tmp_path, "--no-evaluate"), SimpleNamespace(close=lambda: None), time.time())
    assert dead.exists()


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_a_replica_deployed_as_launch_all_asks_writes_its_target_and_serves_metrics(serve_ray, tmp_path: Path,  # noqa: F811
                                                                                   monkeypatch) -> None:
    """The RendererConfig launch_all's evaluation deploys with --eval-metrics-port 0, on a real Serve: the replica
    (a Ray worker process) writes renderer-<replica id>.json into <workdir>/monitoring/targets naming its exporter
    on 127.0.0.1, Prometheus's /metrics there counts the frame it rendered, and the file goes with the replica."""
    from cluster.serve import delete_renderer, deploy_renderer, person_handle

    config = _renderer_config(tmp_path, monkeypatch, "--eval-metrics-port", "0", "--eval-parallel-persons", "1",
                              "--eval-inference-steps", "2")
    config = config.replace(num_cpus=1, device="cpu")
    folder = tmp_path / "work" / "monitoring" / "targets"
    handle = person_handle(deploy_renderer({"p0": make_model_dir(tmp_path / "model")}, config), "p0")
    try:
        info = handle.info.remote().result()
        assert handle.remote(make_requests(1)[0]).result(timeout_s=120).image.shape == (64, 64, 3)
        (path,) = folder.glob("renderer-*.json")
        (group,) = json.loads(path.read_text())
        assert group["targets"] == [f"127.0.0.1:{info['metrics_port']}"]
        assert group["labels"]["component"] == "renderer" and group["labels"]["__writer_pid"] == str(info["pid"])
        with urllib.request.urlopen(f"http://{group['targets'][0]}/metrics", timeout=10) as resp:
            assert 'da_render_frames_total{person="p0"} 1.0' in resp.read().decode()
    finally:
        delete_renderer()
    deadline = time.monotonic() + 60
    while list(folder.glob("renderer-*.json")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert list(folder.glob("renderer-*.json")) == []
