"""Does a trained avatar use its expression code where only the code explains the image?

    python benchmarks/bench_expression_probe.py --workdir data --person 000 [--run full=RUN_DIR \\
        --run no_expression=RUN_DIR ...] [--vae OTHER_BASE ...]

On the person's held-out sequences from the held-out camera (synthetic captures only) the
generator renders every ground-truth frame twice from the true mesh: with the real code and with
the expression-only dims (mouth-interior colour, gaze) set to 0. Where the two differ by more than
0.05 (the *expression pixels*, ~50 of 4096 per frame) the image is explained by the code alone.
Every run renders the frames (20 DDPM steps, fixed noise) with the real code and with those dims
zeroed, and the probe reports, per run: PSNR inside the face and on the expression pixels against
the ground truth, and the *response*: how much of the ground truth's change between the two codes
the render reproduces on the expression pixels (least-squares gain of render change on ground-truth
change: 1 = the full effect, 0 = none; a model without expression conditioning is 0 by construction).
The same is reported for the base VAE's round trip of the ground truth (and of other bases' with
``--vae``): a latent model cannot show more of the effect than its VAE carries.
Writes benchmarks/results/expression_probe.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import report  # noqa: E402
from bench_expression_effect import EXPRESSION_ONLY, resize  # noqa: E402
from heldout import heldout_tasks, load_model, main_job_base, render, task_batch  # noqa: E402

from avatars.evaluation.metrics import psnr_from_mse  # noqa: E402
from cluster.eval_driver.tasks import open_store, synthetic_config  # noqa: E402

THRESHOLD = 0.05


def on_white(rgb: np.ndarray, alpha: np.ndarray, size: int) -> torch.Tensor:
    """The generator's image composited on white like the evaluation's reference frames, resized."""
    a = alpha[..., None].astype(np.float32) / 255
    return resize((rgb * a + 255 * (1 - a)).round().astype(np.uint8), size)


def ground_truth_pair(workdir: Path, person: str, codes: np.ndarray, serial: str, size: int):
    """(real, zeroed) ground truth (T, 3, size, size) of the true mesh under `codes`, from `serial`."""
    from shards.synthetic.generate import PersonModel

    synth = synthetic_config(open_store(workdir / "zarr", person))
    if synth is None:
        raise SystemExit(f"{person} is not a synthetic capture: the probe needs its generator")
    model = PersonModel.build(synth, person)
    camera, index = model.cameras[serial], synth.serials.index(serial)
    real, zeroed = [], []
    for expr in codes:
        flat = expr.copy()
        flat[list(EXPRESSION_ONLY)] = 0
        vertices = model.true_vertices(expr)
        real.append(on_white(*model.render(vertices, expr, camera, index), size))
        zeroed.append(on_white(*model.render(vertices, flat, camera, index), size))
    return torch.stack(real), torch.stack(zeroed)


def vae_round_trip(vae, x: torch.Tensor) -> torch.Tensor:
    """A diffusers VAE's round trip (posterior mean) of images in [0, 1]."""
    return ((vae.decode(vae.encode(x * 2 - 1).latent_dist.mean).sample + 1) / 2).clamp(0, 1)


class HeldOutExpression:
    """One person's held-out frames from the held-out camera with the generator's two ground truths
    (real code, expression-only dims zeroed), the change between them, the expression pixels where it
    exceeds :data:`THRESHOLD` and the rasterized face."""

    def __init__(self, workdir: Path, person: str, size: int):
        self.frames = heldout_tasks(workdir / "zarr", workdir / "shards", person, size, tasks=("self_reenactment",))[0]
        self.batch = task_batch(self.frames)
        self.serial = self.frames.clips[0].keys[0].rsplit("cam_", 1)[1]
        self.real, self.zeroed = ground_truth_pair(workdir, person, self.batch["expression"].numpy(), self.serial,
                                                   self.batch["mask"].shape[-1])
        self.change = self.real - self.zeroed
        self.pixels = self.change.abs().amax(1, keepdim=True) > THRESHOLD
        self.face = self.batch["mask"] > 0.5

    def pixels_per_frame(self) -> float:
        return float(self.pixels.flatten(1).sum(1).float().mean())


def probe(name: str, run_dir: Path, base: Path, batch: dict, reference: torch.Tensor, face: torch.Tensor,
          expr_pixels: torch.Tensor, gt_change: torch.Tensor) -> dict:
    model = load_model(run_dir, base)
    flat = {**batch, "expression": batch["expression"].clone()}
    flat["expression"][:, list(EXPRESSION_ONLY)] = 0
    real = render(model, batch)
    zeroed = render(model, flat)
    return measure(name, real, zeroed, reference, face, expr_pixels, gt_change)


@torch.no_grad()
def vae_bound(base: Path, gt_real: torch.Tensor, gt_zeroed: torch.Tensor, face: torch.Tensor,
              expr_pixels: torch.Tensor, gt_change: torch.Tensor) -> dict:
    """The base VAE's round trip (posterior mean) of both ground truths: what any latent model on
    this base can carry of the expression-only effects."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(Path(base) / "vae").eval()
    real, zeroed = vae_round_trip(vae, gt_real), vae_round_trip(vae, gt_zeroed)
    return measure(f"VAE round trip of the ground truth (bound; {base})", real, zeroed, gt_real, face, expr_pixels,
                   gt_change)


def measure(name: str, real: torch.Tensor, zeroed: torch.Tensor, reference: torch.Tensor, face: torch.Tensor,
            expr_pixels: torch.Tensor, gt_change: torch.Tensor) -> dict:
    def masked_psnr(mask: torch.Tensor) -> float:
        m = mask.expand_as(real).float()
        mse = ((real - reference) ** 2 * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1)
        return float(psnr_from_mse(mse.clamp_min(1e-10)).mean())

    change = (real - zeroed) * expr_pixels
    target = gt_change * expr_pixels
    rest = face & ~expr_pixels
    return {"run": name, "face PSNR": masked_psnr(face), "expression-pixel PSNR": masked_psnr(expr_pixels),
            "response gain": float((change * target).sum() / (target * target).sum().clamp_min(1e-12)),
            "mean |change| on expression pixels": float(change.abs().sum() / expr_pixels.expand_as(change).sum()),
            "mean |change| elsewhere in the face": float(((real - zeroed).abs() * rest).sum()
                                                         / rest.expand_as(real).sum().clamp_min(1))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("data"))
    ap.add_argument("--base-model", type=Path, default=None, help="default: the main job's base in <workdir>")
    ap.add_argument("--person", default="000")
    ap.add_argument("--run", action="append", default=[], help="NAME=RUN_DIR (a run's <out>/<person> folder)")
    ap.add_argument("--vae", action="append", type=Path, default=[],
                    help="another base model folder whose VAE bound to report too (e.g. a candidate tiny base)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    base = a.base_model or main_job_base(a.workdir)
    held = HeldOutExpression(a.workdir, a.person, 64)
    batch, serial, face, expr_pixels = held.batch, held.serial, held.face, held.pixels
    gt_real, gt_zeroed, gt_change = held.real, held.zeroed, held.change
    reference = torch.from_numpy(np.concatenate([c.reference for c in held.frames.clips])).permute(0, 3, 1, 2).float()
    rows = [measure("ground truth with the expression-only dims zeroed (cap)", gt_zeroed, gt_zeroed, gt_real, face,
                    expr_pixels, gt_change),
            *(vae_bound(b, gt_real, gt_zeroed, face, expr_pixels, gt_change) for b in [base, *a.vae])]
    print(rows, flush=True)
    for spec in a.run:
        name, _, path = spec.partition("=")
        rows.append(probe(name, Path(path), base, batch, reference, face, expr_pixels, gt_change))
        print(rows[-1], flush=True)
    report("expression_probe", rows, {
        "person": a.person, "frames": len(reference), "camera": serial,
        "expression pixels per frame": held.pixels_per_frame(),
        "regenerated vs stored ground truth, mean |diff|": float((gt_real - reference).abs().mean())})


if __name__ == "__main__":
    main()
