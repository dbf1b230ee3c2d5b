"""The GPU path of issue 11, this project against stock diffusers, on the same device in one run.

    python benchmarks/bench_gpu.py [--train-steps 40] [--only train compile render peer profile]

On CUDA (the paper configuration: SD2.1 layout, 512x512, random weights):

* training: `train_person` itself (the real trainer with its loader, checkpoints and metrics) on
  synthetic shards rendered at 512x512 on the fly, preset `paper` with a seeded random base, batch
  8; eager (bf16 frozen base, fp32 masters, channels_last) and with `--compile`. samples/s over the
  steady logging windows (the first window, with start-up and compilation, is left out); the
  compile time is the compiled run's first step minus the eager run's;
* rendering: the Serve renderer's pipeline (`cluster.serve.renderer.FrameRenderer`: the trained
  avatar loaded with `from_pretrained`, `RenderPipeline`, warm-up of every batch bucket), 20 DDPM
  steps, batch 1 and 8, per mode (`--render-modes`: eager, graphs = each bucket replayed from one
  recorded CUDA graph, compiled = torch.compile); host syncs per call counted with
  `torch.cuda.set_sync_debug_mode`;
* the peer: stock diffusers on the SD2.1 layout with random weights (the recipe of the shared
  `peer_controlnet_bench.py`): `StableDiffusionControlNetPipeline` with bf16 weights, and a
  train_controlnet-style step (frozen UNet/VAE in bf16, fp32 ControlNet, bf16 autocast, AdamW);
* MFU against the FLOPs counted with `FlopCounterMode` on this device (one training sample, one
  denoising step) and the dense bf16 matmul peak measured in the same run; peak memory per row;
* profile (opt-in, `--only profile`): the trainer's step and the peer's step (``train_steps.py``,
  the same layout, synthetic batch already on the device) built, warmed up, timed and recorded
  with torch.profiler: ``profile.txt`` beside ``--out`` has the ops where ours spends more CUDA
  time than the peer (by op name), per-category times (grid_sample, casts, layout copies, norms,
  convolutions, matmuls/attention, optimizer, NCCL/DeepSpeed), an A/B of the feature-plane
  lookup, and each side's top-op tables (by op and by input shape); the JSON has kernel launches,
  CUDA runtime sync calls and host syncs per step; ``profile_traces.tar.gz`` a chrome trace of
  one step of each.

On CPU it runs the tiny configuration (2 DDPM steps, the tiny layout for the peer too) so CI can
smoke-test every code path; its numbers are not the GPU's and are labelled so. Prints the table
and writes `benchmarks/results/bench_gpu.json` (or `--out`); `bench_gpu.partial.json` beside it
after each section and when the run is stopped (SIGTERM from `timeout`, an error), with the
section it stopped in.

The sections live beside it: ``gpu_measure.py`` (the run's settings, syncs, peak memory, timings),
``gpu_peer.py`` (stock diffusers) and ``gpu_profile.py`` (the profile); this file has the CLI, this
project's sections, the run and the table.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import RESULTS, report  # noqa: E402
from gpu_measure import Setup, free_memory, matmul_peak_tflops, median_seconds, peak_gib, reset_peak, sync  # noqa: E402
from gpu_peer import peer_rows  # noqa: E402
from gpu_profile import PROFILE_CATEGORIES as PROFILE_CATEGORIES  # noqa: E402  (public path)
from gpu_profile import profile_section, training_steps  # noqa: E402

from common.io import atomic_write_json  # noqa: E402

Section = Literal["train", "compile", "render", "peer", "profile"]
RenderMode = Literal["eager", "graphs", "compiled"]
#: RenderOptions (compile, cuda_graphs) of each render mode.
RENDER_MODES = {"eager": ("off", "off"), "graphs": ("off", "on"), "compiled": ("on", "off")}
#: The issue's goals on one H100 (samples/s; frames/s at batch 1 and at batch >= 8).
GOALS = {"train": 100.0, "render_1": 5.0, "render_8": 20.0}


@dataclass
class BenchGpuArgs:
    only: tuple[Section, ...] = ("train", "compile", "render", "peer")
    """Sections to run: train (eager), compile (train with --compile), render, peer (stock diffusers),
    profile (torch.profiler over ours and the peer's training step; opt-in)."""
    train_steps: int | None = None
    """Optimizer steps per training run (default: 40 on CUDA, 3 on CPU)."""
    train_batch: int | None = None
    """Training batch (default: 8, the paper's; 2 on CPU)."""
    render_batches: tuple[int, ...] | None = None
    """Rendering batch sizes (default: 1 and 8; 1 and 2 on CPU)."""
    render_steps: int | None = None
    """DDPM steps per rendered frame (default: 20, the paper's; 2 on CPU)."""
    render_modes: tuple[RenderMode, ...] = ("eager", "graphs", "compiled")
    """How the render pipeline runs, a row per mode and batch: eager (RenderOptions compile and
    cuda_graphs off), graphs (each bucket's render recorded as one CUDA graph at warm-up), compiled
    (torch.compile, reduce-overhead; its warm-up compiles, minutes at 512x512). Off CUDA only eager runs."""
    workers: int | None = None
    """Loader threads of the training runs (default: half the CPU cores, at most 8)."""
    workdir: Path | None = None
    """Where shards and runs go (default: a temporary folder, removed afterwards)."""
    out: Path = RESULTS / "bench_gpu.json"
    """The JSON result (the profile's tables and traces go beside it)."""
    profile_steps: int = 3
    """Training steps recorded per side by the profile section (after warm-up steps)."""
    profile_compiled: bool = False
    """Profile our step with --compile (the paper preset's default) instead of eager: its warm-up steps
    compile (~150 s at 512x512 on an H200) and the memory-format variant is left out."""


def resolve(args: BenchGpuArgs) -> Setup:
    cuda = torch.cuda.is_available()
    return Setup(cuda=cuda, device=torch.device("cuda" if cuda else "cpu"),
                 train_steps=args.train_steps or (40 if cuda else 3),
                 train_batch=args.train_batch or (8 if cuda else 2),
                 render_batches=args.render_batches or ((1, 8) if cuda else (1, 2)),
                 render_steps=args.render_steps or (20 if cuda else 2), render_modes=args.render_modes,
                 workers=args.workers or max(1, min(8, (os.cpu_count() or 2) // 2)))


# ---- data ------------------------------------------------------------------------------------
def make_shards(root: Path, s: Setup) -> tuple[Path, int]:
    """Synthetic shards for person 000 (512x512 on CUDA, the tiny set on CPU); returns (root, expression dim)."""
    from shards.ingest import IngestConfig, ingest_person
    from shards.synthetic import SyntheticConfig, generate
    from shards.testing import TINY, TINY_INGEST, TINY_SHARDS
    from shards.writer import ShardConfig, write_shards

    if s.cuda:  # 2 training sequences x 8 frames x 15 cameras = 240 training samples at 512x512
        synthetic = SyntheticConfig(persons=1, sequences=3, frames=8, cameras=16, image_size=128, expression_dim=100)
        ingest, shard = IngestConfig(held_out_sequences=1), ShardConfig(image_width=512, raster_backend="cpu")
    else:
        synthetic, ingest, shard = TINY, TINY_INGEST, TINY_SHARDS
    generate(synthetic, root / "captures", persons=["000"])
    store = ingest_person(root / "captures", "000", root / "zarr", ingest).path
    write_shards([store], root / "shards", shard, workers=s.workers, progress=False)
    return root / "shards", synthetic.expression_dim


# ---- this project ----------------------------------------------------------------------------
def train_run(s: Setup, shards: Path, out: Path, compile: bool) -> dict:
    """One `train_person` run; samples/s of the steady windows, first-step time, peak memory."""
    from avatars.training import train_person, train_preset

    log_every = max(1, s.train_steps // 4)
    cfg = train_preset("paper" if s.cuda else "tiny", person="000", shards=shards, out=out, random_base=s.cuda,
                      steps=s.train_steps, batch_size=s.train_batch, compile=compile, log_every=log_every,
                      checkpoint_every=s.train_steps, keep_last=1, validate_every=0, val_samples=1,
                      val_inference_steps=2, num_workers=s.workers, lpips_weights=out / "none", resume="never")
    reset_peak(s.device)
    start = time.perf_counter()
    train_person(cfg)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "000" / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if "samples_per_s" in r]
    steady = windows[1:] or windows  # the first window holds the start-up
    samples = [r["samples_per_s"] for r in steady]
    return {"samples_per_s": statistics.mean(samples), "first_step_s": next(r["first_step_s"] for r in records
                                                                          if "first_step_s" in r),
            "peak_GiB": peak_gib(s.device), "wall_s": wall, "model_dir": str(out / "000" / "model"),
            "windows_samples_per_s": [r["samples_per_s"] for r in windows]}


def count_flops(model_dir: str, s: Setup, expression_dim: int) -> dict:
    """FLOPs of one training sample, one denoising step per frame and one whole render per frame (the render's
    steps, its conditioning and its VAE decode: what the render MFU divides), counted on this device."""
    from bench_model import count_denoise_flops, count_render_flops, count_train_flops

    from avatars.models import DiffusionAvatarsModel
    from avatars.testing import synthetic_batch

    model = DiffusionAvatarsModel.from_pretrained(model_dir).to(s.device)
    batch = {k: (v.to(s.device) if torch.is_tensor(v) else v)
             for k, v in synthetic_batch(1, model.config.resolution, expression_dim).items()}
    out = {"train_GFLOP_per_sample": count_train_flops(model, batch) / 1e9,
           "denoise_GFLOP_per_frame": count_denoise_flops(model, batch) / 1e9,
           "render_GFLOP_per_frame": count_render_flops(model, batch, s.render_steps) / 1e9}
    del model
    free_memory()
    return out


def render_rows(model_dir: str, s: Setup, expression_dim: int) -> list[dict]:
    """The Serve renderer's pipeline, per mode: load + warm-up (compilation or graph recording) once,
    then each batch size. Off CUDA only the eager mode runs (see :func:`skipped_render_modes`)."""
    rows = []
    for mode in s.render_modes:
        if mode not in skipped_render_modes(s):
            rows += render_mode_rows(model_dir, s, expression_dim, mode)
    return rows


def skipped_render_modes(s: Setup) -> dict[str, str]:
    """Render modes that do not run here, with the reason."""
    if s.cuda:
        return {}
    return {"graphs": "skipped on CPU: CUDA graphs need CUDA (tests/avatars/test_render_pipeline.py, gpu)",
            "compiled": "skipped on CPU: minutes of compiling (tests/avatars/test_render_pipeline.py covers it)"}


def render_mode_rows(model_dir: str, s: Setup, expression_dim: int, mode: str) -> list[dict]:
    from avatars.configs import RenderOptions
    from avatars.host_sync import count_host_syncs
    from avatars.testing import synthetic_batch
    from cluster.serve.renderer import FrameRenderer, RendererConfig

    compile, graphs = RENDER_MODES[mode]
    reset_peak(s.device)
    start = time.perf_counter()
    renderer = FrameRenderer(Path(model_dir), RendererConfig(
        num_inference_steps=s.render_steps, max_batch_size=max(s.render_batches), device=str(s.device),
        pipeline=RenderOptions(batch_buckets=s.render_batches, compile=compile, cuda_graphs=graphs)))
    sync(s.device)
    load_s, load_peak = time.perf_counter() - start, peak_gib(s.device)
    rows = []
    for size in s.render_batches:
        batch = synthetic_batch(size, renderer.resolution, expression_dim, seed=1)
        batch = {k: (v.to(s.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        call = lambda: renderer.pipeline(batch, num_inference_steps=s.render_steps, seeds=list(range(size)))  # noqa: E731
        call()
        # the peak of this batch size's renders alone, as the peer's is: not the load (its weights pass through
        # the device in float32 before the cast) or the warm-up of the largest bucket
        reset_peak(s.device)
        _, syncs = count_host_syncs(call, s.device)
        seconds = median_seconds(call, s.device, 3)
        rows.append({"mode": mode, "batch": size, "frames_per_s": size / seconds, "call_s": seconds,
                     "host_syncs_per_call": syncs.to_json(), "peak_GiB": peak_gib(s.device),
                     "load_and_warm_up_s": load_s, "load_and_warm_up_peak_GiB": load_peak,
                     "compiled": renderer.pipeline.compiled, "graphed": renderer.pipeline.graphed})
    renderer = None  # frees it (not `del`: the closure above refers to it)
    if mode == "compiled":
        torch._dynamo.reset()
    free_memory()
    return rows


# ---- the run ---------------------------------------------------------------------------------
def run(args: BenchGpuArgs) -> dict:
    s = resolve(args)
    device_name = torch.cuda.get_device_name(0) if s.cuda else "CPU (tiny config, smoke test: not GPU numbers)"
    peak = matmul_peak_tflops(s.device)
    results: dict = {"device": device_name, "torch": torch.__version__, "matmul_bf16_peak_TFLOPs": peak,
                     "train_steps": s.train_steps, "train_batch": s.train_batch, "render_steps": s.render_steps,
                     "config": "paper (SD2.1 layout, 512x512, random weights)" if s.cuda else "tiny (64x64)"}
    partial = args.out.with_name(args.out.stem + ".partial.json")

    def save(section: str) -> None:
        """Each finished section's figures at once, so a run cut short (a device time limit) keeps them."""
        atomic_write_json(partial, results)
        print(f"[bench_gpu] {section} done; figures so far in {partial}", flush=True)

    state = {"section": "start"}
    try:
        with tempfile.TemporaryDirectory(prefix="bench_gpu.") as tmp:
            run_sections(args, s, results, save, Path(args.workdir) if args.workdir else Path(tmp), state)
    except BaseException as exc:  # a time limit (SIGTERM from `timeout`), an error: keep what was measured
        results["interrupted"] = f"in section {state['section']}: {type(exc).__name__}: {exc}"[:500]
        atomic_write_json(partial, results)
        print(f"[bench_gpu] interrupted in {state['section']}; figures so far in {partial}", flush=True)
        raise
    add_mfu(results, peak)
    return results


def run_sections(args: BenchGpuArgs, s: Setup, results: dict, save: Callable[[str], None], root: Path,
                 state: dict) -> None:
    """The sections, each saving the partial JSON when done; ``state["section"]`` names the running one."""
    root.mkdir(parents=True, exist_ok=True)
    dim, model_dir = None, None
    if {"train", "compile", "render"} & set(args.only):
        state["section"] = "shards"
        start = time.perf_counter()
        shards, dim = make_shards(root, s)
        results["shards_s"] = time.perf_counter() - start
    if "train" in args.only or "render" in args.only:
        state["section"] = "train"
        results["train_eager"] = train_run(s, shards, root / "runs-eager", compile=False)
        model_dir = results["train_eager"]["model_dir"]
        free_memory()
        save("train")
    if "compile" in args.only:
        state["section"] = "compile"
        if s.cuda:
            results["train_compiled"] = train_run(s, shards, root / "runs-compiled", compile=True)
            model_dir = model_dir or results["train_compiled"]["model_dir"]
            if "train_eager" in results:  # compilation = the extra time of the compiled run's first step
                # (a lower bound: the eager run before it in this process paid cuDNN's autotuning of the shapes
                # the compiled run then finds cached)
                results["compile_s"] = (results["train_compiled"]["first_step_s"]
                                        - results["train_eager"]["first_step_s"])
            torch._dynamo.reset()
            free_memory()
            save("compile")
        else:
            results["train_compiled"] = "skipped on CPU (tests/avatars/training/test_compile.py covers it)"
    if model_dir is not None:
        state["section"] = "flops"
        results["flops"] = count_flops(model_dir, s, dim)
        save("flops")
    if "profile" in args.only:  # before render: it also times both training steps side by side
        state["section"] = "profile"
        results["profile"] = profile_section(s, args.out, args.profile_steps,
                                             training_steps(s, compiled=args.profile_compiled))
        save("profile")
    if "render" in args.only:
        state["section"] = "render"
        results["render"] = render_rows(model_dir, s, dim)
        results["render_skipped"] = {m: why for m, why in skipped_render_modes(s).items() if m in s.render_modes}
        save("render")
    if "peer" in args.only:
        state["section"] = "peer"
        results["peer_render"], results["peer_train"] = peer_rows(s)
        save("peer")


def add_mfu(results: dict, peak: float | None) -> None:
    flops = results.get("flops", {})
    for key in ("train_eager", "train_compiled"):
        row = results.get(key)
        if isinstance(row, dict) and peak and flops:
            row["MFU"] = row["samples_per_s"] * flops["train_GFLOP_per_sample"] / 1e3 / peak
    for row in results.get("render", []):
        if peak and flops:
            row["MFU"] = row["frames_per_s"] * flops["render_GFLOP_per_frame"] / 1e3 / peak
    for row in results.get("peer_train", []):
        if peak:
            row["MFU"] = row["samples_per_s"] * row["train_GFLOP_per_sample"] / 1e3 / peak


def table(results: dict) -> list[dict]:
    """The issue's table: this project vs stock diffusers vs the goal, with MFU / memory / syncs."""
    rows = []
    on_gpu = results["matmul_bf16_peak_TFLOPs"] is not None

    def ours(name: str, row: dict | str | None, unit: str, goal: float | None, peer: dict | None, extra: dict) -> None:
        if isinstance(row, str):  # a section that did not run here, with the reason
            rows.append({"work": name, "this project": row})
            return
        if row is None:
            return
        peer = peer or {}
        rows.append({"work": name, "this project": row.get("samples_per_s", row.get("frames_per_s")),
                     "stock diffusers": peer.get("samples_per_s", peer.get("frames_per_s")), "unit": unit,
                     "goal": goal if on_gpu else None, "MFU": row.get("MFU"), "stock MFU": peer.get("MFU"),
                     "peak GiB": row.get("peak_GiB"), "stock peak GiB": peer.get("peak_GiB"), **extra})

    def syncs(value) -> str:
        return str(value) if isinstance(value, int) else "n/a (no CUDA)"

    peer_train = (results.get("peer_train") or [None])[0]
    b = results["train_batch"]
    for key, label in (("train_eager", "eager"), ("train_compiled", "--compile")):
        row = results.get(key)
        extra = {"first step s": row.get("first_step_s")} if isinstance(row, dict) else {}
        extra["compile s"] = None
        if key == "train_compiled" and isinstance(row, dict):
            extra["compile s"] = results.get("compile_s")
        goal = GOALS["train"] if results["train_batch"] == 8 else None
        ours(f"training, batch {b} ({label})", row, "samples/s", goal, peer_train, extra)
    prof = results.get("profile")
    if prof:  # the step alone (synthetic batch on the device, no loader), ours and the peer's in one process
        label = "compiled" if prof["ours"].get("compiled") else "eager"
        ours(f"training step alone, batch {b} (profile, {label})", prof["ours"], "samples/s", None, prof["peer"],
             {"host syncs/call": syncs(prof["ours"]["host_syncs_per_step"]),
              "stock host syncs/call": syncs(prof["peer"]["host_syncs_per_step"])})
    peers = {r["batch"]: r for r in results.get("peer_render", [])}
    for row in results.get("render", []):
        goal = GOALS["render_1"] if row["batch"] == 1 else GOALS["render_8"] if row["batch"] >= 8 else None
        ours(f"rendering {results['render_steps']} DDPM steps, batch {row['batch']} ({row['mode']})", row,
             "frames/s", goal,
             peers.get(row["batch"]), {"host syncs/call": syncs(row["host_syncs_per_call"]),
                                       "stock host syncs/call": syncs(peers.get(row["batch"], {}).get(
                                           "host_syncs_per_call")),
                                       "compile s": None, "warm-up s": row["load_and_warm_up_s"]})
    for mode, why in results.get("render_skipped", {}).items():
        rows.append({"work": f"rendering {results['render_steps']} DDPM steps ({mode})", "this project": why})
    return rows


def main(args: BenchGpuArgs) -> dict:
    results = run(args)
    rows = table(results)
    print(f"device: {results['device']}; bf16 matmul peak: {results['matmul_bf16_peak_TFLOPs']}")
    report("bench_gpu", rows, {"results": results}, out=args.out)
    return results


if __name__ == "__main__":
    # `timeout` (gpu_kit.sh) stops a run with SIGTERM: exit through Python so the partial JSON is written
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    main(tyro.cli(BenchGpuArgs))
