"""Validation during training: render fixed held-out samples, save a PNG grid, log PSNR/LPIPS over
the frame and, where the person's appearance is, inside the rasterized face mask (PSNR and the
mean-colour error)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from avatars.data import LoaderConfig, ShardDataset, collate
from avatars.evaluation.lpips_weights import LpipsConfig, load_lpips
from avatars.evaluation.metrics import masked_psnr, mean_colour_error, psnr
from avatars.pipelines import AvatarPipeline
from common.io import DataError, atomic_write_bytes
from shards.integrity import MANIFEST
from shards.writer import shard_paths


class Validator:
    """Renders the same held-out samples at every validation, with fixed noise."""

    def __init__(self, shards: Path, person: str, resolution: int, count: int, lpips_weights: Path | None,
                 inference_steps: int):
        paths = []
        for split in ("test_seq", "test_cam"):
            paths += shard_paths(shards, person, split)
        if not paths:
            raise DataError(Path(shards) / person / MANIFEST, f"lists no held-out shards (test_seq, test_cam) of "
                                                            f"person {person} to validate on")
        ds = ShardDataset(paths, LoaderConfig(resolution=resolution, augment=False, num_workers=0))
        picks = np.linspace(0, len(ds) - 1, num=min(count, len(ds))).round().astype(int)
        self.batch = collate([ds[int(i)] for i in picks])
        self.inference_steps = inference_steps
        self.lpips = None
        if lpips_weights is not None and Path(lpips_weights).is_file():
            self.lpips = load_lpips(LpipsConfig(weights_path=Path(lpips_weights)))

    @torch.no_grad()
    def run(self, model, out_png: Path | None) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            pred = AvatarPipeline(model)(self.batch, num_inference_steps=self.inference_steps, seeds=0).float().cpu()
        finally:
            model.train(was_training)
        gt = (self.batch["image"] + 1) / 2
        face = self.batch["mask"]
        metrics = {"val_psnr": float(psnr(pred, gt).mean()),
                   "val_psnr_face": float(masked_psnr(pred, gt, face).nanmean()),
                   "val_colour_error": float(mean_colour_error(pred, gt, face).nanmean())}
        if self.lpips is not None:
            metrics["val_lpips"] = float(self.lpips(pred * 2 - 1, gt * 2 - 1).mean())
        if out_png is not None:
            save_grid(out_png, gt, pred, self.batch["mask"])
        return metrics


def save_grid(path: Path, gt: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> None:
    """Rows: ground truth, render, rasterized mask; one column per sample."""
    rows = [gt, pred, mask.expand(-1, 3, -1, -1)]
    grid = torch.cat([torch.cat(list(r.clamp(0, 1)), dim=2) for r in rows], dim=1)
    img = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    import io

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
