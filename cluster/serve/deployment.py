"""Ray Serve deployment of one person's avatar (the only Ray-specific part of the renderer).

One application per person, named ``avatar-<person>``, whose single deployment
:class:`AvatarRenderer` holds the person's trained model in each replica. Callers send
:class:`~cluster.serve.renderer.RenderRequest` objects through the handle returned by
:func:`deploy_renderer`; ``@serve.batch`` collects concurrent requests of a replica into one
pipeline call. Each replica exports Prometheus metrics (frames, frames/s, queue length, batch
size, latency histogram) through `cluster.monitoring.RendererMetrics` on its own registry.

    handle = deploy_renderer("017", runs / "017" / "model", RendererConfig(max_batch_size=8))
    results = [r.result() for r in [handle.remote(req) for req in requests]]
    delete_renderer("017")
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import sys
import time
from pathlib import Path

from ray import serve

from cluster.monitoring import start_exporter_in_range
from cluster.serve.renderer import FrameRenderer, RendererConfig, RenderRequest, RenderResult

log = logging.getLogger(__name__)
APP_PREFIX = "avatar-"
def app_name(person: str) -> str:
    return f"{APP_PREFIX}{person}"


@serve.deployment(name="renderer")
class AvatarRenderer:
    """Serve replica rendering one person's frames in batches (see module docstring)."""

    def __init__(self, person: str, model_dir: str, config: RendererConfig):
        import torch
        from prometheus_client import CollectorRegistry
        from ray._private.services import get_node_ip_address

        from cluster.bind import serve_replica_grpc_on_node_ip
        from cluster.monitoring import RendererMetrics

        serve_replica_grpc_on_node_ip(get_node_ip_address())  # an embedded (loopback) Ray: nothing on [::]

        if config.num_cpus >= 1 and not (config.num_gpus > 0 and torch.cuda.is_available()):
            torch.set_num_threads(int(config.num_cpus))
        self.person = person
        self.config = config
        self.renderer = FrameRenderer(Path(model_dir), config)
        self.registry = CollectorRegistry()
        self.metrics = RendererMetrics(self.registry)
        self.metrics.set_queue_length(person, 0)
        self.exporter = (start_exporter_in_range(config.metrics_port, self.registry, addr=config.metrics_host)
                         if config.metrics_port else None)
        self._waiting = 0
        self.render_batch.set_max_batch_size(config.max_batch_size)
        self.render_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        log.info("renderer for %s ready on %s (metrics port %s)", person, self.renderer.device,
                 self.exporter.port if self.exporter else None)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def render_batch(self, requests: list[RenderRequest]) -> list[RenderResult]:
        self._waiting -= len(requests)
        self.metrics.set_queue_length(self.person, self._waiting)
        # The pipeline blocks: run it in a thread so the replica keeps accepting (and counting) requests.
        results = await asyncio.to_thread(self.renderer.render, requests)
        self.metrics.observe_batch(self.person, len(requests), results[0].render_seconds)
        return results

    async def __call__(self, request: RenderRequest) -> RenderResult:
        self.renderer.check(request)  # a malformed request fails alone, not its whole batch
        arrived = time.perf_counter()
        self._waiting += 1
        self.metrics.set_queue_length(self.person, self._waiting)
        result = await self.render_batch(request)
        self.metrics.observe_request(self.person, time.perf_counter() - arrived)
        return result

    def info(self) -> dict:
        """Model facts the driver checks before sending requests."""
        r = self.renderer
        return {"person": self.person, "resolution": r.resolution, "expression_dim": r.expression_dim,
                "device": str(r.device), "pid": os.getpid(),
                "metrics_port": self.exporter.port if self.exporter else None}

    def metrics_text(self) -> str:
        """This replica's Prometheus metrics in the text exposition format."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()

    def __del__(self):
        exporter = getattr(self, "exporter", None)
        if exporter is not None:
            exporter.stop()


def _is_shutdown_noise(line: str) -> bool:
    """What Ray reports when ``serve.shutdown()`` kills the controller while calls to it are
    pending: ``(raylet) Task ServeController.listen_for_change failed ... killed by `ray.kill`.``
    (once per pending call). Expected at every shutdown, never a failure."""
    return "ServeController." in line and "ray.kill" in line


class _DropShutdownNoise(io.TextIOBase):
    """A text stream that passes everything on to ``stream`` except :func:`_is_shutdown_noise`
    lines (and the newline ``print`` writes after one)."""

    def __init__(self, stream):
        self.stream = stream
        self._dropped = False

    def write(self, text: str) -> int:
        if _is_shutdown_noise(text) or (self._dropped and text == "\n"):
            self._dropped = text != "\n"
            return len(text)
        self._dropped = False
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def shutdown_serve_and_ray() -> None:
    """``serve.shutdown()`` then ``ray.shutdown()``, without the wall of controller-killed
    reports Ray's error listener prints to stdout meanwhile (it stops with ``ray.shutdown``)."""
    import ray

    stdout = sys.stdout
    sys.stdout = _DropShutdownNoise(stdout)
    try:
        serve.shutdown()
        ray.shutdown()
    finally:
        sys.stdout = stdout


def ensure_serve() -> None:
    """Start Serve without HTTP proxies (handles only) unless it already runs on this cluster."""
    serve.start(proxy_location="Disabled")


def deploy_renderer(person: str, model_dir: Path, config: RendererConfig | None = None):
    """Deploy (or redeploy) `person`'s renderer application; returns its DeploymentHandle once
    every replica has loaded the model. Needs `ray.init` first."""
    config = config or RendererConfig()
    model_dir = Path(model_dir).resolve()
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no trained avatar for person {person} (config.json missing)")
    ensure_serve()
    actor_options = {"num_cpus": config.num_cpus, "num_gpus": config.num_gpus}
    app = AvatarRenderer.options(
        num_replicas=config.num_replicas, max_ongoing_requests=config.max_ongoing_requests,
        ray_actor_options=actor_options,
    ).bind(person, str(model_dir), config)
    try:
        return serve.run(app, name=app_name(person), route_prefix=None)
    except RuntimeError as e:  # Serve's own message names no cause: add the replicas' error
        raise RuntimeError(f"renderer for person {person} ({model_dir}) failed to start: "
                           f"{_deploy_error(person)}") from e


def _deploy_error(person: str) -> str:
    try:
        app = serve.status().applications.get(app_name(person))
        messages = [d.message for d in (app.deployments.values() if app else []) if d.message]
        text = " | ".join(messages) or (app.message if app else "") or "no details from Serve"
    except Exception as e:  # the status itself failed: still report something useful
        text = f"(status unavailable: {e})"
    lines = [ln for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errors[-1] if errors else lines[-1] if lines else text).strip()[:2000]


def delete_renderer(person: str) -> None:
    """Remove `person`'s application (its replicas free their CPUs / GPUs)."""
    serve.delete(app_name(person))
