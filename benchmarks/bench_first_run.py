"""The main job's first run, as a new user starts it: where its time goes and what it delivers.

    python benchmarks/bench_first_run.py [--workdir data/bench-first-run] [-- EXTRA LAUNCH_ALL ARGS]

Runs ``jobs/launch_all.py --persons all`` into a fresh work directory (removed first) and reads
back what it wrote: the wall and CPU seconds of every stage (``runs/stages.json``; CPU counts the
whole process tree, Ray workers and data-preparation pools included, see common/cpu_clock.py),
how many cores each stage kept busy (CPU / wall), the nightly results (mean over persons and
tasks of the headline metrics) and, for person 000,
the held-out PSNR of the untrained model (frozen base, zero-output ControlNet) on the same
frames, so the trained vs untrained gap is measured in the same run.

On a shared machine wall time depends on the neighbours: the CPU seconds, the 1-minute load
average at the start and end and the number of CPUs are reported with it. Writes
benchmarks/results/first_run.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import report  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HEADLINE = ("psnr", "ssim", "lpips", "psnr_face", "lpips_face", "colour_error")


def result_means(results_json: Path) -> dict[str, float]:
    """Mean over persons and tasks of each headline metric in a results.json."""
    data = json.loads(results_json.read_text())
    values: dict[str, list[float]] = {}
    for tasks in data["persons"].values():
        for task in tasks.values():
            for name, metric in (task.get("metrics") or {}).items():
                mean = metric.get("mean") if isinstance(metric, dict) else metric
                if name in HEADLINE and mean is not None:
                    values.setdefault(name, []).append(float(mean))
    return {n: float(np.mean(v)) for n, v in values.items()}


def untrained_gap(workdir: Path, person: str, steps: int) -> dict[str, float]:
    """Held-out PSNR of person's trained avatar and of the untrained model, same frames and noise."""
    import torch
    from heldout import evaluate, heldout_tasks, load_model, mean_metrics, render, task_batch

    from avatars.evaluation.lpips_weights import LpipsConfig
    from avatars.evaluation.metrics import EvalConfig, Evaluator
    from avatars.models import DiffusionAvatarsModel

    torch.set_num_threads(1)
    base = Path(json.loads((workdir / "runs" / person / "base.json").read_text())["path"])  # what it trained on
    trained = load_model(workdir / "runs" / person, base)
    untrained = DiffusionAvatarsModel(trained.config, base_model=base).eval()
    evaluator = Evaluator(EvalConfig(metrics=("psnr",), lpips=LpipsConfig(Path("weights/lpips_alex.safetensors"))))
    out = {}
    for name, model in (("trained", trained), ("untrained", untrained)):
        per_task = []
        for frames in heldout_tasks(workdir / "zarr", workdir / "shards", person, trained.config.resolution):
            per_task.append(evaluate(evaluator, frames, render(model, task_batch(frames), steps=steps)))
        out[name] = mean_metrics(per_task)["psnr"]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("data/bench-first-run"))
    ap.add_argument("--keep", action="store_true", help="do not remove the work directory first (not a first run)")
    ap.add_argument("--gap-person", default="000")
    ap.add_argument("--tag", default="", help="suffix of the output file")
    ap.add_argument("extra", nargs="*", help="more launch_all arguments (after --)")
    return ap.parse_args(argv)


def main() -> None:
    a = parse_args()
    if a.workdir.exists() and not a.keep:
        shutil.rmtree(a.workdir)
    load_start = os.getloadavg()[0]
    cmd = [sys.executable, str(REPO / "jobs" / "launch_all.py"), "--persons", "all", "--workdir", str(a.workdir),
           *a.extra]
    wall = time.time()
    proc = subprocess.run(cmd, cwd=REPO)
    wall = time.time() - wall
    if proc.returncode != 0:
        raise SystemExit(f"launch_all exited {proc.returncode}")
    stages = json.loads((a.workdir / "runs" / "stages.json").read_text())
    results = sorted((a.workdir / "reports" / "runs").glob("*/results.json"))
    means = result_means(results[-1]) if results else {}
    gap = untrained_gap(a.workdir, a.gap_person, 20)
    # cores busy = CPU s / wall s: how well a stage keeps the machine's cores working
    rows = [{"stage": r["stage"], "wall s": r["wall_s"], "CPU s": r["cpu_s"],
             "cores busy": r["cpu_s"] / max(r["wall_s"], 1e-9)} for r in stages["stages"]]
    report(f"first_run{a.tag}", rows, {
        "command": " ".join(cmd[1:]), "wall_s_command": wall, "cpus": os.cpu_count(),
        "loadavg_1m_start": load_start, "loadavg_1m_end": os.getloadavg()[0], "report_means": means,
        f"heldout_psnr_{a.gap_person}": gap, "trained_minus_untrained_db": gap["trained"] - gap["untrained"]})
    print(f"\ncommand wall {wall / 60:.1f} min; report means: " +
          ", ".join(f"{k} {v:.3f}" for k, v in means.items()))
    print(f"person {a.gap_person} held-out PSNR: trained {gap['trained']:.2f}, untrained {gap['untrained']:.2f} "
          f"(gap {gap['trained'] - gap['untrained']:.2f} dB); load average {load_start:.1f} -> "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
