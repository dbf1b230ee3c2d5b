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
The gain is also reported per effect (:data:`EFFECTS`: the mouth-interior colour, the gaze), each
with only its own dims zeroed and its own expression pixels.
The same is reported for the base VAE's round trip of the ground truth (and of other bases' with
``--vae``): a latent model cannot show more of the effect than its VAE carries.
``--figure PATH`` draws, for the first run, ground truth | render of held-out frames with the gaze set
left / right and the mouth-interior colour dim set low / high (the rest of the code and the mesh as recorded).
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

from shards.synthetic.head import GAZE_X, GAZE_Y, TONGUE  # noqa: E402

#: The expression-only effects measured one at a time: name -> the code dims that drive it.
EFFECTS = {"mouth interior": (TONGUE,), "gaze": (GAZE_X, GAZE_Y)}
#: The figure's columns: label -> code dims set (everything else as recorded).
FIGURE_EDITS = {"gaze left": {GAZE_X: -1.0, GAZE_Y: 0.0}, "gaze right": {GAZE_X: 1.0, GAZE_Y: 0.0},
                "mouth interior low": {TONGUE: -1.5}, "mouth interior high": {TONGUE: 1.5}}


def on_white(rgb: np.ndarray, alpha: np.ndarray, size: int) -> torch.Tensor:
    """The generator's image composited on white like the evaluation's reference frames, resized."""
    a = alpha[..., None].astype(np.float32) / 255
    return resize((rgb * a + 255 * (1 - a)).round().astype(np.uint8), size)


def ground_truth_pair(workdir: Path, person: str, codes: np.ndarray, serial: str, size: int,
                      dims: tuple[int, ...] = EXPRESSION_ONLY):
    """(real, zeroed) ground truth (T, 3, size, size) of the true mesh under `codes`, from `serial`; `zeroed` with
    the code's `dims` set to 0 (appearance only: the mesh stays the real code's)."""
    flat = codes.copy()
    flat[:, list(dims)] = 0
    real, zeroed = generator_images(workdir, person, codes, [codes, flat], serial, size)
    return real, zeroed


def generator_images(workdir: Path, person: str, mesh_codes: np.ndarray, codes: list[np.ndarray], serial: str,
                     size: int) -> list[torch.Tensor]:
    """Per entry of `codes`: the generator's images (T, 3, size, size) of the true mesh under `mesh_codes` with the
    appearance of that entry's codes, from `serial`."""
    from shards.synthetic.generate import PersonModel

    synth = synthetic_config(open_store(workdir / "zarr", person))
    if synth is None:
        raise SystemExit(f"{person} is not a synthetic capture: the probe needs its generator")
    model = PersonModel.build(synth, person)
    camera, index = model.cameras[serial], synth.serials.index(serial)
    out = [[] for _ in codes]
    for t, expr in enumerate(mesh_codes):
        vertices = model.true_vertices(expr)
        for images, c in zip(out, codes):
            images.append(on_white(*model.render(vertices, c[t], camera, index), size))
    return [torch.stack(images) for images in out]


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
        self.workdir, self.person = workdir, person
        #: per effect of :data:`EFFECTS`: (ground truth with only its dims zeroed, its change, its pixels)
        self.effects = {}

    def effect(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if name not in self.effects:
            _, zeroed = ground_truth_pair(self.workdir, self.person, self.batch["expression"].numpy(), self.serial,
                                          self.batch["mask"].shape[-1], EFFECTS[name])
            change = self.real - zeroed
            self.effects[name] = (zeroed, change, change.abs().amax(1, keepdim=True) > THRESHOLD)
        return self.effects[name]

    def pixels_per_frame(self) -> float:
        return float(self.pixels.flatten(1).sum(1).float().mean())


def with_code(batch: dict, dims: tuple[int, ...], value: float = 0.0) -> dict:
    """`batch` with the expression code's `dims` set to `value`."""
    code = batch["expression"].clone()
    code[:, list(dims)] = value
    return {**batch, "expression": code}


def probe(name: str, run_dir: Path, base: Path, held: HeldOutExpression, reference: torch.Tensor) -> dict:
    """One run's row: face and expression-pixel PSNR, the response gain on all expression-only dims and on each
    effect of :data:`EFFECTS` alone."""
    model = load_model(run_dir, base)
    real = render(model, held.batch)
    row = measure(name, real, render(model, with_code(held.batch, EXPRESSION_ONLY)), reference, held.face,
                  held.pixels, held.change)
    for effect, dims in EFFECTS.items():
        _, change, pixels = held.effect(effect)
        zeroed = render(model, with_code(held.batch, dims))
        row[f"response gain: {effect}"] = response_gain(real - zeroed, change, pixels)
    return row


def response_gain(change: torch.Tensor, gt_change: torch.Tensor, pixels: torch.Tensor) -> float:
    """Least-squares gain of `change` on `gt_change` over `pixels` (1: the whole ground-truth change)."""
    target = gt_change * pixels
    return float((change * pixels * target).sum() / (target * target).sum().clamp_min(1e-12))


@torch.no_grad()
def vae_bound(base: Path, held: HeldOutExpression) -> dict:
    """The base VAE's round trip (posterior mean) of both ground truths: what any latent model on
    this base can carry of the expression-only effects (all of them, and each of :data:`EFFECTS`)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(Path(base) / "vae").eval()
    real = vae_round_trip(vae, held.real)
    row = measure(f"VAE round trip of the ground truth (bound; {base})", real, vae_round_trip(vae, held.zeroed),
                  held.real, held.face, held.pixels, held.change)
    for effect in EFFECTS:
        zeroed, change, pixels = held.effect(effect)
        row[f"response gain: {effect}"] = response_gain(real - vae_round_trip(vae, zeroed), change, pixels)
    return row


def measure(name: str, real: torch.Tensor, zeroed: torch.Tensor, reference: torch.Tensor, face: torch.Tensor,
            expr_pixels: torch.Tensor, gt_change: torch.Tensor) -> dict:
    def masked_psnr(mask: torch.Tensor) -> float:
        m = mask.expand_as(real).float()
        mse = ((real - reference) ** 2 * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1)
        return float(psnr_from_mse(mse.clamp_min(1e-10)).mean())

    change = (real - zeroed) * expr_pixels
    rest = face & ~expr_pixels
    return {"run": name, "face PSNR": masked_psnr(face), "expression-pixel PSNR": masked_psnr(expr_pixels),
            "response gain": response_gain(real - zeroed, gt_change, expr_pixels),
            "mean |change| on expression pixels": float(change.abs().sum() / expr_pixels.expand_as(change).sum()),
            "mean |change| elsewhere in the face": float(((real - zeroed).abs() * rest).sum()
                                                         / rest.expand_as(real).sum().clamp_min(1))}


@torch.no_grad()
def draw_figure(path: Path, run_dir: Path, base: Path, held: HeldOutExpression, frames: int = 3) -> None:
    """Ground truth | render of `frames` held-out frames (the ones with the mouth open widest) with each edit of
    :data:`FIGURE_EDITS` applied to the recorded code; one block of rows per frame."""
    from heldout import save_rows

    codes = held.batch["expression"]
    pick = sorted(codes[:, 0].argsort(descending=True)[:frames].tolist())  # dim 0: jaw opening
    batch = {k: v[pick] for k, v in held.batch.items()}
    model = load_model(run_dir, base)
    edited = []
    for edit in FIGURE_EDITS.values():
        code = batch["expression"].clone()
        for dim, value in edit.items():
            code[:, dim] = value
        edited.append(code)
    truths = generator_images(held.workdir, held.person, batch["expression"].numpy(), [c.numpy() for c in edited],
                              held.serial, batch["mask"].shape[-1])
    renders = [render(model, {**batch, "expression": c}) for c in edited]
    rows = []
    for i in range(len(pick)):
        rows.append((f"frame {pick[i]}: ground truth ({', '.join(FIGURE_EDITS)})", torch.stack([t[i] for t in truths])))
        rows.append((f"frame {pick[i]}: render of {run_dir}", torch.stack([r[i] for r in renders])))
    save_rows(path, rows, columns=len(FIGURE_EDITS), scale=4)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("data"))
    ap.add_argument("--base-model", type=Path, default=None, help="default: the main job's base in <workdir>")
    ap.add_argument("--person", default="000")
    ap.add_argument("--run", action="append", default=[], help="NAME=RUN_DIR (a run's <out>/<person> folder)")
    ap.add_argument("--vae", action="append", type=Path, default=[],
                    help="another base model folder whose VAE bound to report too (e.g. a candidate tiny base)")
    ap.add_argument("--figure", type=Path, default=None,
                    help="PNG of ground truth | render under edited gaze and mouth-interior codes (first --run)")
    return ap.parse_args(argv)


def main() -> None:
    a = parse_args()
    torch.set_num_threads(1)
    base = a.base_model or main_job_base(a.workdir)
    held = HeldOutExpression(a.workdir, a.person, 64)
    reference = torch.from_numpy(np.concatenate([c.reference for c in held.frames.clips])).permute(0, 3, 1, 2).float()
    cap = measure("ground truth with the expression-only dims zeroed (cap)", held.zeroed, held.zeroed, held.real,
                  held.face, held.pixels, held.change)
    rows = [cap, *(vae_bound(b, held) for b in [base, *a.vae])]
    print(rows, flush=True)
    for spec in a.run:
        name, _, path = spec.partition("=")
        rows.append(probe(name, Path(path), base, held, reference))
        print(rows[-1], flush=True)
    if a.figure is not None:
        if not a.run:
            raise SystemExit("--figure needs a --run")
        draw_figure(a.figure, Path(a.run[0].partition("=")[2]), base, held)
    report("expression_probe", rows, {
        "person": a.person, "frames": len(reference), "camera": held.serial,
        "expression pixels per frame": held.pixels_per_frame(),
        **{f"{effect} pixels per frame": float(held.effect(effect)[2].flatten(1).sum(1).float().mean())
           for effect in EFFECTS},
        "regenerated vs stored ground truth, mean |diff|": float((held.real - reference).abs().mean())})


if __name__ == "__main__":
    main()
