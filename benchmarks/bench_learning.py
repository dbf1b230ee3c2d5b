"""Does training learn, and do the renders look like the person? Held-out quality of tiny
avatars vs the untrained model and simple baselines, per person, plus a picture.

    python benchmarks/bench_learning.py [--persons 000,001] [--steps 600] [--samples 32] \
        [--image benchmarks/results/learning.png]

Needs the default data (data/shards) and the tiny base (the newest data/base/tiny-<key>,
or --base-model), which the main job (jobs/launch_all.py) writes. Trains each person with the tiny preset
(reusing an earlier run of the same length under --out), then renders fixed
held-out samples (held-out sequences and the held-out frontal camera, evenly spread)
with 20 DDPM steps and fixed noise, and compares with
* the untrained model: the same frozen base with freshly initialised (zero-output)
  ControlNet / expression layers / feature planes, i.e. what training starts from;
* a mean-colour image: the mean RGB of all training targets, everywhere;
* a silhouette + mean-colour image: the background colour outside the rasterized
  mask, the mean foreground colour of the training targets inside (a baseline that
  already knows the geometry the model is given).
Besides full-frame PSNR / LPIPS and the masked PSNR, it reports the face metrics (inside the
rasterized mask: PSNR, LPIPS, and the CIE76 error of the mean colour), which see whether the
render has the person's colours, eyes and mouth, and writes an image with, per person, a row of
ground-truth frames over the trained avatar's renders of them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import report  # noqa: E402

from avatars.data import LoaderConfig, ShardDataset, collate  # noqa: E402
from avatars.evaluation.lpips_weights import LpipsConfig, load_lpips  # noqa: E402
from avatars.evaluation.metrics import EvalConfig, Evaluator, masked_psnr, mean_colour_error, psnr  # noqa: E402
from avatars.models import DiffusionAvatarsModel  # noqa: E402
from avatars.pipelines import AvatarPipeline  # noqa: E402
from avatars.training import TrainConfig, train_person  # noqa: E402
from shards.writer import shard_paths  # noqa: E402


def held_out(shards: Path, person: str, resolution: int, count: int) -> dict:
    paths = shard_paths(shards, person, "test_seq") + shard_paths(shards, person, "test_cam")
    ds = ShardDataset(paths, LoaderConfig(resolution=resolution, augment=False, num_workers=0))
    picks = np.linspace(0, len(ds) - 1, num=min(count, len(ds))).round().astype(int)
    return collate([ds[int(i)] for i in picks])


def training_colours(shards: Path, person: str, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean RGB of all training targets, mean RGB inside the rasterized mask), in [0, 1]."""
    ds = ShardDataset(shard_paths(shards, person, "train"), LoaderConfig(resolution=resolution, augment=False,
                                                                         num_workers=0))
    total, fg, n_fg, n = torch.zeros(3), torch.zeros(3), 0.0, 0
    for i in range(len(ds)):
        s = ds[i]
        img = (s["image"] + 1) / 2
        total += img.mean((1, 2))
        n += 1
        fg += (img * s["mask"]).sum((1, 2))
        n_fg += float(s["mask"].sum())
    return total / n, fg / max(n_fg, 1.0)


def render(model: DiffusionAvatarsModel, batch: dict, chunk: int = 8) -> torch.Tensor:
    pipe = AvatarPipeline(model.eval())
    keys = [k for k in batch if k != "__key__"]
    out = [pipe({k: batch[k][i:i + chunk] for k in keys}, num_inference_steps=20, seeds=0)
           for i in range(0, len(batch["mask"]), chunk)]
    return torch.cat(out).float()


def person_rows(a, person: str, lpips, face_lpips) -> tuple[list[dict], torch.Tensor, torch.Tensor]:
    """Metric rows of one person (trained avatar, untrained model, baselines), its ground truth
    and the trained avatar's renders."""
    cfg = TrainConfig(person=person, shards=a.shards, out=a.out, base_model=a.base_model, steps=a.steps,
                      validate_every=0, checkpoint_every=a.steps)
    result_file = cfg.run_dir / "result.json"
    if not (result_file.is_file() and json.loads(result_file.read_text()).get("steps") == a.steps):
        train_person(cfg)
    trained = DiffusionAvatarsModel.from_pretrained(cfg.run_dir / "model")
    untrained = DiffusionAvatarsModel(trained.config, base_model=a.base_model)
    res = trained.config.resolution
    batch = held_out(a.shards, person, res, a.samples)
    gt = (batch["image"] + 1) / 2
    mean_rgb, fg_rgb = training_colours(a.shards, person, res)
    background = torch.ones(3)  # the shards' fixed background (ShardConfig.background)
    mask = batch["mask"]
    preds = {
        "trained avatar": render(trained, batch),
        "untrained model (training start)": render(untrained, batch),
        "mean colour": mean_rgb.view(1, 3, 1, 1).expand_as(gt),
        "silhouette + mean colour": fg_rgb.view(1, 3, 1, 1) * mask + background.view(1, 3, 1, 1) * (1 - mask),
    }
    alpha = batch["alpha"]
    rows = []
    for name, pred in preds.items():
        pred = pred.clamp(0, 1)
        # Masked: both composited onto the background with the ground-truth alpha (the official protocol).
        pm, gm = pred * alpha + (1 - alpha), gt * alpha + (1 - alpha)
        with torch.no_grad():
            lp = float(lpips(pred * 2 - 1, gt * 2 - 1).mean())
        rows.append({"person": person, "model": name, "PSNR": float(psnr(pred, gt).mean()),
                     "PSNR masked": float(psnr(pm, gm).mean()), "LPIPS": lp,
                     "PSNR face": float(masked_psnr(pred, gt, mask).nanmean()),
                     "LPIPS face": float(face_lpips.lpips_in_mask(pred, gt, mask).nanmean()),
                     "colour error": float(mean_colour_error(pred, gt, mask).nanmean())})
    return rows, gt, preds["trained avatar"].clamp(0, 1)


def save_montage(
    path: Path, pictures: list[tuple[torch.Tensor, torch.Tensor]], columns: int = 6, scale: int = 2
) -> None:
    """Per person: ground truth row over render row, `columns` frames spread over the samples."""
    from PIL import Image

    blocks = []
    for gt, pred in pictures:
        picks = np.linspace(0, len(gt) - 1, num=min(columns, len(gt))).round().astype(int)
        blocks.append(torch.cat([torch.cat([t[i] for i in picks], 2) for t in (gt, pred)], 1))
        blocks.append(torch.ones(3, 4, blocks[-1].shape[2]))  # a white gap between persons
    grid = torch.cat(blocks[:-1], 1)
    img = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8).repeat(scale, 0).repeat(scale, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    print(f"wrote {path}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shards", type=Path, default=Path("data/shards"))
    ap.add_argument("--base-model", type=Path, default=None, help="default: the newest data/base/tiny-<key>")
    ap.add_argument("--persons", default="000", help="comma-separated person ids")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("data/bench-learning"))
    ap.add_argument("--image", type=Path, default=Path("benchmarks/results/learning.png"),
                    help="ground truth | render picture of every person")
    return ap.parse_args(argv)


def main() -> None:
    a = parse_args()
    if a.base_model is None:
        from avatars.training.base_pretraining import newest_base

        a.base_model = newest_base()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    weights = Path("weights/lpips_alex.safetensors")
    lpips = load_lpips(LpipsConfig(weights_path=weights))
    face_lpips = Evaluator(EvalConfig(metrics=("lpips_face",), lpips=LpipsConfig(weights_path=weights)))
    persons = [p.strip() for p in a.persons.split(",") if p.strip()]
    rows, pictures = [], []
    for person in persons:
        person_rows_, gt, pred = person_rows(a, person, lpips, face_lpips)
        rows += person_rows_
        pictures.append((gt, pred))
    if len(persons) > 1:  # the mean over persons of each model
        for name in dict.fromkeys(r["model"] for r in rows):
            mine = [r for r in rows if r["model"] == name]
            rows.append({"person": "mean", "model": name,
                         **{k: float(np.mean([r[k] for r in mine])) for k in mine[0] if k not in ("person", "model")}})
    save_montage(a.image, pictures)
    report("learning", rows, {"persons": persons, "steps": a.steps, "samples": a.samples,
                              "base_model": str(a.base_model), "image": str(a.image)})


if __name__ == "__main__":
    main()
