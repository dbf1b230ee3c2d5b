"""Exporter output, the shipped scrape config and dashboard, and a real Prometheus scrape."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from cluster.monitoring import RendererMetrics, TrainingMetrics, start_exporter

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
DASHBOARD = ROOT / "cluster" / "monitoring" / "grafana-dashboard.json"
SCRAPE_CONFIG = ROOT / "cluster" / "monitoring" / "prometheus.yml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


@pytest.fixture()
def exporter():
    registry = CollectorRegistry()
    train, render = TrainingMetrics(registry), RendererMetrics(registry)
    train.observe_step("p1", step=1234, loss=0.25, samples_per_second=4.5,
                       learning_rates={"controlnet": 1e-4, "triplanes": 1e-2}, memory_bytes={"cpu_rss": 2.0e9})
    for _ in range(3):
        render.observe_batch("p1", frames=8, seconds=2.0)
        render.observe_request("p1", 0.7)
    render.observe_batch("p2", frames=4, seconds=1.0)
    render.set_queue_length("p1", 5)
    exp = start_exporter(0, addr="127.0.0.1", registry=registry)
    yield exp
    exp.stop()


def _dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] if p["type"] != "row" for t in p["targets"]]


def test_exporter_serves_all_dashboard_metrics(exporter) -> None:
    text = _get(f"http://127.0.0.1:{exporter.port}/metrics")
    assert 'da_render_frames_total{person="p1"} 24.0' in text
    assert 'da_render_frames_per_second{person="p1"} 4.0' in text
    assert 'da_render_batch_size_bucket{le="8.0",person="p1"} 3.0' in text
    assert 'da_train_learning_rate{group="triplanes",person="p1"} 0.01' in text
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["schemaVersion"] >= 30 and len(dash["panels"]) >= 10
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for expr in _dashboard_exprs():  # every metric the dashboard uses is exported
        names = {w for w in expr.replace("(", " ").replace("{", " ").split() if w.startswith("da_")}
        for name in names:
            base = name.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
            assert f"\n{base}" in text or f"\n{name}" in text, name


@pytest.mark.skipif(not Path(PROMETHEUS).exists(), reason="prometheus binary missing: apt-get install -y prometheus")
def test_real_prometheus_scrapes_exporter(exporter, tmp_path: Path) -> None:
    # Derive the test config from the shipped one: same jobs, targets pointed at the test exporter.
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    config["global"]["scrape_interval"] = "1s"
    for job in config["scrape_configs"]:
        job["scrape_interval"] = "1s"
    config["scrape_configs"] = [j for j in config["scrape_configs"] if j["job_name"].endswith("renderer")]
    config["scrape_configs"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{exporter.port}"]
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(yaml.safe_dump(config))
    port = _free_port()
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle"],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("w"),
    )
    api = f"http://127.0.0.1:{port}/api/v1/query?query="
    try:
        deadline, result = time.monotonic() + 30, []
        while time.monotonic() < deadline:
            try:
                body = json.loads(_get(api + urllib.parse.quote('da_render_frames_total{person="p1"}')))
                result = body["data"]["result"]
                if result:
                    break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            time.sleep(0.5)
        assert result, "no sample scraped within 30 s:\n" + (tmp_path / "prometheus.log").read_text()
        assert float(result[0]["value"][1]) == 24.0
        labels = result[0]["metric"]
        assert labels["component"] == "renderer" and labels["job"] == "diffusion-avatars-renderer"
        # The dashboard's PromQL is valid for this Prometheus and returns data where it must.
        for expr in _dashboard_exprs():
            q = expr.replace("$person", ".*").replace("$__rate_interval", "10s").replace("$__range", "1m")
            body = json.loads(_get(api + urllib.parse.quote(q)))
            assert body["status"] == "success", (q, body)
        body = json.loads(_get(api + urllib.parse.quote('da_train_step{person=~".*"}')))
        assert float(body["data"]["result"][0]["value"][1]) == 1234.0
    finally:
        stop_prometheus(proc)


def stop_prometheus(proc: subprocess.Popen) -> None:
    """Stop a Prometheus started by a test (by its pid: SIGTERM, then SIGKILL after 10 s)."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_exporters_listen_on_loopback_unless_told_otherwise() -> None:
    from prometheus_client import CollectorRegistry

    from cluster.monitoring import start_exporter_in_range

    default = start_exporter_in_range(19580, CollectorRegistry())
    wide = start_exporter_in_range(19580, CollectorRegistry(), addr="0.0.0.0")  # the explicit cluster setting
    try:
        assert default.server.server_address[0] == "127.0.0.1"
        assert wide.server.server_address[0] == "0.0.0.0" and wide.port != default.port
    finally:
        default.stop()
        wide.stop()


def test_a_failed_training_stops_its_exporter(tmp_path: Path, monkeypatch) -> None:
    """A run that raises after on_train_start (here its first batch) frees its exporter's port through
    on_train_error (on_train_end runs only on success): the next attempt in the same Ray worker gets the
    same port, and no stale gauges stay up. A callback failing in on_train_error does not stop the others,
    and the run's own error is the one raised; a set-up that fails before the rank is known still tells them."""
    from avatars.training import TrainConfig, TrainerCallback
    from avatars.training import trainer as trainer_module
    from cluster.monitoring.training import PrometheusCallback

    class Broken(TrainerCallback):
        def on_train_error(self, trainer, error):
            raise OSError("cannot close")

    class Recorder(TrainerCallback):
        errors: list[BaseException] = []

        def on_train_error(self, trainer, error):
            self.errors.append(error)

    def set_up(trainer):
        trainer.rank, trainer.world_size, trainer.engine = 0, 1, None

    def first_batch(trainer):
        raise RuntimeError("a step failed")

    monkeypatch.setattr(trainer_module.Trainer, "setup", set_up)
    monkeypatch.setattr(trainer_module.Trainer, "batches", first_batch)
    config = TrainConfig(person="000", shards=tmp_path, out=tmp_path)
    port = _free_port()
    for _ in range(2):  # the second attempt binds the port the first one freed
        prometheus = PrometheusCallback(port)
        trainer = trainer_module.Trainer(config, [Broken(), prometheus, Recorder()])
        with pytest.warns(UserWarning, match="Broken.on_train_error failed"):
            with pytest.raises(RuntimeError, match="a step"):
                trainer.train()
        assert prometheus.exporter is None
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0
    assert [str(e) for e in Recorder.errors] == ["a step failed"] * 2

    def set_up_fails(trainer):
        raise ValueError("no shards")

    monkeypatch.setattr(trainer_module.Trainer, "setup", set_up_fails)
    with pytest.raises(ValueError, match="no shards"):
        trainer_module.Trainer(config, [PrometheusCallback(port), Recorder()]).train()
    assert str(Recorder.errors[-1]) == "no shards"


def test_memory_kinds_are_the_ones_the_help_text_names(monkeypatch) -> None:
    """da_train_memory_bytes' help lists exactly the kinds the training reports (it named gpu_reserved,
    which is never sent, and not gpu_peak, which is)."""
    import torch

    from cluster.monitoring.training import memory_bytes

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: 1)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 2)
    help_text = TrainingMetrics(CollectorRegistry()).memory_bytes._documentation
    named = set(help_text.split("kind: ", 1)[1].rstrip(")").split(", "))
    assert named == set(memory_bytes())


def test_metrics_host_is_the_address_the_training_exporter_listens_on(tmp_path: Path) -> None:
    """--train.metrics-host 127.0.0.2: the Prometheus callback the cluster attaches (training_callbacks) serves
    there and not on 127.0.0.1, the default's address."""
    from types import SimpleNamespace

    from avatars.training import TrainConfig
    from cluster.monitoring.training import PrometheusCallback, training_callbacks

    port = _free_port()
    for host, other in (("127.0.0.2", "127.0.0.1"), (None, "127.0.0.2")):
        options = {"metrics_host": host} if host else {}  # None: the default
        config = TrainConfig(person="000", shards=tmp_path, out=tmp_path, metrics_port=port, **options)
        (prometheus,) = [c for c in training_callbacks(config) if isinstance(c, PrometheusCallback)]
        records: list[dict] = []
        prometheus.on_train_start(SimpleNamespace(state=SimpleNamespace(step=0), log=records.append))
        try:
            address = host or "127.0.0.1"
            assert prometheus.exporter.server.server_address[0] == address
            assert records == [{"step": 0, "metrics_port": prometheus.exporter.port}]
            assert "da_train_loss" in _get(f"http://{address}:{prometheus.exporter.port}/metrics")
            with socket.socket() as s:
                assert s.connect_ex((other, prometheus.exporter.port)) != 0
        finally:
            prometheus.on_train_end(None, {})


def test_an_exporter_that_cannot_start_is_said_and_the_training_goes_on(tmp_path: Path, capsys, monkeypatch) -> None:
    """An address this node does not have (a cluster's address set for another node), or every port of the range
    taken: the exporter's error names the address (it said 'no free Prometheus port in 19800..19863' for an address
    that is not there) and the training callback logs it and goes on; before, the person failed on every attempt."""
    from types import SimpleNamespace

    import cluster.monitoring.training as training
    from cluster.monitoring import start_exporter_in_range

    with pytest.raises(OSError, match=r"cannot start the Prometheus exporter on 192\.0\.2\.1:\d+: .*ssign"):
        start_exporter_in_range(_free_port(), CollectorRegistry(), addr="192.0.2.1")  # TEST-NET-1: nobody's
    port = _free_port()
    taken = [start_exporter_in_range(port, CollectorRegistry(), span=2) for _ in range(2)]
    monkeypatch.setattr(training, "start_exporter_in_range",  # a range of the two taken ports
                        lambda first, registry, addr: start_exporter_in_range(first, registry, span=2, addr=addr))
    try:
        prometheus, records = training.PrometheusCallback(port), []
        prometheus.on_train_start(SimpleNamespace(state=SimpleNamespace(step=0), log=records.append,
                                                  config=SimpleNamespace(person="000")))
        assert prometheus.exporter is None
        assert records == [{"step": 0, "metrics_error": records[0]["metrics_error"]}]
        assert f"no free Prometheus port in {port}..{port + 1}" in records[0]["metrics_error"]
        assert "000: WARNING: training without its Prometheus exporter" in capsys.readouterr().err
        prometheus.on_train_end(None, {})  # nothing to stop
    finally:
        for exporter in taken:
            exporter.stop()
