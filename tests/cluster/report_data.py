"""Builds nightly runs with real metric numbers computed on small synthetic renders."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from avatars.evaluation.metrics import EvalConfig, Evaluator
from avatars.evaluation.video import write_comparison_video
from cluster.report.schema import RunResults, TaskResult, run_dir

DATES = ("2025-01-29", "2025-01-30", "2025-01-31")
PERSONS = ("p017", "p042")
TASKS = ("novel_view", "self_reenactment")


def synthetic(noise: int, seed: int, t: int = 3, h: int = 32, w: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / h
    gt = np.stack([np.stack([np.sin(7 * xx + k), np.cos(4 * yy), xx], -1) for k in range(t)])
    gt = ((gt - gt.min()) / (gt.max() - gt.min()) * 255).astype(np.uint8)
    pred = np.clip(gt.astype(int) + rng.integers(-noise, noise + 1, gt.shape), 0, 255).astype(np.uint8)
    mask = np.repeat((((yy - 0.5) ** 2 + (xx - 0.5) ** 2) < 0.12)[None], t, 0).astype(np.float32)
    return gt, pred, mask


def make_runs(root: Path, with_video: bool = True) -> list[RunResults]:
    """Three nightly runs whose noise shrinks over time (so PSNR improves), two persons, two tasks."""
    ev = Evaluator(EvalConfig(metrics=("psnr", "ssim", "akd")))
    runs = []
    for night, date in enumerate(DATES):
        persons: dict[str, dict[str, TaskResult]] = {}
        for pi, person in enumerate(PERSONS):
            persons[person] = {}
            for ti, task in enumerate(TASKS):
                gt, pred, mask = synthetic(noise=40 - 12 * night + 4 * pi, seed=night * 10 + pi * 3 + ti)
                video = None
                if with_video and night == len(DATES) - 1 and task == "self_reenactment":
                    video = f"videos/{person}/{task}.mp4"
                    write_comparison_video(run_dir(root, date) / video, [gt, pred], fps=10)
                persons[person][task] = TaskResult.from_evaluation(ev.evaluate_video(gt, pred, mask), video=video)
        run = RunResults(run_date=date, persons=persons, meta={"checkpoint": f"step-{1000 * (night + 1)}"})
        run.save(root)
        runs.append(run)
    return runs
