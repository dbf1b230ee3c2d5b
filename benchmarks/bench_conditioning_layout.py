"""The conditioning image's memory layout: what it costs in a tiny-preset training step (CPU).

    python benchmarks/bench_conditioning_layout.py [--repeats 3] [--steps 40] [--threads 1]

The ControlNet's conditioning embedding convolves the conditioning image at full resolution (64x64
on the tiny preset, 41 channels in its first convolution, whose input gradient reaches the feature
planes). ``ConditioningBuilder`` concatenates that image channels-last
(``avatars.models.conditioning.concat_channels_last``). This benchmark times, on the tiny model
(random base, batch 4, one thread by default), both layouts of the very same values:

* ``embedding``: the conditioning embedding's forward + backward alone, on the concatenation as
  built, NCHW (``torch.cat(parts, dim=1)``, the layout before) or channels-last;
* ``train step``: the whole training loss (conditioning, VAE encoding, ControlNet, UNet) forward
  + backward, with the conditioning image in each layout.

Rows alternate between the layouts ``--repeats`` times (the host's speed drifts); the table
gives the median milliseconds per call of each and their ratio. Writes
``benchmarks/results/conditioning_layout.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import report  # noqa: E402

from avatars.configs import tiny_config  # noqa: E402
from avatars.models import DiffusionAvatarsModel  # noqa: E402
from avatars.models import conditioning as conditioning_module  # noqa: E402
from avatars.testing import synthetic_batch  # noqa: E402

LAYOUTS = {
    "nchw": lambda parts: torch.cat(parts, dim=1),
    "channels_last": conditioning_module.concat_channels_last,
}


def _ms_per_call(fn, steps: int) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps * 1e3


def measure(steps: int, repeats: int, batch_size: int) -> list[dict]:
    model = DiffusionAvatarsModel(tiny_config(expression_dim=16))  # the ControlNet and planes train, as in a run
    batch = synthetic_batch(batch_size, model.config.resolution, expression_dim=16)
    generator = torch.Generator().manual_seed(0)
    embedding = model.controlnet.controlnet_cond_embedding

    def embedding_step(layout: str) -> None:
        with mock.patch.object(conditioning_module, "concat_channels_last", LAYOUTS[layout]):
            cond = model.conditioning(batch)
        embedding(cond).square().mean().backward()

    def train_step(layout: str) -> None:
        with mock.patch.object(conditioning_module, "concat_channels_last", LAYOUTS[layout]):
            model.training_loss(batch, generator)["loss"].backward()

    timings: dict[tuple[str, str], list[float]] = {}
    for _ in range(repeats):
        for name, step in (("embedding", embedding_step), ("train step", train_step)):
            for layout in LAYOUTS:
                timings.setdefault((name, layout), []).append(_ms_per_call(lambda: step(layout), steps))
    rows = []
    for name in ("embedding", "train step"):
        before, after = (statistics.median(timings[(name, layout)]) for layout in LAYOUTS)
        rows.append({"measure": name, "nchw_ms": round(before, 2), "channels_last_ms": round(after, 2),
                     "ratio": round(after / before, 3), "runs": repeats})
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="calls timed per row")
    ap.add_argument("--repeats", type=int, default=3, help="alternations of the two layouts")
    ap.add_argument("--batch", type=int, default=4, help="the tiny preset's batch")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a training worker of the main job: 1)")
    return ap.parse_args(argv)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = measure(args.steps, args.repeats, args.batch)
    report("conditioning_layout", rows, {"threads": args.threads, "batch": args.batch})


if __name__ == "__main__":
    main()
