"""Prometheus file-based service discovery (cluster/monitoring/targets.py): the target files a training's and a
renderer replica's exporter write and remove, the options that ask for them, and a real Prometheus that finds an
exporter through one."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from prometheus_client import CollectorRegistry
from test_monitoring import PROMETHEUS, SCRAPE_CONFIG, _free_port, _get, stop_prometheus

from cluster.monitoring import TrainingMetrics, start_exporter


def _targets():
    from cluster.monitoring import targets  # new module: a test of the old tree fails here, not at collection

    return targets


def _read_target(path: Path) -> list[dict]:
    """A target file without its writer record (the ``__writer_*`` labels test_monitoring_target_sweep.py tests),
    which it must have."""
    groups = json.loads(path.read_text())
    for group in groups:
        writer = {k for k in group["labels"] if k.startswith("__writer_")}
        assert writer == {"__writer_host", "__writer_pid", "__writer_pid_space", "__writer_started_at",
                          "__writer_started_boot"}, path
        group["labels"] = {k: v for k, v in group["labels"].items() if k not in writer}
    return groups


def test_register_writes_a_file_sd_target_and_unregister_removes_it(tmp_path: Path, monkeypatch) -> None:
    """The file is Prometheus's file_sd format, written whole (a failed write leaves the earlier file and no
    temporary one); a wildcard bind address is written as this node's name; removing a missing file is fine."""
    targets = _targets()
    folder = tmp_path / "monitoring" / "targets"  # made when missing
    path = targets.register(folder, "training-017", "127.0.0.2", 9403, {"person": "017", "component": "training"})
    assert path == folder / "training-017.json"
    assert _read_target(path) == [{"targets": ["127.0.0.2:9403"],
                                   "labels": {"person": "017", "component": "training"}}]
    monkeypatch.setattr(targets.socket, "getfqdn", lambda: "node7.cluster")
    for wildcard in ("0.0.0.0", "::", ""):
        targets.register(folder, "renderer-a1", wildcard, 9500, {"component": "renderer"})
        assert json.loads((folder / "renderer-a1.json").read_text())[0]["targets"] == ["node7.cluster:9500"]

    def cut_off(self, data):  # a write that fails half-way (full disk)
        Path.write_text(self, "[{\"targ")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", cut_off)
    with pytest.warns(RuntimeWarning, match=r"training-017\.json: cannot write the Prometheus target file"):
        assert targets.register(folder, "training-017", "127.0.0.1", 1, {}) is None
    monkeypatch.undo()
    assert json.loads(path.read_text())[0]["targets"] == ["127.0.0.2:9403"]  # the earlier one, whole
    assert sorted(p.name for p in folder.iterdir()) == ["renderer-a1.json", "training-017.json"]

    targets.unregister(folder, "training-017")
    targets.unregister(folder, "training-017")  # already gone
    assert not path.exists()


def test_an_unwritable_targets_folder_is_a_warning_only(tmp_path: Path) -> None:
    targets = _targets()
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the folder should be: cannot be made, whoever runs the test
    with pytest.warns(RuntimeWarning, match="cannot write the Prometheus target file"):
        assert targets.register(blocked / "targets", "training-017", "127.0.0.1", 9400, {}) is None
    targets.unregister(blocked / "targets", "training-017")  # nothing raised


def _trainer(person: str, records: list, rank: int = 0, world_size: int = 1) -> SimpleNamespace:
    return SimpleNamespace(state=SimpleNamespace(step=0), log=records.append, config=SimpleNamespace(person=person),
                           rank=rank, world_size=world_size)


@pytest.mark.parametrize("end", ["on_train_end", "on_train_error"])
def test_the_training_callback_writes_its_target_and_removes_it_when_the_run_ends(tmp_path: Path, end: str) -> None:
    """--train.metrics-targets-dir: the callback training_callbacks attaches writes training-<person>.json naming its
    bound exporter once it is bound, and removes it (and stops the exporter) when the run ends or fails."""
    from avatars.training import TrainConfig
    from cluster.monitoring.training import PrometheusCallback, training_callbacks

    folder = tmp_path / "targets"
    config = TrainConfig(person="017", shards=tmp_path, out=tmp_path, metrics_port=_free_port(),
                         metrics_targets_dir=folder)
    (prometheus,) = [c for c in training_callbacks(config) if isinstance(c, PrometheusCallback)]
    records: list[dict] = []
    prometheus.on_train_start(_trainer("017", records))
    try:
        port = prometheus.exporter.port
        assert _read_target(folder / "training-017.json") == [
            {"targets": [f"127.0.0.1:{port}"], "labels": {"person": "017", "component": "training"}}]
    finally:
        getattr(prometheus, end)(None, {} if end == "on_train_end" else RuntimeError("a step failed"))
    assert list(folder.iterdir()) == [] and prometheus.exporter is None


def test_each_process_of_a_data_parallel_training_writes_its_own_target(tmp_path: Path) -> None:
    """Every process of a run exports its own port: one file each (one name would be written over by the others,
    and removed by the first to stop)."""
    from cluster.monitoring.training import PrometheusCallback

    callbacks = [PrometheusCallback(_free_port(), targets_dir=tmp_path) for _ in range(2)]
    for rank, callback in enumerate(callbacks):
        callback.on_train_start(_trainer("017", [], rank=rank, world_size=2))
    try:
        files = sorted(p.name for p in tmp_path.iterdir())
        assert files == ["training-017-rank0.json", "training-017-rank1.json"]
        assert json.loads((tmp_path / files[1]).read_text())[0]["labels"]["rank"] == "1"
    finally:
        for callback in callbacks:
            callback.on_train_end(None, {})
    assert list(tmp_path.iterdir()) == []


def test_a_training_whose_targets_folder_cannot_be_written_goes_on_with_its_exporter(tmp_path: Path) -> None:
    from cluster.monitoring.training import PrometheusCallback

    (tmp_path / "file").write_text("")
    prometheus, records = PrometheusCallback(_free_port(), targets_dir=tmp_path / "file" / "targets"), []
    with pytest.warns(RuntimeWarning, match="cannot write the Prometheus target file"):
        prometheus.on_train_start(_trainer("017", records))
    try:
        assert records == [{"step": 0, "metrics_port": prometheus.exporter.port}]
        assert "da_train_loss" in _get(f"http://127.0.0.1:{prometheus.exporter.port}/metrics")
    finally:
        prometheus.on_train_end(None, {})
    assert prometheus.exporter is None


def test_metrics_targets_dir_without_metrics_port_is_refused_when_parsed(tmp_path: Path) -> None:
    from avatars.training import TrainOptions
    from cluster.serve.renderer import RendererConfig

    with pytest.raises(ValueError, match=r"metrics_targets_dir \(--metrics-targets-dir.*needs metrics_port "
                                         r"\(--metrics-port"):
        TrainOptions(metrics_targets_dir=tmp_path)
    with pytest.raises(ValueError, match=r"--renderer\.metrics-targets-dir\) needs metrics_port "
                                         r"\(--renderer\.metrics-port\)"):
        RendererConfig(metrics_targets_dir=tmp_path)
    assert TrainOptions(metrics_port=0, metrics_targets_dir=tmp_path).metrics_targets_dir == tmp_path
    assert RendererConfig(metrics_port=0, metrics_targets_dir=tmp_path).metrics_targets_dir == tmp_path


def test_a_replica_writes_its_target_and_removes_it_when_serve_shuts_it_down(tmp_path: Path, monkeypatch) -> None:
    """The renderer deployment's class built as a replica builds it, in this process without Ray (as
    test_serve.py's ``replica`` fixture): renderer-<replica id>.json, removed by __del__, Serve's shutdown hook."""
    from ray import serve

    import cluster.bind
    from cluster.serve.deployment import AvatarRenderer
    from cluster.serve.renderer import RendererConfig

    monkeypatch.setattr(cluster.bind, "serve_replica_grpc_on_node_ip", lambda node_ip: False)
    batching = AvatarRenderer.func_or_class.render_batch.set_max_batch_size.__self__
    for name in ("_queue", "max_batch_size", "batch_wait_timeout_s"):
        monkeypatch.setattr(batching, name, getattr(batching, name))
    config = RendererConfig(metrics_port=_free_port(), metrics_targets_dir=tmp_path / "targets")
    context = SimpleNamespace(replica_id=SimpleNamespace(unique_id="x7k2"),
                              _deployment_config=SimpleNamespace(max_ongoing_requests=config.max_ongoing_requests))
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)
    replica = AvatarRenderer.func_or_class({"p0": "/nowhere"}, config, 2)
    path = tmp_path / "targets" / "renderer-x7k2.json"
    try:
        assert _read_target(path) == [{"targets": [f"127.0.0.1:{replica.exporter.port}"],
                                       "labels": {"component": "renderer"}}]
    finally:
        replica.__del__()
    assert not path.exists()


def test_launch_all_writes_the_targets_into_its_workdir_only_when_the_metrics_port_is_set(tmp_path, monkeypatch):
    from cluster import orchestrate
    from jobs import launch_all
    from jobs._presets import preset_cli

    submitted = []
    monkeypatch.setattr(orchestrate, "run_all", lambda jobs, config: submitted.append(jobs) or [])

    def targets_dir(*flags: str):
        args = preset_cli(launch_all.PRESETS, default="tiny", description="d", args=[
            "--workdir", str(tmp_path / "work"), "--verbose", *flags])
        launch_all._train(args, ["017"], None)
        ((job,),) = [submitted.pop()]
        return job.kwargs["options"].metrics_targets_dir

    assert targets_dir("--train.metrics-port", "9400") == (tmp_path / "work" / "monitoring" / "targets").resolve()
    assert targets_dir("--train.metrics-port", "9400", "--train.metrics-targets-dir", str(tmp_path / "sd")) == \
        (tmp_path / "sd").resolve()
    assert targets_dir() is None


def test_the_targets_folder_changes_no_stored_evaluation(tmp_path: Path) -> None:
    from cluster.eval_driver.driver import EvalDriverConfig
    from cluster.eval_driver.uptodate import settings_digest
    from cluster.serve.renderer import RendererConfig

    def digest(**renderer):
        return settings_digest(EvalDriverConfig(runs=tmp_path, shards=tmp_path, stores=tmp_path,
                                                reports_root=tmp_path, renderer=RendererConfig(**renderer)))

    assert digest(metrics_port=9500, metrics_targets_dir=tmp_path / "targets") == digest()


@pytest.mark.skipif(not Path(PROMETHEUS).exists(), reason="prometheus binary missing: apt-get install -y prometheus")
def test_real_prometheus_discovers_an_exporter_from_its_target_file(tmp_path: Path) -> None:
    """The shipped discovered-training job, its folder pointed at a test one: Prometheus finds the exporter through
    the file ``register`` wrote and scrapes it, with the file's labels."""
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "diffusion-avatars-training-discovered"]
    job["scrape_interval"] = "1s"
    job["file_sd_configs"][0]["refresh_interval"] = "1s"
    config["scrape_configs"] = [job]
    cfg = tmp_path / "prometheus.yml"  # files: targets/training-*.json, relative to the config's folder
    cfg.write_text(yaml.safe_dump(config))
    registry = CollectorRegistry()
    TrainingMetrics(registry).observe_step("017", step=321, loss=0.5, samples_per_second=1.0)
    exporter = start_exporter(0, addr="127.0.0.1", registry=registry)
    _targets().register(tmp_path / "targets", "training-017", "127.0.0.1", exporter.port,
                        {"person": "017", "component": "training"})
    port = _free_port()
    log = tmp_path / "prometheus.log"
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=log.open("w"))
    query = f"http://127.0.0.1:{port}/api/v1/query?query=" + urllib.parse.quote('da_train_step{person="017"}')
    try:
        deadline, result = time.monotonic() + 30, []
        while time.monotonic() < deadline and not result:
            try:
                result = json.loads(_get(query))["data"]["result"]
            except OSError:
                pass
            assert proc.poll() is None, log.read_text()
            time.sleep(0.5)
        assert result, "nothing discovered and scraped within 30 s:\n" + log.read_text()
        assert float(result[0]["value"][1]) == 321.0
        labels = result[0]["metric"]
        assert labels["component"] == "training" and labels["job"] == "diffusion-avatars-training-discovered"
        assert labels["instance"] == f"127.0.0.1:{exporter.port}"
    finally:
        stop_prometheus(proc)
        exporter.stop()
