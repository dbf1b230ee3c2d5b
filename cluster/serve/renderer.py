"""Frame rendering for the Serve deployment, without any Ray: requests in, RGB frames out.

A request carries one frame's conditioning buffers (already rasterized by the caller), its
expression code and the seed of the video it belongs to. :class:`FrameRenderer` stacks the
requests of a batch and runs :class:`avatars.pipelines.AvatarPipeline` once, passing each
frame's video seed: every frame of a video gets the same initial latent and per-step noise
(:mod:`avatars.pipelines.noise`), exactly what the pipeline uses for a frame rendered alone, so
a frame's result does not depend on the batch it lands in (up to floating-point batch-size
effects of the kernels, ~1e-6 on CPU; bf16 autocast on CUDA makes it ~1e-3).

Why the caller rasterizes (the driver, not the deployment): the evaluation frames already
have their buffers in the shards (written by the same rasterizer), ground truth and buffers
must come from the same sample for the comparison videos, and a replica then holds only the
model, so GPU replicas do no mesh I/O and need no access to the zarr stores.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from avatars.configs import SAMPLERS, RenderOptions
from cluster.monitoring.metrics import PORT_RANGE
from cluster.serve.validation import BUFFER_CHANNELS, InvalidRequest, validate_request
from common.names import host_problem

#: The highest first port of a replica's exporter: it tries PORT_RANGE ports from it up, every one must exist (a port
#: above 65535 raised OverflowError in the replica, not the "no free port" OSError); as --train.metrics-port.
MAX_METRICS_PORT = 65535 - PORT_RANGE + 1
def device_problem(device: str) -> str | None:
    """Why torch cannot parse `device`, or None (whether the device is there shows when a model loads on it)."""
    try:
        torch.device(device)
    except (RuntimeError, ValueError, TypeError) as e:
        return f"not a torch device ({e})"
    return None


@dataclass
class RendererConfig:
    """The renderer service: sampling, batching and the resources of each replica."""

    num_inference_steps: int = 20
    """DDPM (or DDIM) steps per frame; the paper renders with 20."""
    sampler: str = "ddpm"
    """Sampler of every render: "ddpm" (the paper's; fully on the device), "ddim" or "dpm" (DPM-Solver++)."""
    max_batch_size: int = 8
    """Most requests `@serve.batch` stacks into one pipeline call."""
    batch_wait_timeout_s: float = 0.05
    """How long a replica waits for a batch to fill before rendering a partial one."""
    max_ongoing_requests: int = 64
    """Requests one replica accepts at a time; must be well above max_batch_size or Serve's
    router starves the batcher (its default of 5 caps batches at 5)."""
    num_replicas: int = 1
    """Replicas of the renderer application (each a process that loads the models of the persons
    Serve routes to it)."""
    num_cpus: float = 1.0
    """CPUs Ray reserves per replica; on CPU also the torch threads of the replica."""
    num_gpus: float = 0.0
    """GPUs Ray reserves per replica (fractions let several persons share one GPU)."""
    device: str = "auto"
    """Torch device of the model: 'auto' (CUDA when the replica has a GPU), 'cpu', 'cuda', ..."""
    base_model: Path | None = None
    """Local diffusers directory of the base model; None: the one recorded in the checkpoint."""
    metrics_port: int | None = None
    """First port of a replica's Prometheus exporter (1 to 65472: the first free one of the 64 from it up is taken);
    0: a free port the system picks, as `--train.metrics-port 0` (each replica reports its port in `info()`);
    None: no exporter (the metrics stay readable through the deployment's `metrics_text`)."""
    metrics_host: str = "127.0.0.1"
    """Address a replica's exporter listens on (an IP address or a host name): loopback by default; the node's
    address (or 0.0.0.0) when a Prometheus on another machine scrapes it."""
    metrics_targets_dir: Path | None = None
    """Folder where each replica writes its bound exporter as a Prometheus file_sd target
    (``renderer-<replica id>.json``, label component; removed when Serve shuts the replica down, a killed
    replica's by the next sweep of the folder: cluster/monitoring/targets.py) for the ``file_sd_configs`` jobs of
    cluster/monitoring/prometheus.yml. Needs metrics_port; None: nothing is written (launch_all: the trainings'
    folder, with --eval-metrics-port)."""
    pipeline: RenderOptions = dataclasses.field(default_factory=RenderOptions)
    """How each replica runs the model (precision, torch.compile or CUDA graphs, batch buckets, VAE decode chunk);
    a replica warms every bucket up before it takes requests."""

    def __post_init__(self) -> None:
        if self.num_inference_steps < 1:
            raise ValueError("num_inference_steps must be >= 1")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {SAMPLERS}")
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                             f"({self.max_batch_size}) or batches can never fill")
        if self.num_replicas < 1:
            raise ValueError("num_replicas must be >= 1")
        # Ray and Serve refuse these only when the application deploys, after the evaluation's Ray started (-3 CPUs
        # as "cannot be negative", NaN as "cannot convert float NaN to integer")
        for name in ("num_cpus", "num_gpus", "batch_wait_timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        # refused when parsed: a replica raised these only when it started, after Ray and the deployment
        if self.metrics_port is not None and not 0 <= self.metrics_port <= MAX_METRICS_PORT:
            raise ValueError(f"metrics_port (--renderer.metrics-port) must be 1 to {MAX_METRICS_PORT} (a replica's "
                             f"exporter tries {PORT_RANGE} ports from it up) or 0 (a free port the system picks), got "
                             f"{self.metrics_port}")
        if (why := host_problem(self.metrics_host)) is not None:
            raise ValueError(f"metrics_host (--renderer.metrics-host) {self.metrics_host!r}: {why}")
        if self.metrics_targets_dir is not None and self.metrics_port is None:
            raise ValueError("metrics_targets_dir (--renderer.metrics-targets-dir) needs metrics_port "
                             "(--renderer.metrics-port): without an exporter there is no target to write")
        if self.device != "auto" and (why := device_problem(self.device)) is not None:
            raise ValueError(f"device (--renderer.device) {self.device!r}: {why}; 'auto', 'cpu', 'cuda' or 'cuda:N'")

    def replace(self, **changes) -> "RendererConfig":
        return dataclasses.replace(self, **changes)


@dataclass
class RenderRequest:
    """One frame to render: channel-first float32 buffers at the model's resolution.

    mask (1, H, W), depth (1, H, W), normals (3, H, W), canonical (5, H, W), expression (D,);
    seed: the video's noise seed (every frame of a video uses the same one); key: caller's id.
    """

    mask: np.ndarray
    depth: np.ndarray
    normals: np.ndarray
    canonical: np.ndarray
    expression: np.ndarray
    seed: int = 0
    key: str = ""

    @staticmethod
    def from_sample(sample: dict, seed: int = 0) -> "RenderRequest":
        """From one batch-contract sample dict (e.g. ``ShardDataset[i]``, tensors without batch dim)."""
        def arr(k):
            v = sample[k]
            return (v.numpy() if torch.is_tensor(v) else np.asarray(v)).astype(np.float32, copy=False)

        return RenderRequest(arr("mask"), arr("depth"), arr("normals"), arr("canonical"), arr("expression"),
                             seed, str(sample.get("__key__", "")))

    @property
    def size(self) -> tuple[int, int]:
        return int(self.mask.shape[-2]), int(self.mask.shape[-1])

    def check(self, expression_dim: int, resolution: int | None = None) -> None:
        """Raise InvalidRequest (a ValueError naming the request and the field) unless this request
        can be rendered alone or in any batch (types, dtypes, shapes, finiteness, ranges, seed)."""
        validate_request(self, expression_dim, resolution)


@dataclass
class RenderResult:
    """A rendered frame: image (H, W, 3) float32 in [0, 1], and how it was rendered."""

    image: np.ndarray
    key: str
    batch_size: int
    """Frames of the pipeline call that rendered this one (1 = rendered alone)."""
    render_seconds: float
    """Compute time of that whole pipeline call."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class FrameRenderer:
    """A loaded avatar that renders lists of requests (one pipeline call per buffer size)."""

    def __init__(self, model_dir: Path, config: RendererConfig):
        from avatars.models import DiffusionAvatarsModel
        from avatars.pipelines import RenderPipeline

        self.model_dir = Path(model_dir)
        self.config = config
        if not (self.model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{self.model_dir}: no trained avatar here "
                                    "(config.json missing; did training finish?)")
        self.device = resolve_device(config.device)
        model = DiffusionAvatarsModel.from_pretrained(self.model_dir, base_model=config.base_model)
        self.pipeline = RenderPipeline(model.to(self.device), config.pipeline, max_batch_size=config.max_batch_size)
        self.model = self.pipeline.model
        self.expression_dim = int(self.model.config.expression_dim)
        self.resolution = int(self.model.config.resolution)
        # compile / record every batch bucket now, so that no live request waits for it
        self.pipeline.warm_up(self.resolution, self.resolution, config.num_inference_steps, config.sampler)

    def check(self, request: RenderRequest) -> None:
        if not isinstance(request, RenderRequest):
            raise InvalidRequest(getattr(request, "key", ""), "request", f"must be a RenderRequest, got "
                                                                       f"{type(request).__name__}")
        request.check(self.expression_dim, self.resolution)

    def render(self, requests: list[RenderRequest]) -> list[RenderResult]:
        """Render the requests (grouped by buffer size, one pipeline call per group), in order."""
        out: list[RenderResult | None] = [None] * len(requests)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, r in enumerate(requests):
            self.check(r)
            groups.setdefault(r.size, []).append(i)
        for (h, w), idx in groups.items():
            reqs = [requests[i] for i in idx]
            t0 = time.perf_counter()
            images = self.render_tensor(reqs)
            seconds = time.perf_counter() - t0
            for i, r, img in zip(idx, reqs, images):
                out[i] = RenderResult(img, r.key, len(reqs), seconds)
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def render_tensor(self, requests: list[RenderRequest]) -> list[np.ndarray]:
        """One pipeline call for requests of equal size -> (H, W, 3) float32 images."""
        batch = {k: torch.from_numpy(np.stack([getattr(r, k) for r in requests]))
                 for k in (*BUFFER_CHANNELS, "expression")}
        images = self.pipeline(batch, num_inference_steps=self.config.num_inference_steps, sampler=self.config.sampler,
                               seeds=[r.seed for r in requests])
        return list(images.float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy())
