"""Ray Serve deployment of the avatar renderer (the only Ray-specific part of the renderer).

One application (``avatars`` unless named otherwise) serves every person: its deployment
:class:`AvatarRenderer` loads a person's trained model in a replica on the first request for
that person (Serve model multiplexing: the person id is the multiplexed model id) and keeps the
most recently used ones (LRU). A replica's process start and its imports of torch and diffusers
(~7 CPU s on CPU) are paid once per replica, not once per person, and Serve routes a person's
requests to the replicas that already hold its model. Callers send
:class:`~cluster.serve.renderer.RenderRequest` objects through :func:`person_handle`;
``@serve.batch`` collects concurrent requests of a replica into one pipeline call (Serve splits a
batch by person, so a batch is always one model). A person whose model cannot be loaded (missing
or corrupt checkpoint) gets that error on each of its calls; the others are not affected. Each
replica exports Prometheus metrics (frames, frames/s, queue length, batch size, latency histogram,
all per person) through `cluster.monitoring.RendererMetrics` on its own registry.

    handle = deploy_renderer({"017": runs / "017" / "model", "018": ...}, RendererConfig(num_replicas=2))
    h017 = person_handle(handle, "017")
    results = [r.result() for r in [h017.remote(req) for req in requests]]
    delete_renderer()
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from ray import serve

from cluster.monitoring import start_exporter_in_range
from cluster.serve.renderer import FrameRenderer, RendererConfig, RenderRequest, RenderResult

log = logging.getLogger(__name__)
#: The renderer application's name unless the caller names it (one per evaluation run on a shared cluster).
APP_NAME = "avatars"


class ModelLoadError(RuntimeError):
    """A person's model could not be loaded in a replica; names the person, its folder and the cause."""

    def __init__(self, person: str, model_dir: str, cause: str):
        self.person, self.model_dir, self.cause = person, model_dir, cause
        super().__init__(f"renderer could not load the avatar of person {person} from {model_dir}: {cause}")

    def __reduce__(self):  # crosses Ray's process boundary with its fields
        return type(self), (self.person, self.model_dir, self.cause)


@serve.deployment(name="renderer")
class AvatarRenderer:
    """Serve replica rendering the frames of any of ``models``' persons in batches (see module docstring)."""

    def __init__(self, models: dict[str, str], config: RendererConfig, max_models: int = 2):
        import torch
        from prometheus_client import CollectorRegistry
        from ray._private.services import get_node_ip_address

        from cluster.bind import serve_replica_grpc_on_node_ip
        from cluster.monitoring import RendererMetrics

        serve_replica_grpc_on_node_ip(get_node_ip_address())  # an embedded (loopback) Ray: nothing on [::]

        if config.num_cpus >= 1 and not (config.num_gpus > 0 and torch.cuda.is_available()):
            torch.set_num_threads(int(config.num_cpus))
        self.models = dict(models)
        self.config = config
        self.registry = CollectorRegistry()
        self.metrics = RendererMetrics(self.registry)
        # 0 is a port the system picks (as the training's exporter takes it), not "no exporter"; one that cannot
        # start is said in the replica's log and its info ("metrics_error"): the night renders without it
        self.exporter, self.metrics_error = None, None
        if config.metrics_port is not None:
            try:
                self.exporter = start_exporter_in_range(config.metrics_port, self.registry, addr=config.metrics_host)
            except OSError as e:
                self.metrics_error = str(e)
                print(f"renderer replica: WARNING: rendering without its Prometheus exporter: {e}", file=sys.stderr,
                      flush=True)
        # its target file for Prometheus' file_sd (best effort: a folder that cannot be written is a warning), removed
        # in __del__, which Serve calls when it shuts the replica down (a killed replica's goes at the next sweep of
        # the folder: cluster/monitoring/targets.py)
        self.target_name = None
        if self.exporter is not None and config.metrics_targets_dir is not None:
            from cluster.monitoring.targets import register

            name = f"renderer-{serve.get_replica_context().replica_id.unique_id}"
            if register(config.metrics_targets_dir, name, config.metrics_host, self.exporter.port,
                        {"component": "renderer"}) is not None:
                self.target_name = name
        self._waiting: dict[str, set[int]] = {}  # person -> ids of the requests waiting for their batch
        self._failed: dict[str, ModelLoadError] = {}
        self.render_batch.set_max_batch_size(config.max_batch_size)
        self.render_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        # a person's model is loaded on its first request, in a thread (the replica keeps serving)
        async def renderer(person: str) -> FrameRenderer:  # a function: Serve keeps its model cache on it
            return await self._load(person)

        self._renderer = serve.multiplexed(max_num_models_per_replica=max_models)(renderer)
        log.info("renderer for %d persons ready (metrics port %s)", len(self.models),
                 self.exporter.port if self.exporter else None)

    async def _load(self, person: str) -> FrameRenderer:
        if person in self._failed:  # a bad checkpoint is read once, not once per request
            raise self._failed[person]
        model_dir = self.models.get(person)
        if model_dir is None:
            raise ModelLoadError(person, "-", f"not a person of this renderer (it serves {sorted(self.models)})")
        try:
            renderer = await asyncio.to_thread(FrameRenderer, Path(model_dir), self.config)
        except Exception as e:  # missing or corrupt checkpoint: this person fails, the replica serves on
            self._failed[person] = ModelLoadError(person, model_dir, f"{type(e).__name__}: {e}")
            raise self._failed[person] from None
        log.info("loaded the avatar of %s on %s", person, renderer.device)
        return renderer

    async def _person(self) -> tuple[str, FrameRenderer]:
        person = serve.get_multiplexed_model_id()
        if not person:
            raise ValueError("no person given: call through person_handle(handle, person) "
                             "(handle.options(multiplexed_model_id=person))")
        return person, await self._renderer(person)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def render_batch(self, requests: list[RenderRequest]) -> list[RenderResult]:
        person, renderer = await self._person()  # Serve batches one person's requests together
        waiting = self._waiting[person]
        waiting.difference_update(map(id, requests))
        self.metrics.set_queue_length(person, len(waiting))
        # The pipeline blocks: run it in a thread so the replica keeps accepting (and counting) requests.
        results = await asyncio.to_thread(renderer.render, requests)
        self.metrics.observe_batch(person, len(requests), results[0].render_seconds)
        return results

    async def __call__(self, request: RenderRequest) -> RenderResult:
        person, renderer = await self._person()
        renderer.check(request)  # a malformed request fails alone, not its whole batch
        arrived = time.perf_counter()
        waiting = self._waiting.setdefault(person, set())
        waiting.add(id(request))
        self.metrics.set_queue_length(person, len(waiting))
        try:
            result = await self.render_batch(request)
        finally:  # cancelled before its batch ran (its person failed: the driver cancels its frames)
            if id(request) in waiting:
                waiting.discard(id(request))
                self.metrics.set_queue_length(person, len(waiting))
        self.metrics.observe_request(person, time.perf_counter() - arrived)
        return result

    async def info(self) -> dict:
        """The person's model facts the driver checks before sending requests (loads the model)."""
        person, r = await self._person()
        return {"person": person, "resolution": r.resolution, "expression_dim": r.expression_dim,
                "device": str(r.device), "pid": os.getpid(),
                "metrics_port": self.exporter.port if self.exporter else None, "metrics_error": self.metrics_error}

    def metrics_text(self) -> str:
        """This replica's Prometheus metrics in the text exposition format."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()

    def __del__(self):
        """Serve's shutdown hook of a replica (graceful shutdown, scale-down, delete_renderer): its target file goes
        first, then its exporter."""
        if getattr(self, "target_name", None) is not None:
            from cluster.monitoring.targets import unregister

            unregister(self.config.metrics_targets_dir, self.target_name)
            self.target_name = None
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


def deploy_renderer(models: Mapping[str, Path], config: RendererConfig | None = None, name: str = APP_NAME,
                    max_models_per_replica: int = 2):
    """Deploy (or redeploy) the renderer application ``name`` serving ``models`` (person -> model
    folder); returns its DeploymentHandle once every replica runs (models load on their first
    request; :func:`person_handle` addresses one person). Each replica keeps up to
    ``max_models_per_replica`` models loaded: at least the persons rendered at the same time, or
    they evict each other. Needs `ray.init` first."""
    config = config or RendererConfig()
    models = {p: str(Path(d).resolve()) for p, d in models.items()}
    ensure_serve()
    actor_options = {"num_cpus": config.num_cpus, "num_gpus": config.num_gpus}
    app = AvatarRenderer.options(
        num_replicas=config.num_replicas, max_ongoing_requests=config.max_ongoing_requests,
        ray_actor_options=actor_options,
        # A replica being removed checks for requests still in flight every this many seconds (Serve's 2 s: every
        # evaluation ended 2 s after its last frame; the driver deletes the application once its frames are back).
        graceful_shutdown_wait_loop_s=0.2,
    ).bind(models, config, max_models_per_replica)
    try:
        return serve.run(app, name=name, route_prefix=None)
    except RuntimeError as e:  # Serve's own message names no cause: add the replicas' error
        raise RuntimeError(f"renderer application {name} failed to start: {_deploy_error(name)}") from e


def person_handle(handle, person: str):
    """The handle of ``deploy_renderer`` addressing ``person``'s model."""
    return handle.options(multiplexed_model_id=person)


def _deploy_error(name: str) -> str:
    try:
        app = serve.status().applications.get(name)
        messages = [d.message for d in (app.deployments.values() if app else []) if d.message]
        text = " | ".join(messages) or (app.message if app else "") or "no details from Serve"
    except Exception as e:  # the status itself failed: still report something useful
        text = f"(status unavailable: {e})"
    lines = [ln for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errors[-1] if errors else lines[-1] if lines else text).strip()[:2000]


def delete_renderer(name: str = APP_NAME) -> None:
    """Remove the renderer application (its replicas free their CPUs / GPUs)."""
    serve.delete(name)
