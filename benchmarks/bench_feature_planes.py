"""How fast do the feature planes take up a person's appearance? (feature-plane init, resolution, lr)

    python benchmarks/bench_feature_planes.py [--person 000] [--steps 400] \\
        [--variants res=32,std=0.1 res=32,std=1 res=0 ...]

A cheap proxy of the avatar's appearance path without diffusion or UNet: the model's own
`FeaturePlanes` plus the rasterized channels (`rasterized_channels`) feed a per-pixel decoder
(three 1x1 convolutions) that is fitted to the person's training images (64x64, rasterized-mask
MSE, Adam: planes at `plr`, decoder at 1e-3, batch 8); the held-out frames (held-out sequences
and camera) are scored inside the rasterized mask (PSNR, CIE76 mean-colour error) and a picture
(ground truth over fit) is written per variant. A variant is `key=value` pairs: `res` (plane
resolution, 0 = no planes), `ch` (channels per plane), `std` (normal init), `plr` (plane lr).
Needs the shards of the main job (data/shards).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import RESULTS, report  # noqa: E402

from avatars.configs import RASTER_CHANNELS, FeatureConfig  # noqa: E402
from avatars.data import LoaderConfig, ShardDataset, collate  # noqa: E402
from avatars.evaluation.metrics import masked_psnr, mean_colour_error  # noqa: E402
from avatars.models.conditioning import rasterized_channels  # noqa: E402
from avatars.models.feature_planes import FeaturePlanes  # noqa: E402
from shards.writer import shard_paths  # noqa: E402

KEYS = ("mask", "depth", "normals", "canonical", "image")


def load(shards: Path, person: str, splits: list[str], count: int | None = None) -> dict:
    paths = [p for s in splits for p in shard_paths(shards, person, s)]
    ds = ShardDataset(paths, LoaderConfig(resolution=64, augment=False, num_workers=0))
    idx = range(len(ds)) if count is None else np.linspace(0, len(ds) - 1, count).round().astype(int)
    return collate([ds[int(i)] for i in idx])


def fit(train: dict, test: dict, steps: int, res: int, ch: int, std: float, plr: float, seed: int = 0):
    """Returns (held-out face PSNR, colour error, final train loss, CPU seconds, held-out fit)."""
    torch.manual_seed(seed)
    config = FeatureConfig(mapping="triplane" if res else "none", resolution=max(res, 1), channels=ch, init_std=std)
    planes = FeaturePlanes.from_feature_config(config, generator=torch.Generator().manual_seed(seed))
    width = RASTER_CHANNELS + config.num_output_channels
    decoder = nn.Sequential(nn.Conv2d(width, 64, 1), nn.SiLU(), nn.Conv2d(64, 64, 1), nn.SiLU(), nn.Conv2d(64, 3, 1))
    groups = [{"params": decoder.parameters(), "lr": 1e-3}]
    if res:
        groups.append({"params": planes.parameters(), "lr": plr})
    opt = torch.optim.Adam(groups)

    def forward(b: dict) -> torch.Tensor:
        return decoder(torch.cat([rasterized_channels(b, 1.0, 0.3), planes(b["canonical"], b["mask"])], 1))

    gen = torch.Generator().manual_seed(seed)
    start = time.process_time()
    for _ in range(steps):
        idx = torch.randint(0, len(train["mask"]), (8,), generator=gen)
        b = {k: train[k][idx] for k in KEYS}
        loss = (((forward(b) - b["image"]) ** 2) * b["mask"]).sum() / (b["mask"].sum() * 3)
        opt.zero_grad()
        loss.backward()
        opt.step()
    cpu = time.process_time() - start
    with torch.no_grad():
        gt, m = (test["image"] + 1) / 2, test["mask"]
        pred = ((forward(test) + 1) / 2).clamp(0, 1) * m + gt * (1 - m)
    return (float(masked_psnr(pred, gt, m).nanmean()), float(mean_colour_error(pred, gt, m).nanmean()),
            float(loss.detach()), cpu, pred)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=Path, default=Path("data/shards"))
    ap.add_argument("--person", default="000")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--variants", nargs="+", default=["res=32,std=0.1", "res=32,std=1", "res=0"])
    return ap.parse_args(argv)


def main() -> None:
    a = parse_args()
    torch.set_num_threads(1)
    train = load(a.shards, a.person, ["train"])
    test = load(a.shards, a.person, ["test_seq", "test_cam"], a.samples)
    rows = []
    for spec in a.variants:
        v = dict(kv.split("=") for kv in spec.split(","))
        res, ch = int(v.get("res", 32)), int(v.get("ch", 4))
        std, plr = float(v.get("std", 1.0)), float(v.get("plr", 1e-2))
        psnr_face, colour, loss, cpu, pred = fit(train, test, a.steps, res, ch, std, plr)
        rows.append({"variant": spec, "steps": a.steps, "PSNR face": psnr_face, "colour error": colour,
                     "train loss": loss, "CPU s": cpu})
        from PIL import Image

        gt = (test["image"][:8] + 1) / 2
        grid = torch.cat([torch.cat(list(gt), 2), torch.cat(list(pred[:8]), 2)], 1)
        RESULTS.mkdir(parents=True, exist_ok=True)
        img = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8).repeat(2, 0).repeat(2, 1)
        Image.fromarray(img).save(RESULTS / f"feature_planes_{spec.replace(',', '_').replace('=', '')}.png")
    report("feature_planes", rows, {"person": a.person, "samples": a.samples})


if __name__ == "__main__":
    main()
