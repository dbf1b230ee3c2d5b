"""What one optimizer step dispatches: DeepSpeed's bf16 mode (the path before issue 11) vs the
trainer's fp32 engine with a fused AdamW and sync-free clipping.

    python benchmarks/bench_optimizer_step.py [--preset tiny]

Counts, for `engine.step()` (plus the trainer's own clipping in the new path), the aten operations
dispatched (each is at least one kernel launch on a GPU) and the host reads (`.item()` and the like:
each a host synchronisation on a GPU), on this machine's device, after two warm-up steps. The
tiny preset runs on CPU in seconds; the counts grow with the number of trainable tensors.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import report  # noqa: E402

from avatars.training.rendezvous import environment_without_group  # noqa: E402


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def measure(path: str, preset: str) -> dict:
    import deepspeed

    from avatars.host_sync import count_host_reads
    from avatars.models import DiffusionAvatarsModel
    from avatars.testing import synthetic_batch
    from avatars.training import performance as perf
    from avatars.training import train_preset
    from avatars.training.engine import LossModule, build_engine
    from avatars.training.optim import clip_gradients
    from avatars.training.trainer import init_distributed

    _, world = init_distributed()
    cfg = train_preset(preset, batch_size=2, precision="bf16", random_base=preset == "paper")
    model = DiffusionAvatarsModel(cfg.model_config(16))
    noise = torch.Generator().manual_seed(0)
    if path == "before":  # DeepSpeed's own bf16 mode, as the trainer ran before issue 11
        optimizer = torch.optim.AdamW(model.parameter_groups(cfg.lr_networks, cfg.lr_features), weight_decay=0.0)
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
                  "zero_optimization": {"stage": 0}, "bf16": {"enabled": True}, "steps_per_print": 1 << 30}
        engine, _, _, _ = deepspeed.initialize(model=LossModule(model, perf.Precision(False, "cpu")),
                                               optimizer=optimizer, config=config)
        cast = torch.bfloat16

        def step() -> None:
            engine.step()
    else:
        trainer = build_engine(cfg, model, world)
        engine, cast = trainer.engine, None

        def step() -> None:
            clip_gradients(trainer.clipped, cfg.grad_clip)
            engine.step()
    batch = {k: (v.to(engine.device, cast or v.dtype) if torch.is_tensor(v) and v.is_floating_point() else v)
             for k, v in synthetic_batch(2, cfg.model_config(16).resolution, 16).items()}

    def forward_backward() -> None:
        engine.backward(engine(batch, noise))

    for _ in range(2):
        forward_backward()
        step()
    forward_backward()
    counter = _Count()
    with counter:
        step()
    forward_backward()
    _, reads = count_host_reads(step)
    return {"path": path, "optimizer": type(engine.optimizer).__name__,
            "trainable tensors": sum(1 for p in model.parameters() if p.requires_grad),
            "aten ops per step": counter.ops, "host reads per step": len(reads),
            "host reads": dict(collections.Counter(reads))}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["tiny", "paper"], default="tiny")
    parser.add_argument("--path", choices=["before", "now"], help=argparse.SUPPRESS)  # one path per process
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.path:
        import json

        print("ROW" + json.dumps(measure(args.path, args.preset)))
        return
    import json
    import subprocess

    rows = []
    for path in ("before", "now"):  # separate processes: DeepSpeed's bf16 mode changes global state
        env = environment_without_group()
        proc = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--path", path], env=env,
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.split("ROW", 1)[1]))
    report("optimizer_step", [{k: v for k, v in r.items() if k != "host reads"} for r in rows],
           {"preset": args.preset, "details": rows})


if __name__ == "__main__":
    main()
