"""The paper's Table 3 on the synthetic data: the full model and each ablation, trained with the
same budget on several persons and seeds, scored on the held-out sequences and camera.

    python benchmarks/bench_ablations.py --workdir data [--persons 000,001] [--seeds 0,1] \\
        [--steps N] [--parallel 2] [--variants full no_expression ...]

Needs the main job's data and tiny base (<workdir>/shards, zarr, base/tiny), or ``--ablation-data``:
first prepare <workdir> the way the main job's data stages and base do, from the synthetic
generator with its ablation-data options on (``ABLATION_DATA``: per-frame random hair strands that
no input determines, a skin pattern the TriPlanes hold and a spherical map cannot, ears folded over
the cheeks, and held-out sequences showing an expression that only other persons' training data
shows; README "Table 3 on data where every component matters"), and pretrain its tiny base with a
UNet prior of ``--base-unet-steps`` (6000; the main job's: 200), one that holds more than a person's
own training teaches, as SD2.1's does in the paper. Every run trains
the tiny preset (its steps and batch, or ``--steps``) with one switch of the model config
changed, then renders the person's held-out evaluation set (the held-out sequences from the
frontal camera and the training sequences from the held-out camera, 20 DDPM steps, fixed noise;
a single pass for "w/o diffusion") and scores it like the nightly evaluation: PSNR (the paper's
protocol), SSIM, LPIPS, JOD (FovVideoVDP) and, inside the rasterized face, PSNR, LPIPS and the
mean-colour error. Runs go ``--parallel`` at a time, one torch thread each, and are reused when
their spec is unchanged (``<out>/<variant>/s<seed>/<person>``).

Prints per variant the mean and standard deviation over persons x seeds, and the paired
difference to the full model (same person and seed), with its standard deviation; writes
benchmarks/results/ablations.json, including the full model's expression attention output-weight
norms over training. A growing norm is no evidence that the pathway learns: AdamW moves every weight
by ~lr per step whatever its gradient's signal, so the norm grows on noise alone; whether the renders
respond to the expression code is what `bench_expression_probe.py` measures.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import machine, report  # noqa: E402

from shards.synthetic import SyntheticConfig  # noqa: E402

if TYPE_CHECKING:
    from heldout import Variant

#: name -> (label in the table, model-config overrides)
VARIANTS: dict[str, tuple[str, dict]] = {
    "full": ("full model", {}),
    "no_expression": ("w/o expression conditioning", {"use_expression": False}),
    "no_features": ("w/o spatial features", {"features.mapping": "none"}),
    "spherical": ("spherical features, not TriPlanes", {"features.mapping": "spherical"}),
    "no_diffusion": ("w/o diffusion (single pass)", {"use_diffusion": False}),
    "no_ldm_prior": ("w/o LDM prior", {"use_ldm_prior": False}),
}
METRICS = ("psnr", "ssim", "lpips", "jod", "psnr_face", "lpips_face", "colour_error")
#: Metrics whose paired difference to the full model the summary gives.
PAIRED = ("psnr", "lpips", "jod", "psnr_face", "lpips_face")
#: +1: higher is better, -1: lower is better.
DIRECTION = {"psnr": 1, "ssim": 1, "lpips": -1, "jod": 1, "psnr_face": 1, "lpips_face": -1, "colour_error": -1}

#: The data set of ``--ablation-data``: the default synthetic set with every ablation-data option on
#: (novel expressions in the 2 sequences the ingest holds out by default).
ABLATION_DATA = SyntheticConfig(stochastic_hair=True, detail_wavelength=0.25, folded_ears=True, novel_expressions=2)
#: UNet steps of the tiny base that ``--ablation-data`` pretrains (the main job's: 200). The "w/o LDM prior" row
#: compares a frozen prior with a UNet trained from scratch on the person, so the prior must hold more than one
#: person's 600 steps teach: at 200 steps (v-loss 0.50) the from-scratch UNet won LPIPS on every pair, at 6000
#: (v-loss 0.31) the frozen prior wins it (README "Table 3 on data where every component matters").
ABLATION_BASE_UNET_STEPS = 6000

_EVALUATOR = None


def prepare_ablation_data(workdir: Path, workers: int = 1, unet_steps: int = ABLATION_BASE_UNET_STEPS) -> Path:
    """Synthetic captures of ``ABLATION_DATA``, zarr stores, shards and the tiny base pretrained on
    every person (its UNet for ``unet_steps``), under ``workdir``, by the main job's own stages (each
    skips what is up to date); returns the base."""
    from jobs.launch_all import LaunchAllArgs, _base_model, _data

    args = LaunchAllArgs(workdir=workdir, synthetic=ABLATION_DATA, workers=workers)
    _, failed = _data(args)
    if failed:
        raise RuntimeError(f"ablation data: persons failed: {failed}")
    return _base_model(args, ABLATION_DATA.person_ids, unet_steps=unet_steps)


def _evaluator():
    global _EVALUATOR
    if _EVALUATOR is None:
        from avatars.evaluation.lpips_weights import LpipsConfig
        from avatars.evaluation.metrics import EvalConfig, Evaluator

        _EVALUATOR = Evaluator(EvalConfig(metrics=METRICS, lpips=LpipsConfig(Path("weights/lpips_alex.safetensors"))))
    return _EVALUATOR


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def job_variant(job: dict) -> Variant:
    """The run's overrides: the ablation's model switches over ``--train``'s model fields, and
    ``--train``'s training options with ``--steps``."""
    from heldout import Variant

    train = {**job["train"], **({"steps": job["steps"]} if job["steps"] else {})}
    return Variant(job["variant"], train=train, model={**job["model"], **VARIANTS[job["variant"]][1]})


def run_one(job: dict) -> dict:
    """Train (or reuse) and evaluate one (variant, person, seed); returns its row."""
    import torch
    from heldout import (
        ExpressionNormLog,
        evaluate,
        heldout_tasks,
        load_model,
        mean_metrics,
        read_expression_norms,
        render,
        task_batch,
        train_variant,
    )

    workdir = Path(job["workdir"])
    base = Path(job["base_model"])
    name = job["variant"]
    variant = job_variant(job)
    run_dir, result = train_variant(variant, job["person"], job["seed"], workdir / "shards", base, Path(job["out"]),
                                    callbacks=(ExpressionNormLog(every=job["norm_every"]),))
    start = time.process_time()
    model = load_model(run_dir, base)
    per_task, by_task = [], {}
    for frames in heldout_tasks(workdir / "zarr", workdir / "shards", job["person"], model.config.resolution):
        pred = render(model, task_batch(frames), steps=20, seed=0)
        per_task.append(evaluate(_evaluator(), frames, pred))
        by_task[frames.task] = {m: per_task[-1].get(m) for m in METRICS}
        del pred
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    metrics = mean_metrics(per_task)
    return {"variant": name, "person": job["person"], "seed": job["seed"],
            **{m: metrics.get(m) for m in METRICS}, "tasks": by_task,
            "train CPU s": result.get("train_cpu_s"), "eval CPU s": time.process_time() - start,
            "expression_norms": [(r["step"], r["to_out_norm_mean"]) for r in read_expression_norms(run_dir)]}


def summarise(rows: list[dict], names: list[str]) -> list[dict]:
    """Per variant: mean and std over runs, and the paired difference to the full model."""
    full = {(r["person"], r["seed"]): r for r in rows if r["variant"] == "full"}
    out = []
    for name in names:
        mine = [r for r in rows if r["variant"] == name]
        if not mine:
            continue
        row = {"variant": VARIANTS[name][0], "runs": len(mine)}
        for m in METRICS:
            values = np.array([r[m] for r in mine if r[m] is not None], dtype=float)
            row[m] = f"{values.mean():.4g} ± {values.std(ddof=1) if len(values) > 1 else 0:.2g}"
        cpu = [r["train CPU s"] for r in mine if r.get("train CPU s")]
        row["train CPU s / run"] = f"{np.mean(cpu):.0f}" if cpu else "reused"
        if name != "full" and full:
            for m in PAIRED:
                d = np.array([r[m] - full[(r["person"], r["seed"])][m] for r in mine
                              if (r["person"], r["seed"]) in full and r[m] is not None], dtype=float)
                if len(d):
                    row[f"Δ{m} vs full"] = f"{d.mean():+.3g} ± {d.std(ddof=1) if len(d) > 1 else 0:.2g}"
                    worse = DIRECTION[m] * d.mean() < 0 and abs(d.mean()) > 2 * d.std(ddof=1) / np.sqrt(len(d)) \
                        if len(d) > 1 else False
                    row[f"{m} worse"] = "yes" if worse else "no"
        out.append(row)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("data"))
    ap.add_argument("--base-model", type=Path, default=None, help="default: the main job's base in <workdir>")
    ap.add_argument("--persons", default="000,001")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the tiny preset's)")
    ap.add_argument("--train", default="", help="overrides for every run, 'key=value,...': training options "
                    "(e.g. lr_networks=3e-3,lr_features=0.1) and model-config fields (e.g. features.resolution=64); "
                    "default: the tiny preset's values")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--parallel", type=int, default=2, help="runs at a time (one torch thread each)")
    ap.add_argument("--norm-every", type=int, default=50, help="steps between expression-norm records")
    ap.add_argument("--out", type=Path, default=Path("data/bench-ablations"))
    ap.add_argument("--ablation-data", action="store_true",
                    help="first prepare --workdir from the generator's ablation-data options (ABLATION_DATA) and "
                         "pretrain its base (one process at a time: --parallel)")
    ap.add_argument("--base-unet-steps", type=int, default=None,
                    help=f"with --ablation-data: UNet steps of the base it pretrains (default "
                         f"{ABLATION_BASE_UNET_STEPS}; the main job's base: 200)")
    a = ap.parse_args(argv)
    if a.base_unet_steps is not None and not a.ablation_data:
        ap.error("--base-unet-steps sets the base that --ablation-data pretrains; without it the base is "
                 "--base-model or the main job's")
    if a.base_unet_steps is not None and a.base_unet_steps <= 0:
        ap.error(f"--base-unet-steps must be positive, got {a.base_unet_steps}")
    return a


def main() -> None:
    a = parse_args()
    # imported once the options are checked: heldout imports diffusers (~10 s), a refusal or --help needs none
    from heldout import Variant, main_job_base

    persons = [p for p in a.persons.split(",") if p]
    seeds = [int(s) for s in a.seeds.split(",") if s]
    if a.ablation_data:
        prepared = prepare_ablation_data(a.workdir, workers=a.parallel,
                                         unet_steps=a.base_unet_steps or ABLATION_BASE_UNET_STEPS)
        base = a.base_model or prepared
    else:
        base = a.base_model or main_job_base(a.workdir)
    overrides = Variant.parse(a.train) if a.train else Variant("")
    # seed-major: every variant of the first seed is done before the second seed starts, so a run cut
    # short still holds whole (person, seed) comparisons
    jobs = [{"workdir": str(a.workdir), "base_model": str(base), "variant": v, "person": p, "seed": s, "steps": a.steps,
             "out": str(a.out / p), "norm_every": a.norm_every,
             "train": overrides.train, "model": overrides.model}
            for s in seeds for v in a.variants for p in persons]
    wall = time.time()
    cpu = time.process_time()
    with ProcessPoolExecutor(a.parallel, mp_context=get_context("spawn"), initializer=_init_worker) as pool:
        rows = []
        for row in pool.map(run_one, jobs):
            print(f"{row['variant']:>14} {row['person']} s{row['seed']}: psnr {row['psnr']:.2f} "
                  f"face {row['psnr_face']:.2f} lpips_face {row['lpips_face']:.3f} jod {row['jod']:.2f} "
                  f"(train {row['train CPU s'] or 0:.0f} s CPU)", flush=True)
            rows.append(row)
    wall = time.time() - wall
    summary = summarise(rows, a.variants)
    norms = {}
    for r in rows:
        if r["variant"] == "full":
            for step, value in r["expression_norms"]:
                norms.setdefault(step, []).append(value)
    norm_curve = [{"step": s, "to_out norm (mean over layers, runs)": float(np.mean(v))}
                  for s, v in sorted(norms.items())]
    train_cpu = sum(r["train CPU s"] or 0 for r in rows)
    eval_cpu = sum(r["eval CPU s"] or 0 for r in rows)
    report("ablations", summary, {
        "persons": persons, "seeds": seeds, "steps": a.steps, "overrides": {**overrides.train, **overrides.model},
        "runs": rows,
        "expression_norm_curve": norm_curve,
        "wall_s": wall, "train_cpu_s": train_cpu, "eval_cpu_s": eval_cpu, "driver_cpu_s": time.process_time() - cpu,
        "loadavg_1m_at_end": os.getloadavg()[0], "machine": machine(), "date": time.strftime("%Y-%m-%d")})
    print("\nexpression attention output-weight norm (full model, mean over layers and runs):")
    for r in norm_curve:
        print(f"  step {r['step']:>5}: {r['to_out norm (mean over layers, runs)']:.4f}")
    print(f"\n{len(rows)} runs in {wall / 60:.1f} min wall; CPU: training {train_cpu / 60:.1f} min, "
          f"evaluation {eval_cpu / 60:.1f} min (1-min load average at the end {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
