"""The main job's evaluation stage alone, on a finished work directory: what it costs.

    python benchmarks/bench_eval_stage.py --source /tmp/fr_final [--scratch /tmp/bench-eval] [-- LAUNCH_ALL ARGS]

Runs exactly what ``jobs/launch_all.py`` runs as its stage 4 (``launch_all._evaluate``, its
default evaluation settings and ``--force``: every person rendered and scored again) for every
trained person of ``--source`` (a work directory a first run finished, e.g. the one
``bench_first_run.py`` leaves). ``--source`` is only read: ``--scratch`` gets links to its
``runs``, ``shards`` and ``zarr`` and a fresh ``reports`` folder of its own. Reports the wall
and CPU seconds of the stage for this process and every process it starts (embedded Ray, Serve
replicas; common/cpu_clock.py), the cores it kept busy and the load average; writes
benchmarks/results/eval_stage<tag>.json. ``--on-running-ray`` starts the embedded Ray first, as the
main job's training does (the stage then renders on it, as in a first run); without it the stage
starts its own, as a re-run whose training was up to date does. Run another commit's evaluation
with ``PYTHONPATH=<its tree>`` from that tree (``git archive``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import report  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, required=True, help="finished work directory (read only)")
    ap.add_argument("--scratch", type=Path, default=Path("data/bench-eval-stage"))
    ap.add_argument("--tag", default="", help="suffix of the output file")
    ap.add_argument("--on-running-ray", action="store_true",
                    help="start the embedded Ray before the stage, as the main job's training does since it keeps "
                         "one Ray for both (its start is then not part of the stage)")
    ap.add_argument("extra", nargs="*", help="more launch_all arguments (after --)")
    return ap.parse_args(argv)


def main() -> None:
    a = parse_args()

    import tyro

    from common.cpu_clock import ProcessTreeClock
    from jobs import launch_all

    source = a.source.resolve()
    persons = sorted(p.name for p in (source / "runs").iterdir() if (p / "model" / "config.json").is_file())
    if not persons:
        raise SystemExit(f"{source / 'runs'}: no trained person")
    if a.scratch.exists():
        shutil.rmtree(a.scratch)
    a.scratch.mkdir(parents=True)
    for name in ("runs", "shards", "zarr"):
        (a.scratch / name).symlink_to(source / name)
    args = tyro.cli(launch_all.LaunchAllArgs, args=["--workdir", str(a.scratch), "--force", *a.extra])
    if a.on_running_ray:
        from cluster.ray_connect import EmbeddedRay, connect_ray

        connect_ray(None, EmbeddedRay(), log_to_driver=False)
    load_start = os.getloadavg()[0]
    clock = ProcessTreeClock()
    with clock.stage("evaluation"):
        summary = launch_all._evaluate(args, persons)
    clock.close()
    if a.on_running_ray:
        from cluster.serve.deployment import shutdown_serve_and_ray

        shutdown_serve_and_ray()
    row = clock.rows()[0]
    rows = [{"stage": "evaluation", "persons": len(persons), "frames": summary.frames_rendered,
             "wall s": row["wall_s"], "CPU s": row["cpu_s"], "cores busy": row["cpu_s"] / max(row["wall_s"], 1e-9),
             "failed": len(summary.failed)}]
    results = json.loads(summary.results_path.read_text())
    report(f"eval_stage{a.tag}", rows, {
        "source": str(source), "on_running_ray": a.on_running_ray, "extra": a.extra, "cpus": os.cpu_count(),
        "loadavg_1m_start": load_start,
        "loadavg_1m_end": os.getloadavg()[0], "failed": summary.failed, "results": str(summary.results_path),
        "meta": results.get("meta", {})})
    if summary.failed:
        raise SystemExit(f"failed persons: {summary.failed}")


if __name__ == "__main__":
    main()
