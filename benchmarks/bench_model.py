"""Benchmark of the DiffusionAvatars model.

Measures, on this machine, the training-step time (forward + backward + Adam step) and the
sampling time per frame of the tiny CPU configs (the paper config and its ablation switches on
the tiny layout), and counts FLOPs with ``torch.utils.flop_counter`` for the same tiny configs
and for the full paper config (SD2.1 layout, 512x512, built on the meta device: counted, not
run). Prints a table and writes ``benchmarks/results/bench_model.json``.

    .venv/bin/python benchmarks/bench_model.py [--steps 10] [--threads 1] [--skip-full]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import machine  # noqa: E402

from avatars.configs import FeatureConfig, paper_config, tiny_config  # noqa: E402
from avatars.models import DiffusionAvatarsModel  # noqa: E402
from avatars.pipelines import AvatarPipeline  # noqa: E402
from avatars.testing import synthetic_batch  # noqa: E402
from common.io import atomic_write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_model.json"


def tiny_variants() -> dict:
    base = tiny_config()
    return {
        "tiny (paper switches)": base,
        "tiny w/o expression": tiny_config(use_expression=False),
        "tiny w/o spatial features": dataclasses.replace(base, features=FeatureConfig(mapping="none")),
        "tiny spherical UV": dataclasses.replace(
            base,
            features=FeatureConfig(
                mapping="spherical", resolution=base.features.resolution, channels=base.features.channels
            ),
        ),
        "tiny w/o diffusion": tiny_config(use_diffusion=False),
        "tiny w/o LDM prior": tiny_config(use_ldm_prior=False),
    }


def count_train_flops(model: DiffusionAvatarsModel, batch: dict) -> int:
    with FlopCounterMode(display=False) as counter:
        loss = model.training_loss(batch)["loss"]
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def count_denoise_flops(model: DiffusionAvatarsModel, batch: dict) -> int:
    """FLOPs of one sampling step (ControlNet + UNet + expression layers), batch as given."""
    size = batch["mask"].shape[0]
    h = batch["mask"].shape[2] // model.latent_factor
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        cond = model.conditioning(batch)
        latents = torch.zeros(size, model.config.vae.latent_channels, h, h, device=cond.device)
        tokens = model.encode_expression(batch.get("expression"))
        model.denoise(latents, torch.full((size,), 500, device=cond.device), cond, tokens)
    return counter.get_total_flops()


def count_render_flops(model: DiffusionAvatarsModel, batch: dict, steps: int) -> int:
    """FLOPs of one whole render of ``batch`` with ``steps`` denoising steps, as the pipeline runs it: the
    conditioning and the expression tokens once, each step's ControlNet + UNet, and the VAE decode (which a
    count of the denoising steps alone leaves out: at 512^2 it is more than two steps' worth)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        AvatarPipeline(model)(batch, num_inference_steps=steps)
    return counter.get_total_flops()


def time_train(model: DiffusionAvatarsModel, batch: dict, steps: int) -> float:
    optimizer = torch.optim.Adam(model.parameter_groups())
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        loss = model.training_loss(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= 2:  # warm-up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_sample(pipeline: AvatarPipeline, batch: dict, repeats: int, steps: int = 20) -> float:
    pipeline(batch, num_inference_steps=2)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        pipeline(batch, num_inference_steps=steps)
        times.append(time.perf_counter() - start)
    return statistics.median(times) / batch["mask"].shape[0]


def full_config_flops(expression_dim: int) -> dict:
    config = paper_config(expression_dim=expression_dim)
    with torch.device("meta"):
        model = DiffusionAvatarsModel(config, allow_random_base=True)
    model.to("meta")
    batch = {k: v.to("meta") if torch.is_tensor(v) else v for k, v in synthetic_batch(1, 512, expression_dim).items()}
    return {
        "train_step_flops_per_sample": count_train_flops(model, batch),
        "denoise_step_flops_per_frame": count_denoise_flops(model, batch),
        "params_trainable_M": sum(p.numel() for p in model.trainable_state_dict().values()) / 1e6,
        "params_frozen_M": sum(p.numel() for p in model.parameters() if not p.requires_grad) / 1e6,
        "expression_layers": model.num_expression_layers,
        "conditioning_channels": config.conditioning_channels,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per variant (median)")
    parser.add_argument("--sample-repeats", type=int, default=3, help="timed 20-step samplings (median)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-full", action="store_true", help="skip the full-config FLOP count")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)

    load_before = os.getloadavg()
    rows = []
    for name, config in tiny_variants().items():
        torch.manual_seed(0)
        model = DiffusionAvatarsModel(config)
        batch = synthetic_batch(args.batch_size, config.resolution, config.expression_dim)
        train_flops = count_train_flops(model, batch)
        train_s = time_train(model, batch, args.steps)
        frame = synthetic_batch(1, config.resolution, config.expression_dim)
        sample_s = time_sample(AvatarPipeline(model), frame, args.sample_repeats)
        sample_flops = count_render_flops(model, frame, 20)  # the sampler of time_sample
        rows.append({
            "variant": name,
            "resolution": config.resolution,
            "batch_size": args.batch_size,
            "unet_params_M": sum(p.numel() for p in model.unet.parameters()) / 1e6,
            "trainable_params_M": sum(p.numel() for p in model.trainable_state_dict().values()) / 1e6,
            "train_step_ms": train_s * 1e3,
            "train_step_GFLOP": train_flops / 1e9,
            "train_GFLOP_per_s": train_flops / train_s / 1e9,
            "sample_ms_per_frame": sample_s * 1e3,
            "sample_GFLOP_per_frame": sample_flops / 1e9,
            "sampler": "ddpm, 20 steps" if config.use_diffusion else "single pass",
        })

    print(f"\nTiny configs, CPU, {args.threads} thread(s), batch {args.batch_size}:")
    header = (f"{'variant':28s} {'UNet M':>7s} {'train ms':>9s} {'train GFLOP':>11s} {'GFLOP/s':>8s} "
              f"{'sample ms/frame':>15s} {'sample GFLOP':>12s}")
    print(header)
    for r in rows:
        print(f"{r['variant']:28s} {r['unet_params_M']:7.2f} {r['train_step_ms']:9.1f} {r['train_step_GFLOP']:11.2f} "
              f"{r['train_GFLOP_per_s']:8.1f} {r['sample_ms_per_frame']:15.1f} {r['sample_GFLOP_per_frame']:12.3f}")

    result = {
        "machine": {**machine(), "threads": args.threads,
                    "loadavg_1_5_15_before": load_before, "loadavg_1_5_15_after": os.getloadavg()},
        "notes": "FLOPs from torch.utils.flop_counter (a multiply-add = 2 FLOPs). Training step = VAE encode + "
                 "ControlNet/UNet/expression forward + backward (frozen weights get no weight gradients); "
                 "attention score matmuls included. Timings: median, CPU shared with other jobs (see loadavg).",
        "tiny": rows,
    }
    if not args.skip_full:
        full = full_config_flops(expression_dim=100)
        result["full"] = full
        rate = statistics.median(r["train_GFLOP_per_s"] for r in rows)
        train_g = full["train_step_flops_per_sample"] / 1e9
        denoise_g = full["denoise_step_flops_per_frame"] / 1e9
        print("\nFull paper config (SD2.1 layout, 512x512, counted on the meta device, not run):")
        print(f"  trainable {full['params_trainable_M']:.1f} M, frozen {full['params_frozen_M']:.1f} M, "
              f"{full['expression_layers']} expression layers, {full['conditioning_channels']} conditioning channels")
        print(f"  training step:  {train_g:9.1f} GFLOP per sample "
              f"(x{args.batch_size} per batch = {train_g * args.batch_size / 1e3:.1f} TFLOP)")
        print(f"  sampling:       {denoise_g:9.1f} GFLOP per denoising step per frame, "
              f"{20 * denoise_g / 1e3:.2f} TFLOP per 20-step frame")
        print(f"  for scale: the tiny train steps above ran at a median {rate:.1f} GFLOP/s on this machine")
    atomic_write_json(args.out, result)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
