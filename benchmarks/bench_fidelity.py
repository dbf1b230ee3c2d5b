"""Where is a person's detail lost? Renders of one person's held-out evaluation set through each
stage of the tiny avatar, scored like the nightly evaluation, with a picture of every row.

    python benchmarks/bench_fidelity.py --person 000 --workdir data \\
        [--samplers ddpm:20 ddpm:1 ddpm:50 ddim:20] [--variants 'lr3x:lr_networks=3e-3' 'long:steps=2400'] \\
        [--run data/runs/000]

Rows (each scored on the held-out sequences from the frontal camera and the training
sequences from the held-out camera, PSNR / SSIM / LPIPS and the face metrics):

* ``vae reconstruction``: decode(encode(ground truth)) with the frozen base VAE, the upper bound
  of anything rendered through it;
* ``prior sample``: the untrained model (zero-output ControlNet and expression layers: the
  frozen base UNet alone), i.e. what the base's prior draws without conditioning;
* ``<run> <sampler>:<steps>``: a trained avatar (``--run``, default the main job's
  ``<workdir>/runs/<person>``) with each sampler setting; ``ddpm:1`` is the network's one-shot
  estimate of the clean image from pure noise (the conditional mean);
* each ``--variants`` entry: trained here with the tiny preset and the overrides (see
  benchmarks/heldout.py), rendered with the first sampler setting;
* ``<run> <sampler>:<steps> scale S`` for each ``--scales`` S: the trained avatar (``--run``) rendered with
  the first sampler setting and its ControlNet's residuals scaled by S (the config's ``conditioning_scale``;
  the rows above use the one it was saved with). The weights are the same, so only the rendering differs.

``--train-frames N`` also scores every trained model on N of the person's own *training* frames
(uncropped), face PSNR only: its render (first sampler setting) and its clean-image estimate from
pure noise (t = 999: what the conditioning alone gives). Held-out and training frames alike blurred
says the network does not fit (capacity, conditioning), not that it over-fits.

Writes benchmarks/results/fidelity.json and fidelity_<person>.png (+ .txt naming the rows).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import RESULTS, report  # noqa: E402
from heldout import (  # noqa: E402
    Variant,
    clean_estimate,
    conditioning_scale,
    evaluate,
    face_psnr,
    ground_truth,
    heldout_tasks,
    load_model,
    main_job_base,
    mean_metrics,
    render,
    save_rows,
    task_batch,
    train_variant,
    training_frames,
)

from avatars.evaluation.lpips_weights import LpipsConfig  # noqa: E402
from avatars.evaluation.metrics import EvalConfig, Evaluator  # noqa: E402
from avatars.models import DiffusionAvatarsModel  # noqa: E402

METRICS = ("psnr", "ssim", "lpips", "psnr_face", "lpips_face", "colour_error")


@torch.no_grad()
def vae_reconstruction(model: DiffusionAvatarsModel, gt: torch.Tensor) -> torch.Tensor:
    latents = model.vae.encode(gt * 2 - 1).latent_dist.mode() * model.vae.config.scaling_factor
    return model.decode_latents(latents)


def score(evaluator: Evaluator, tasks, pred: torch.Tensor) -> dict[str, float]:
    out, start = [], 0
    for frames in tasks:
        out.append(evaluate(evaluator, frames, pred[start:start + frames.frames]))
        start += frames.frames
    return mean_metrics(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("data"), help="the main job's work directory")
    ap.add_argument("--person", default="000")
    ap.add_argument("--run", type=Path, default=None, help="trained run dir (default <workdir>/runs/<person>)")
    ap.add_argument("--base-model", type=Path, default=None, help="default: the main job's base in <workdir>")
    ap.add_argument("--samplers", nargs="*", default=["ddpm:20", "ddpm:1", "ddpm:50", "ddim:20"])
    ap.add_argument("--variants", nargs="*", default=[], help="'name:key=value,...' trained here")
    ap.add_argument("--out", type=Path, default=Path("data/bench-fidelity"), help="where variants train")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="", help="suffix of the output files")
    ap.add_argument("--scales", type=float, nargs="*", default=[],
                    help="also render --run at each of these conditioning scales (first sampler setting)")
    ap.add_argument("--train-frames", type=int, default=0,
                    help="also score each model on this many of its training frames (face PSNR)")
    return ap.parse_args(argv)


def main() -> None:
    a = parse_args()
    torch.set_num_threads(1)
    base = a.base_model or main_job_base(a.workdir)
    run = a.run if a.run is not None else a.workdir / "runs" / a.person
    shards, stores = a.workdir / "shards", a.workdir / "zarr"
    weights = Path("weights/lpips_alex.safetensors")
    evaluator = Evaluator(EvalConfig(metrics=METRICS, lpips=LpipsConfig(weights_path=weights)))

    rows, pictures = [], []
    trained = load_model(run, base) if (run / "model").is_dir() else None
    if a.scales and trained is None:
        raise SystemExit(f"--scales renders a trained run, and there is none at {run}")
    reference = trained if trained is not None else None
    tasks = None

    def add(label: str, pred: torch.Tensor, cpu: float, extra: dict | None = None) -> None:
        rows.append({"row": label, **score(evaluator, tasks, pred), "render CPU s": cpu, **(extra or {})})
        pictures.append((label, pred))

    variants = [Variant.parse(v) for v in a.variants]
    models: list[tuple[str, DiffusionAvatarsModel, dict]] = []
    if trained is not None:
        models.append((f"{run.name} (given run)", trained, {}))
    for v in variants:
        run_dir, result = train_variant(v, a.person, a.seed, shards, base, a.out / a.person)
        models.append((v.name, load_model(run_dir, base), {"train CPU s": result.get("train_cpu_s")}))
    if not models:
        raise SystemExit(f"no trained run at {run} and no --variants")
    reference = models[0][1]
    tasks = heldout_tasks(stores, shards, a.person, reference.config.resolution)
    gt = torch.cat([ground_truth(t) for t in tasks])
    batch = {k: torch.cat([task_batch(t)[k] for t in tasks]) for k in task_batch(tasks[0])}
    pictures.append(("ground truth", gt))

    t = time.process_time()
    add("vae reconstruction (upper bound)", vae_reconstruction(reference, gt), time.process_time() - t)
    prior = DiffusionAvatarsModel(reference.config, base_model=base).eval()
    t = time.process_time()
    add("prior sample (untrained: base UNet alone)", render(prior, batch, 20, "ddpm", a.seed), time.process_time() - t)
    for i, (name, model, extra) in enumerate(models):
        settings = a.samplers if i == 0 else a.samplers[:1]
        for setting in settings:
            t = time.process_time()
            pred = render(model, batch, *sampler_setting(setting), seed=a.seed)
            add(f"{name} {setting}", pred, time.process_time() - t, extra)
    for scale in a.scales:
        t = time.process_time()
        with conditioning_scale(trained, scale):
            pred = render(trained, batch, *sampler_setting(a.samplers[0]), seed=a.seed)
        add(f"{models[0][0]} {a.samplers[0]} scale {scale:g}", pred, time.process_time() - t)
    save_rows(RESULTS / f"fidelity_{a.person}{a.tag}.png", pictures)
    train_rows = training_frame_rows(models, shards, a.person, a.train_frames, a.samplers[0], a.seed)
    report(f"fidelity{a.tag}", rows, {"person": a.person, "run": str(run), "base_model": str(base),
                                      "frames": int(gt.shape[0]), "variants": a.variants,
                                      "training frames": train_rows})


def sampler_setting(setting: str) -> tuple[int, str]:
    """'ddpm:20' -> (20, 'ddpm'): ``render``'s steps and sampler (steps default to 20)."""
    sampler, _, steps = setting.partition(":")
    return int(steps or 20), sampler


def training_frame_rows(models, shards: Path, person: str, count: int, setting: str, seed: int) -> list[dict]:
    """Face PSNR of each model's render and clean-image estimate (t = 999) on ``count`` training frames."""
    if count <= 0:
        return []
    batch = training_frames(shards, person, count, models[0][1].config.resolution)
    gt, mask = (batch["image"] + 1) / 2, batch["mask"]
    cond = {k: v for k, v in batch.items() if k != "image"}
    steps, sampler = sampler_setting(setting)
    rows = []
    for name, model, _ in models:
        rows.append({"model": name, "frames": int(gt.shape[0]),
                     f"face PSNR, {setting}": face_psnr(render(model, cond, steps, sampler, seed), gt, mask),
                     "face PSNR, clean estimate t=999": face_psnr(clean_estimate(model, batch, 999, seed), gt, mask)})
        print(f"training frames: {rows[-1]}", flush=True)
    return rows


if __name__ == "__main__":
    main()
