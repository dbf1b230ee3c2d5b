"""Can the tiny base's VAE carry a person's eyes and mouth? Stage 1 of the base pretraining
(avatars/training/base_pretraining.py) for several VAE layouts and learning rates, scored on the
held-out images inside the rasterized face mask, with a picture of every variant.

    python benchmarks/bench_base_vae.py --shards data/shards \\
        --variants 'default:' 'lat8:latent_channels=8' 'lr3e-3:vae_lr=3e-3' --steps 400

A variant is 'name:key=value,...' over ``BasePretrainConfig`` fields (vae_steps, vae_lr,
vae_batch_size, kl_weight, ...) and ``VAEConfig`` fields (block_out_channels as 16-32-32,
latent_channels, layers_per_block). Everything a render shows passes through this decoder, so its
reconstruction is the upper bound of an avatar's fidelity (see benchmarks/bench_fidelity.py).
With ``--probe-workdir DIR`` (a work directory of synthetic captures: zarr/ and shards/) each
variant is also scored like ``bench_expression_probe.py --vae``: on a person's held-out frames the
generator renders the ground truth with the real expression code and with the expression-only dims
(mouth-interior colour, gaze) zeroed, and the *response gain* is the fraction of that change the
VAE's round trip keeps on the ~50-80 expression pixels per frame (1 = all of it).
Every row also gives the colour error of the hair and of the skin (``ΔE hair``, ``ΔE skin``: CIE76 between
the mean CIELAB colours of the region in the reconstruction and in the ground truth, mean over the images;
regions by canonical height inside the mask): a decoder that shifts a person's colours shows there even where
its PSNR hardly moves.
Writes benchmarks/results/base_vae.json and base_vae.png (+ .txt naming the rows).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import RESULTS, report  # noqa: E402
from heldout import parse_value, save_rows  # noqa: E402

from avatars.configs import VAEConfig, tiny_config  # noqa: E402
from avatars.data import LoaderConfig, ShardDataset  # noqa: E402
from avatars.evaluation.metrics import psnr_from_mse, srgb_to_lab  # noqa: E402
from avatars.training.base_pretraining import (  # noqa: E402
    BasePretrainConfig,
    _split_shards,
    image_batches,
    resolve_persons,
    train_vae,
)

VAE_KEYS = {f.name for f in dataclasses.fields(VAEConfig)}


def parse_variant(spec: str) -> tuple[str, dict, dict]:
    name, _, body = spec.rpartition(":")
    pretrain, vae = {}, {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if key == "block_out_channels":
            vae[key] = tuple(int(v) for v in value.split("-"))
        elif key in VAE_KEYS:
            vae[key] = parse_value(value)
        else:
            pretrain[key] = parse_value(value)
    return name or spec, pretrain, vae


#: Colour regions of the synthetic heads by normalised canonical y inside the mask: the hair cap and the skin
#: below it (the eyes and mouth included, a few percent of it).
REGIONS = {"hair": (0.55, 2.0), "skin": (-2.0, 0.3)}


def held_out(shard_root: Path, persons: list[str], count: int,
             resolution: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(images in [-1, 1], rasterized face masks, :data:`REGIONS` masks) of ``count`` test_seq frames spread
    over the persons."""
    dataset = ShardDataset(_split_shards(shard_root, persons, "test_seq"), LoaderConfig(
        resolution=resolution, batch_size=1, augment=False, num_workers=0))
    idx = torch.linspace(0, len(dataset) - 1, min(count, len(dataset))).round().long().unique().tolist()
    items = [dataset[i] for i in idx]
    masks = torch.stack([i["mask"] for i in items])
    y = torch.stack([i["canonical"][1:2] for i in items])
    regions = {name: (masks > 0.5) & (y > low) & (y < high) for name, (low, high) in REGIONS.items()}
    return torch.stack([i["image"] for i in items]), masks, regions


def colour_error(recon: torch.Tensor, images: torch.Tensor, region: torch.Tensor, min_pixels: int = 10) -> float:
    """CIE76 ΔE between the mean colours (CIELAB) of ``region`` in the reconstruction and the ground truth
    (both in [0, 1]), mean over the images with at least ``min_pixels`` region pixels: a decoder that shifts a
    person's hair or skin colour shows here even where the PSNR hardly moves."""
    values = []
    for rec, gt, sel in zip(recon, images, region[:, 0]):
        if int(sel.sum()) >= min_pixels:
            means = [srgb_to_lab(x.permute(1, 2, 0)[sel]).mean(0) for x in (rec, gt)]
            values.append(float((means[0] - means[1]).norm()))
    return sum(values) / len(values) if values else float("nan")


@torch.no_grad()
def scores(vae, images: torch.Tensor, masks: torch.Tensor,
           regions: dict[str, torch.Tensor] | None = None) -> tuple[dict, torch.Tensor]:
    recon = torch.cat([vae.decode(vae.encode(c).latent_dist.mode()).sample.clamp(-1, 1) for c in images.split(32)])
    err = ((recon - images) / 2).pow(2)
    face = masks.expand_as(err)
    face_mse = (err * face).flatten(1).sum(1) / face.flatten(1).sum(1).clamp_min(1)
    colours = {f"ΔE {name}": colour_error((recon + 1) / 2, (images + 1) / 2, sel)
               for name, sel in (regions or {}).items()}
    return {"psnr": psnr_from_mse(err.flatten(1).mean(1)).mean().item(),
            "psnr_face": psnr_from_mse(face_mse.clamp_min(1e-12)).mean().item(), **colours}, (recon + 1) / 2


class ExpressionProbe:
    """The expression-only effects of one person's held-out frames (bench_expression_probe.py)."""

    def __init__(self, workdir: Path, person: str, resolution: int):
        from bench_expression_probe import HeldOutExpression

        self.held = HeldOutExpression(workdir, person, resolution)
        self.info = {"person": person, "frames": len(self.held.real),
                     "expression pixels per frame": self.held.pixels_per_frame()}

    @torch.no_grad()
    def score(self, vae) -> dict:
        from bench_expression_probe import EFFECTS, measure, response_gain, vae_round_trip

        h = self.held
        real = vae_round_trip(vae, h.real)
        m = measure("", real, vae_round_trip(vae, h.zeroed), h.real, h.face, h.pixels, h.change)
        row = {"expr response gain": m["response gain"], "expr-pixel PSNR": m["expression-pixel PSNR"]}
        for effect in EFFECTS:  # each effect alone: the gaze's many pixels must not hide a lost mouth colour
            zeroed, change, pixels = h.effect(effect)
            row[f"gain: {effect}"] = response_gain(real - vae_round_trip(vae, zeroed), change, pixels)
        return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=Path, default=Path("data/shards"))
    ap.add_argument("--persons", default="all")
    ap.add_argument("--variants", nargs="*", default=["default:"])
    ap.add_argument("--bases", nargs="*", type=Path, default=[],
                    help="pretrained base folders (jobs/pretrain_base.py) whose VAE to score as it is")
    ap.add_argument("--steps", type=int, default=None, help="vae_steps of every variant that does not set it")
    ap.add_argument("--images", type=int, default=64, help="held-out images scored")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="")
    ap.add_argument("--probe-workdir", type=Path, default=None,
                    help="work directory (zarr/, shards/) of synthetic captures: also score the expression response")
    ap.add_argument("--probe-person", default="000")
    return ap.parse_args(argv)


def main() -> None:
    a = parse_args()
    torch.set_num_threads(a.threads)
    persons = resolve_persons(a.shards, a.persons)
    resolution = tiny_config().resolution
    images, masks, regions = held_out(a.shards, persons, a.images, resolution)
    rows, pictures = [], [("ground truth", (images + 1) / 2)]
    probe = ExpressionProbe(a.probe_workdir, a.probe_person, resolution) if a.probe_workdir else None
    for base in a.bases:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(base / "vae").eval()
        s, recon = scores(vae, images, masks, regions)
        if probe is not None:
            s.update(probe.score(vae))
        rows.append({"variant": str(base), **s})
        pictures.append((str(base), recon))
        print(rows[-1], flush=True)
    for spec in a.variants:
        name, pretrain, vae_fields = parse_variant(spec)
        if a.steps is not None:
            pretrain.setdefault("vae_steps", a.steps)
        config = BasePretrainConfig(shard_root=a.shards, persons=a.persons, log_every=0, **pretrain)
        model_config = tiny_config()
        model_config = dataclasses.replace(model_config, vae=dataclasses.replace(model_config.vae, **vae_fields))
        train = ShardDataset(_split_shards(a.shards, persons, "train"), LoaderConfig(
            resolution=resolution, batch_size=config.vae_batch_size, augment=True, num_workers=1,
            seed=config.seed))
        cpu = time.process_time()
        vae, loss, _ = train_vae(config, model_config, image_batches(train, train.config))
        cpu = time.process_time() - cpu
        s, recon = scores(vae, images, masks, regions)
        if probe is not None:
            s.update(probe.score(vae))
        rows.append({"variant": name, "steps": config.vae_steps, "lr": config.vae_lr,
                     "blocks": "-".join(map(str, model_config.vae.block_out_channels)),
                     "latent": model_config.vae.latent_channels, "recon loss": loss, **s, "train CPU s": cpu})
        pictures.append((name, recon))
        print(rows[-1], flush=True)
    save_rows(RESULTS / f"base_vae{a.tag}.png", pictures, columns=8)
    extra = {"probe": probe.info} if probe is not None else {}
    report(f"base_vae{a.tag}", rows, {"persons": persons, "heldout_images": int(images.shape[0]), **extra})


if __name__ == "__main__":
    main()
