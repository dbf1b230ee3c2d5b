"""Serve renderer throughput (batched vs one request at a time) and end-to-end nightly eval time.

    python benchmarks/bench_serve.py [--frames 48] [--steps 20] [--e2e-persons 8] [--e2e-metrics psnr ssim lpips]

1. frames/s of one renderer replica (tiny random avatar, 64x64, `steps` DDPM steps):
   * sequential: one request at a time on a max_batch_size=1 deployment (the baseline);
   * concurrent, unbatched: all requests in flight, max_batch_size=1;
   * batched: all requests in flight, max_batch_size=8 (goal: >= 3x the sequential rate).
2. end-to-end `run_evaluation` for the persons of data/shards + data/zarr (8 synthetic persons):
   trained models from --runs when they exist, otherwise random tiny avatars (stated in the output).
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import report  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@dataclass
class BenchServeArgs:
    frames: int = 48
    """Requests per throughput measurement."""
    steps: int = 20
    """DDPM steps per frame (the paper's 20)."""
    num_cpus: float = 1.0
    """CPUs (= torch threads) of the renderer replica."""
    e2e_persons: int = 8
    """Persons of the end-to-end run (0 skips it)."""
    e2e_metrics: tuple[str, ...] = ("psnr", "ssim", "lpips")
    """Metrics of the end-to-end run (add jod for the full set; ~5 s per clip on CPU)."""
    e2e_parallel_persons: int = 2
    """Persons rendered at once in the end-to-end run (and replicas of its renderer)."""
    runs: Path = REPO / "runs"
    """Trained runs root; persons without a model there get a random tiny avatar."""
    shards: Path = REPO / "data/shards"
    stores: Path = REPO / "data/zarr"
    ray_num_cpus: int = 2
    object_store_mb: int = 300
    name: str = "serve"
    """Results file benchmarks/results/<name>.json."""


def random_requests(n: int, size: int = 64, dim: int = 10) -> list:
    """Head-like conditioning (a disc of random geometry) for the throughput runs."""
    import numpy as np

    from cluster.serve import RenderRequest

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size] / size
    mask = (((yy - 0.5) ** 2 + (xx - 0.5) ** 2) < 0.1).astype(np.float32)[None]
    out = []
    for i in range(n):
        normals = rng.standard_normal((3, size, size)).astype(np.float32)
        normals /= np.linalg.norm(normals, axis=0, keepdims=True)
        canonical = rng.uniform(-1, 1, (5, size, size)).astype(np.float32) * mask
        out.append(RenderRequest(mask, mask * 1.0, normals * mask, canonical,
                                 rng.standard_normal(dim).astype(np.float32), seed=0, key=f"f{i}"))
    return out


def throughput(args: BenchServeArgs, model_dir: Path) -> list[dict]:
    from cluster.serve import RendererConfig, delete_renderer, deploy_renderer, person_handle

    reqs = random_requests(args.frames)
    rows = []
    for mode, batch, concurrent in (("sequential", 1, False), ("concurrent_unbatched", 1, True), ("batched", 8, True)):
        cfg = RendererConfig(num_inference_steps=args.steps, max_batch_size=batch, batch_wait_timeout_s=0.05,
                             num_cpus=args.num_cpus, device="cpu")
        handle = person_handle(deploy_renderer({"bench": model_dir}, cfg, name="bench"), "bench")
        try:
            handle.remote(reqs[0]).result()  # warm-up
            t0 = time.perf_counter()
            if concurrent:
                results = [r.result() for r in [handle.remote(q) for q in reqs]]
            else:
                results = [handle.remote(q).result() for q in reqs]
            seconds = time.perf_counter() - t0
        finally:
            delete_renderer("bench")
        sizes = [r.batch_size for r in results]
        rows.append({"mode": mode, "max_batch_size": batch, "frames": len(reqs), "seconds": seconds,
                     "frames_per_s": len(reqs) / seconds, "mean_batch": sum(sizes) / len(sizes)})
    base = rows[0]["frames_per_s"]
    for r in rows:
        r["speedup"] = r["frames_per_s"] / base
    return rows


def end_to_end(args: BenchServeArgs, tmp: Path) -> dict:
    from avatars.configs import tiny_config
    from avatars.models import DiffusionAvatarsModel
    from cluster.eval_driver import EvalDriverConfig, run_evaluation
    from cluster.serve import RendererConfig
    from shards.store import PersonStore

    persons = sorted(p.stem for p in args.stores.glob("*.zarr"))[: args.e2e_persons]
    runs = tmp / "runs"
    random_models = []
    for p in persons:
        trained = args.runs / p / "model"
        if (trained / "config.json").is_file():
            (runs / p).mkdir(parents=True, exist_ok=True)
            (runs / p / "model").symlink_to(trained.resolve())
        else:
            dim = PersonStore(args.stores / f"{p}.zarr").expression_dim
            DiffusionAvatarsModel(tiny_config(expression_dim=dim)).save_pretrained(runs / p / "model")
            random_models.append(p)
    config = EvalDriverConfig(
        runs=runs, shards=args.shards, stores=args.stores, reports_root=tmp / "nightly", persons=tuple(persons),
        renderer=RendererConfig(num_inference_steps=args.steps, max_batch_size=8, num_cpus=args.num_cpus, device="cpu",
                                num_replicas=args.e2e_parallel_persons),
        metrics=args.e2e_metrics, lpips_weights=REPO / "weights/lpips_alex.safetensors",
        parallel_persons=args.e2e_parallel_persons)
    summary = run_evaluation(config)
    return {"persons": len(persons), "failed": len(summary.failed), "frames": summary.frames_rendered,
            "seconds": summary.seconds, "frames_per_s": summary.frames_rendered / summary.seconds,
            "models": "random tiny (no trained runs)" if len(random_models) == len(persons)
            else f"trained: {len(persons) - len(random_models)}, random tiny: {len(random_models)}",
            "person_seconds": summary.person_seconds}


def main(args: BenchServeArgs) -> None:
    import ray
    from ray import serve

    from avatars.configs import tiny_config
    from avatars.models import DiffusionAvatarsModel
    from cluster.ray_connect import EmbeddedRay, connect_ray

    with tempfile.TemporaryDirectory(prefix="bench_serve") as d:
        tmp = Path(d)
        model_dir = tmp / "model"
        DiffusionAvatarsModel(tiny_config(expression_dim=10)).save_pretrained(model_dir)
        # the Ray of every run (its own, on loopback), as the evaluation driver starts it
        connect_ray(None, EmbeddedRay(num_cpus=args.ray_num_cpus, object_store_memory_mb=args.object_store_mb,
                                      include_dashboard=False), log_to_driver=False)
        try:
            rows = throughput(args, model_dir)
            e2e = end_to_end(args, tmp) if args.e2e_persons else None
        finally:
            serve.shutdown()
            ray.shutdown()
    if e2e:
        rows.append({"mode": f"end_to_end_{e2e['persons']}_persons", "frames": e2e["frames"], "seconds": e2e["seconds"],
                     "frames_per_s": e2e["frames_per_s"]})
        print(f"end-to-end models: {e2e['models']}; metrics: {', '.join(args.e2e_metrics)}")
    report(args.name, rows, {"steps": args.steps, "replica_cpus": args.num_cpus, "resolution": 64,
                           "end_to_end": e2e, "note": "tiny random avatars; CPU shared with other jobs"})


if __name__ == "__main__":
    main(tyro.cli(BenchServeArgs))
