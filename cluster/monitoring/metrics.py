"""prometheus_client metric definitions (labelled by person) and the exporter.

Each component owns one object (`TrainingMetrics` / `RendererMetrics`) bound to a registry,
so tests and multi-tenant processes can use a private `CollectorRegistry` instead of the
global one. Every process exposes its own port (see monitoring/prometheus.yml): training
workers from DEFAULT_TRAINING_PORT upwards, renderer replicas from DEFAULT_RENDERER_PORT.
"""

from __future__ import annotations

import errno
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

#: First exporter port of training processes (one port per process: 9400, 9401, ...).
DEFAULT_TRAINING_PORT = 9400
#: First exporter port of renderer replicas (9500, 9501, ...).
DEFAULT_RENDERER_PORT = 9500

#: Batch sizes the renderer uses (Ray Serve max_batch_size is a power of two up to 64).
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
#: Request latency buckets in seconds: a 20-step DDPM frame takes ~0.1 s (tiny) to tens of s (512px CPU).
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class TrainingMetrics:
    """Per-person training progress: step, loss, samples/s, learning rate, memory."""

    def __init__(self, registry: CollectorRegistry = REGISTRY):
        self.step = Gauge("da_train_step", "Current optimizer step", ["person"], registry=registry)
        self.loss = Gauge("da_train_loss", "Training loss of the latest step", ["person"], registry=registry)
        self.samples_per_second = Gauge(
            "da_train_samples_per_second", "Training throughput over the latest logging window", ["person"],
            registry=registry,
        )
        self.learning_rate = Gauge(
            "da_train_learning_rate", "Learning rate per parameter group", ["person", "group"], registry=registry
        )
        self.memory_bytes = Gauge(
            "da_train_memory_bytes", "Memory in use (kind: cpu_rss, gpu_allocated, gpu_peak)", ["person", "kind"],
            registry=registry,
        )

    def observe_step(
        self,
        person: str,
        step: int,
        loss: float,
        samples_per_second: float,
        learning_rates: dict[str, float] | None = None,
        memory_bytes: dict[str, float] | None = None,
    ) -> None:
        """Record one logging step of `person`'s trainer."""
        self.step.labels(person).set(step)
        self.loss.labels(person).set(loss)
        self.samples_per_second.labels(person).set(samples_per_second)
        for group, lr in (learning_rates or {}).items():
            self.learning_rate.labels(person, group).set(lr)
        for kind, value in (memory_bytes or {}).items():
            self.memory_bytes.labels(person, kind).set(value)


class RendererMetrics:
    """Per-person renderer activity: frames, frames/s, queue length, batch sizes, latency."""

    def __init__(self, registry: CollectorRegistry = REGISTRY):
        self.frames = Counter("da_render_frames", "Frames rendered", ["person"], registry=registry)
        self.frames_per_second = Gauge(
            "da_render_frames_per_second", "Frames per second of the latest batch", ["person"], registry=registry
        )
        self.queue_length = Gauge(
            "da_render_queue_length", "Requests waiting to be rendered", ["person"], registry=registry
        )
        self.batch_size = Histogram(
            "da_render_batch_size", "Frames per rendered batch", ["person"], buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.latency = Histogram(
            "da_render_request_latency_seconds", "Time from request to rendered frame", ["person"],
            buckets=LATENCY_BUCKETS, registry=registry,
        )

    def observe_batch(self, person: str, frames: int, seconds: float) -> None:
        """Record one rendered batch of `frames` frames that took `seconds` of compute."""
        self.frames.labels(person).inc(frames)
        self.batch_size.labels(person).observe(frames)
        if seconds > 0:
            self.frames_per_second.labels(person).set(frames / seconds)

    def observe_request(self, person: str, latency_seconds: float) -> None:
        """Record the end-to-end latency of one request."""
        self.latency.labels(person).observe(latency_seconds)

    def set_queue_length(self, person: str, length: int) -> None:
        self.queue_length.labels(person).set(length)


@dataclass
class Exporter:
    """A running /metrics HTTP endpoint; `port` is the bound port (useful with port=0)."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


#: Exporters listen on loopback unless told otherwise (a Prometheus on another machine needs the
#: node's address or 0.0.0.0: `--train.metrics-host` / `--renderer.metrics-host`).
DEFAULT_HOST = "127.0.0.1"


def start_exporter(port: int, addr: str = DEFAULT_HOST, registry: CollectorRegistry = REGISTRY) -> Exporter:
    """Serve `registry` on http://addr:port/metrics from a daemon thread (port 0 = pick a free one)."""
    try:
        server, thread = start_http_server(port, addr=addr, registry=registry)
    except OSError as e:
        raise OSError(f"cannot start the Prometheus exporter on {addr}:{port}: {e}") from e
    return Exporter(server, thread)


#: Ports tried from the first one: the processes of one node (several persons' trainers,
#: several renderer replicas) each take the next free port of the range.
PORT_RANGE = 64


def start_exporter_in_range(first_port: int, registry: CollectorRegistry = REGISTRY,
                            span: int = PORT_RANGE, addr: str = DEFAULT_HOST) -> Exporter:
    """Start the exporter on `addr` at the first free port of [first_port, first_port + span). Only a port in use
    moves on to the next: any other error (an `addr` this machine does not have, a port it may not bind) is
    raised at once, naming it (it was reported as 'no free port in the range')."""
    last_error: OSError | None = None
    for port in range(first_port, first_port + span):
        try:
            return start_exporter(port, addr=addr, registry=registry)
        except OSError as e:
            if not isinstance(e.__cause__, OSError) or e.__cause__.errno != errno.EADDRINUSE:
                raise
            last_error = e
    raise OSError(f"no free Prometheus port in {first_port}..{first_port + span - 1}: {last_error}")
