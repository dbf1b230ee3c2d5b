"""The profile section of ``bench_gpu.py`` (opt-in, ``--only profile``): where the trainer's step
spends more than the peer's, op by op, with torch.profiler (README "GPU")."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from gpu_measure import Setup, free_memory, median_seconds, peak_gib, reset_peak, sync
from gpu_peer import peer_config

#: Op-name fragments per category of the profile's comparison (the suspects of issue 11).
PROFILE_CATEGORIES = {
    "grid_sample": ("grid_sampler",),
    "casts and copies (_to_copy, copy_)": ("aten::_to_copy", "aten::copy_"),
    "layout (contiguous, clone)": ("aten::contiguous", "aten::clone"),
    "group/layer norm": ("group_norm", "layer_norm"),
    "convolution": ("convolution", "cudnn"),
    "matmul and attention": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "scaled_dot_product",
                             "flash", "efficient_attention"),
    "optimizer and clipping": ("adam", "aten::_foreach_", "clip_grad"),
    "nccl / deepspeed": ("nccl", "deepspeed", "DeepSpeed"),
}
#: CUDA runtime calls that launch a kernel / make the host wait for the device.
LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaGraphLaunch")
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
              "cudaStreamWaitEvent")


def _self_time(event, cuda: bool) -> float:
    """Self time in microseconds on the device (CUDA) or the host (CPU smoke run)."""
    return event.self_device_time_total if cuda else event.self_cpu_time_total


def profile_side(name: str, build: Callable[[], object], s: Setup, steps: int, trace_dir: Path) -> dict:
    """Builds one side's step, warms it up, times it, counts its host syncs, records ``steps`` steps
    with torch.profiler (op table by self time, by input shape, per category, kernel launches and
    host syncs per step) and a chrome trace of one step."""
    from torch.profiler import ProfilerActivity, profile

    from avatars.host_sync import count_host_syncs

    start = time.perf_counter()
    step = build()
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(3 if s.cuda else 1):  # cuDNN autotuning, optimizer state, allocator (compilation)
        step()
    sync(s.device)
    warm_up_s = time.perf_counter() - start
    reset_peak(s.device)
    step_s = median_seconds(step, s.device, 5 if s.cuda else 1)
    _, syncs = count_host_syncs(step, s.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if s.cuda else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            step()
        sync(s.device)
    with profile(activities=activities) as one:
        step()
        sync(s.device)
    one.export_chrome_trace(str(trace_dir / f"trace_{name}_one_step.json"))
    sort = "self_device_time_total" if s.cuda else "self_cpu_time_total"
    averages = prof.key_averages()
    ops = {}
    for e in averages:
        if e.device_type == torch.autograd.DeviceType.CPU:
            ops[e.key] = {"count": e.count / steps, "self_ms": _self_time(e, s.cuda) / steps / 1e3,
                          "self_cpu_ms": e.self_cpu_time_total / steps / 1e3}
    device_events = [e for e in averages if e.device_type != torch.autograd.DeviceType.CPU]  # kernels, memcpy, memset
    kernels = sum(e.count for e in device_events) / steps
    busy_ms = sum(e.self_device_time_total for e in device_events) / steps / 1e3  # with the profiler's overhead
    calls = {e.key: e.count / steps for e in averages}
    categories = {cat: sum(v["self_ms"] for k, v in ops.items() if any(f in k for f in frags))
                  for cat, frags in PROFILE_CATEGORIES.items()}
    tables = (f"==== {name}: top ops by self {'CUDA' if s.cuda else 'CPU'} time, {steps} steps ====\n"
              + averages.table(sort_by=sort, row_limit=40)
              + f"\n==== {name}: top ops by input shape ====\n"
              + prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=30))
    row = {"build_s": build_s, "warm_up_s": warm_up_s, "step_s": step_s, "samples_per_s": step.batch_size / step_s,
           "peak_GiB": peak_gib(s.device), "host_syncs_per_step": syncs.to_json(),
           "device_events_per_step": kernels if s.cuda else "n/a (CPU)",
           # the device's busy time against the step's wall time unprofiled: well below 1 = launch/host bound
           "device_busy_ms_per_step": busy_ms if s.cuda else "n/a (CPU)",
           "device_busy_fraction": busy_ms / 1e3 / step_s if s.cuda else "n/a (CPU)",
           "launch_calls_per_step": sum(calls.get(k, 0) for k in LAUNCH_CALLS),
           "sync_calls_per_step": {k: calls[k] for k in SYNC_CALLS if calls.get(k)},
           "aten_ops_per_step": sum(v["count"] for k, v in ops.items() if k.startswith("aten::")),
           "self_ms_per_step": sum(v["self_ms"] for v in ops.values()), "categories_ms": categories,
           "precision": step.info["precision"], "optimizer": step.info["optimizer"],
           "compiled": step.info.get("compiled", False)}
    step = None  # frees the models (the closures hold them)
    free_memory()
    return {"row": row, "ops": ops, "tables": tables}


def plane_lookup_ab(s: Setup) -> dict:
    """The feature-plane lookup (forward + backward, paper planes, batch of the run) with the
    background looked up outside the planes (now) and at their centre (before): the atomics."""
    from avatars.configs import paper_config, tiny_config
    from avatars.models import feature_planes
    from avatars.testing import synthetic_batch

    config = (paper_config() if s.cuda else tiny_config()).features
    planes = feature_planes.FeaturePlanes.from_feature_config(config).to(s.device)
    batch = synthetic_batch(s.train_batch, 512 if s.cuda else 64)
    canonical, mask = batch["canonical"].to(s.device), batch["mask"].to(s.device)

    def run() -> None:
        planes(canonical, mask).square().sum().backward()

    out = {"background_fraction": float((mask <= 0).float().mean())}
    saved = feature_planes.OUTSIDE
    try:
        for label, outside in (("now_ms", saved), ("before_ms", 0.0)):
            feature_planes.OUTSIDE = outside
            run()
            out[label] = median_seconds(run, s.device, 10 if s.cuda else 2) * 1e3
    finally:
        feature_planes.OUTSIDE = saved
    return out


def training_steps(s: Setup, compiled: bool = False) -> dict[str, Callable[[], object]]:
    """Builders of the steps the profile compares: the trainer's ("ours") and the peer's, paper
    config on CUDA (tiny on CPU), the run's batch, plus ours in the other memory format than the
    trainer's default there (channels_last on CUDA: does it pay, or do its conversions cost more?).
    ``compiled``: ours with ``--compile`` (the paper preset's default; its warm-up steps compile) and
    no memory-format variant (it would compile again)."""
    import copy

    from train_steps import our_model, our_step, peer_step

    preset, dim, config = peer_config(s)
    other = "contiguous" if s.cuda else "channels_last"
    built = {}

    def model(copied: bool):
        """One random init for both of ours (a paper model's init takes far longer than a copy)."""
        if "model" not in built:
            built["model"] = our_model(preset, dim)
        return copy.deepcopy(built["model"]) if copied else built.pop("model")

    if compiled:
        return {"ours": lambda: our_step(preset, s.device, s.train_batch, expression_dim=dim, compile=True),
                "peer": lambda: peer_step(config, s.device, s.train_batch)}
    return {"ours": lambda: our_step(preset, s.device, s.train_batch, expression_dim=dim, model=model(copied=True)),
            "peer": lambda: peer_step(config, s.device, s.train_batch),
            f"ours, memory_format={other}": lambda: our_step(preset, s.device, s.train_batch, memory_format=other,
                                                             expression_dim=dim, model=model(copied=False))}


def time_step(build: Callable[[], object], s: Setup) -> dict:
    """A step variant timed without the profiler: warm-up, median of 5 (1 on CPU), peak memory."""
    start = time.perf_counter()
    step = build()
    build_s = time.perf_counter() - start
    for _ in range(3 if s.cuda else 1):
        step()
    reset_peak(s.device)
    seconds = median_seconds(step, s.device, 5 if s.cuda else 1)
    row = {"build_s": build_s, "step_s": seconds, "samples_per_s": step.batch_size / seconds,
           "peak_GiB": peak_gib(s.device)}
    step = None  # frees the models (the closures hold them)
    free_memory()
    return row


def profile_section(s: Setup, out: Path, steps: int, builders: dict[str, Callable[[], object]] | None = None) -> dict:
    """Ours against the peer, op by op (README "GPU"): writes ``profile.txt`` (the diff, per-category
    times, the plane-lookup A/B, the op tables) and ``profile_traces.tar.gz`` (one step each, chrome
    trace) beside ``out``; returns the summary for the JSON. ``builders``: "ours" and "peer" step
    builders, profiled, and any others, only timed (default :func:`training_steps`)."""
    import tarfile

    builders = builders or training_steps(s)
    sides = {}
    with tempfile.TemporaryDirectory(prefix="bench_gpu_profile.") as tmp:
        trace_dir = Path(tmp)
        for name in ("ours", "peer"):
            sides[name] = profile_side(name, builders[name], s, steps, trace_dir)
        with tarfile.open(out.with_name("profile_traces.tar.gz"), "w:gz") as tar:
            for trace in sorted(trace_dir.iterdir()):
                tar.add(trace, arcname=trace.name)
    ours, peer = sides["ours"]["ops"], sides["peer"]["ops"]
    nothing = {"self_ms": 0.0, "count": 0.0}
    diff = []
    for k in set(ours) | set(peer):
        a, b = ours.get(k, nothing), peer.get(k, nothing)
        diff.append({"op": k, "ours_ms": a["self_ms"], "peer_ms": b["self_ms"], "extra_ms": a["self_ms"] - b["self_ms"],
                     "ours_count": a["count"], "peer_count": b["count"]})
    diff.sort(key=lambda d: -d["extra_ms"])
    unit = "CUDA" if s.cuda else "CPU"
    lines = [f"==== where ours spends more self {unit} time per step than the peer (ms) ====",
             f"{'op':60s} {'ours':>9s} {'peer':>9s} {'extra':>9s} {'n ours':>8s} {'n peer':>8s}"]
    lines += [f"{d['op'][:60]:60s} {d['ours_ms']:9.3f} {d['peer_ms']:9.3f} {d['extra_ms']:9.3f} "
              f"{d['ours_count']:8.1f} {d['peer_count']:8.1f}" for d in diff[:40] if d["extra_ms"] > 0]
    lines += ["", "==== per category (ms per step) ====", f"{'category':40s} {'ours':>9s} {'peer':>9s}"]
    lines += [f"{c:40s} {sides['ours']['row']['categories_ms'][c]:9.3f} {sides['peer']['row']['categories_ms'][c]:9.3f}"
              for c in PROFILE_CATEGORIES]
    variants = {name: time_step(build, s) for name, build in builders.items() if name not in sides}
    lines += ["", f"step alone, samples/s: ours {sides['ours']['row']['samples_per_s']:.4g}, "
              f"peer {sides['peer']['row']['samples_per_s']:.4g}"]
    lines += [f"  {name}: {row['samples_per_s']:.4g}" for name, row in variants.items()]
    for name in ("ours", "peer"):
        row = sides[name]["row"]
        lines.append(f"{name}: device events/step {row['device_events_per_step']}, busy ms/step "
                     f"{row['device_busy_ms_per_step']} (fraction {row['device_busy_fraction']}), launch calls/step "
                     f"{row['launch_calls_per_step']}, sync calls/step {row['sync_calls_per_step']}, host syncs/step "
                     f"{row['host_syncs_per_step']}, aten ops/step {row['aten_ops_per_step']:.0f}")
    lookup = plane_lookup_ab(s)
    lines += ["", f"feature-plane lookup fwd+bwd: {lookup}"]
    text = "\n".join(lines) + "\n\n" + sides["ours"]["tables"] + "\n\n" + sides["peer"]["tables"] + "\n"
    out.with_name("profile.txt").write_text(text)
    print("\n".join(lines), flush=True)
    return {"ours": sides["ours"]["row"], "peer": sides["peer"]["row"], "variants": variants, "plane_lookup": lookup,
            "more_than_peer": [d for d in diff[:25] if d["extra_ms"] > 0], "steps": steps,
            "files": ["profile.txt", "profile_traces.tar.gz"]}
