"""Launch overhead and parallel speed-up of the orchestration backends on this machine.

1. Launch overhead: time from starting the launch command (a fresh Python process that
   imports the backend, starts an embedded Ray and submits 8 persons) until all 8 persons'
   status files say ``running`` (their ``started_at``), with 0.25 CPU per person so that all
   8 fit at once.
2. Speed-up: N persons of a CPU-bound workload (SHA-256 hash chain, tests/cluster/workloads.py)
   run sequentially by the local backend vs in parallel by the Ray backend (1 CPU each).

Prints a table and writes benchmarks/results/launch.json.
    python benchmarks/bench_launch.py [--persons 8] [--speedup-persons 4] [--hash-rounds 1500000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKLOADS = REPO / "tests" / "cluster"
sys.path.insert(0, str(WORKLOADS))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(WORKLOADS), os.environ.get("PYTHONPATH")]))

from bench_common import machine  # noqa: E402
from workloads import write_input  # noqa: E402

from cluster.local_backend import LocalConfig  # noqa: E402
from cluster.orchestrate import run_all  # noqa: E402
from cluster.person_job import PersonJob, Resources  # noqa: E402
from cluster.ray_backend import RayConfig  # noqa: E402
from cluster.status import read_status  # noqa: E402
from common.io import atomic_write_json  # noqa: E402

LAUNCH_CHILD = r"""
import sys, time, json
sys.path.insert(0, {workloads!r})
from cluster.person_job import PersonJob, Resources
from cluster.ray_backend import RayBackend, RayConfig
import ray
t_import = time.time()
jobs = [PersonJob(f"p{{i:02d}}", "workloads:count_steps",
                  dict(data_dir={data!r}, work_dir={work!r}, steps={steps}, step_seconds=0.25),
                  Resources(cpus=0.25), max_retries=0) for i in range({n})]
res = RayBackend(RayConfig(status_dir={status!r}, num_cpus=2, num_gpus=0, object_store_memory_mb=100,
                           node_ip_address="127.0.0.1")).run_all(jobs)
print(json.dumps({{"t_imported": t_import, "ok": sum(r.ok for r in res)}}))
"""


def bench_launch(n: int, tmp: Path) -> dict:
    data, work, status = tmp / "data", tmp / "work", tmp / "status"
    for i in range(n):
        write_input(data, f"p{i:02d}")
    code = LAUNCH_CHILD.format(workloads=str(WORKLOADS), data=str(data), work=str(work), status=str(status),
                               steps=12, n=n)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    t_end = time.time()
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    st = read_status(status)
    starts = sorted(s.started_at for s in st)
    assert len(starts) == n and child["ok"] == n, (len(starts), child)
    return {"persons": n, "python_start_and_imports_s": child["t_imported"] - t0,
            "first_running_s": starts[0] - t0, "all_running_s": starts[-1] - t0, "total_s": t_end - t0}


def bench_speedup(n: int, hash_rounds: int, steps: int, tmp: Path) -> dict:
    out = {"persons": n, "hash_rounds": hash_rounds, "steps": steps}
    for mode in ("sequential_local", "parallel_ray"):
        d = tmp / mode
        for i in range(n):
            write_input(d / "data", f"s{i}")
        jobs = [PersonJob(f"s{i}", "workloads:count_steps",
                          dict(data_dir=str(d / "data"), work_dir=str(d / "work"), steps=steps,
                               hash_rounds=hash_rounds),
                          Resources(cpus=1), max_retries=0) for i in range(n)]
        cfg = (LocalConfig(status_dir=d / "status") if mode == "sequential_local" else
               RayConfig(status_dir=d / "status", num_cpus=os.cpu_count(), num_gpus=0, object_store_memory_mb=100,
                         node_ip_address="127.0.0.1"))
        t0 = time.time()
        res = run_all(jobs, cfg)
        wall = time.time() - t0
        assert all(r.ok for r in res)
        st = read_status(d / "status")
        work_span = max(s.updated_at for s in st) - min(s.started_at for s in st)
        out[mode] = {"wall_s": wall, "first_start_to_last_finish_s": work_span}
    seq, par = out["sequential_local"], out["parallel_ray"]
    out["speedup_wall"] = seq["wall_s"] / par["wall_s"]
    out["speedup_excluding_ray_start"] = seq["first_start_to_last_finish_s"] / par["first_start_to_last_finish_s"]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--persons", type=int, default=8, help="persons for the launch-overhead run")
    ap.add_argument("--speedup-persons", type=int, default=4, help="persons for the speed-up run")
    ap.add_argument("--hash-rounds", type=int, default=1_500_000, help="SHA-256 rounds per step (CPU work)")
    ap.add_argument("--steps", type=int, default=4, help="steps per person in the speed-up run")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/launch.json")
    return ap.parse_args(argv)


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-launch-") as tmp:
        launch = bench_launch(args.persons, Path(tmp) / "launch")
        speed = bench_speedup(args.speedup_persons, args.hash_rounds, args.steps, Path(tmp) / "speed")
    result = {"machine": {**machine(), "python": platform.python_version(), "loadavg_1m_at_end": os.getloadavg()[0]},
              "launch_overhead_ray_embedded": launch, "speedup": speed}
    rows = [
        ("launch: command -> first person running", f"{launch['first_running_s']:.2f} s"),
        (f"launch: command -> all {launch['persons']} persons running", f"{launch['all_running_s']:.2f} s"),
        ("launch: of which python start + imports (incl. ray)", f"{launch['python_start_and_imports_s']:.2f} s"),
        (f"sequential (local backend), {speed['persons']} persons", f"{speed['sequential_local']['wall_s']:.2f} s"),
        (f"parallel (Ray, 1 CPU each, {os.cpu_count()} CPUs)", f"{speed['parallel_ray']['wall_s']:.2f} s"),
        ("speed-up incl. Ray start", f"{speed['speedup_wall']:.2f}x"),
        ("speed-up of the work span only", f"{speed['speedup_excluding_ray_start']:.2f}x"),
    ]
    w = max(len(a) for a, _ in rows)
    print(f"{'metric'.ljust(w)}  value")
    for a, b in rows:
        print(f"{a.ljust(w)}  {b}")
    atomic_write_json(args.out, result)
    print(f"wrote {args.out} (1-min load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
