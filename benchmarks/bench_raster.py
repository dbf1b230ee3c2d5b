"""CPU rasterizer speed: per frame on a ~50k-face mesh, and per person in the data stages.

1. Frames/s of the CPU backend on a bumpy ~50k-face sphere, next to the torch implementation it
   replaced (frozen in tests/shards/raster_reference.py) and a naive reference. The naive
   reference ("naive per-triangle bounding-box loop in numpy") is the textbook implementation: a
   Python loop over triangles, numpy edge functions over each triangle's pixel bounding box,
   perspective-correct depth, and a depth buffer updated where the triangle is nearer. It writes
   the same buffers, so all do the same job; the script checks that masks and depths agree.
2. The first run's data stages for one person of the main job's synthetic data (768 images of a
   31.7k-face head, 16 cameras at 128^2): CPU seconds of the synthetic generator and of the shards
   stage (ingest in between, not counted), each source tree in its own child process with one torch
   thread, this tree and a "before" git ref (`git archive`d, so its whole data path is the old
   code: default the commit before the compiled rasterizer), one after the other; and whether both
   wrote identical files (images and shard tars byte for byte, the meshes' arrays).

    .venv/bin/python benchmarks/bench_raster.py            # ~3 min on the 2-core machine
    .venv/bin/python benchmarks/bench_raster.py --frames 40 --naive-frames 3 --data-persons 0

Prints tables and writes benchmarks/results/raster.json and raster_data_stages.json
(via benchmarks/bench_common.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "shards"))

import raster_reference  # noqa: E402  (the torch implementation before the compiled loops)
from bench_common import report  # noqa: E402

from shards.contract import Camera  # noqa: E402
from shards.raster import RasterBuffers, rasterize, vertex_normals  # noqa: E402
from shards.synthetic import SyntheticConfig  # noqa: E402
from shards.synthetic.head import sphere_mesh  # noqa: E402


def uv_sphere(n_lat: int, n_lon: int) -> tuple[np.ndarray, np.ndarray]:
    """Closed unit UV sphere with outward winding, with bumps so that it self-occludes."""
    v, faces = sphere_mesh(n_lat, n_lon)
    v = v * (1 + 0.08 * np.sin(6 * v[:, 0]) * np.cos(5 * v[:, 1]))[:, None]
    return v.astype(np.float32), faces.astype(np.int64)


def orbit_camera(size: int, frame: int) -> Camera:
    """Camera 3 units from the origin, circling it, the mesh filling ~60% of the image."""
    a = 0.15 * frame
    eye = np.array([3 * math.sin(a), 0.4 * math.sin(0.7 * a), -3 * math.cos(a)])
    z = -eye / np.linalg.norm(eye)
    x = np.cross(z, [0.0, -1.0, 0.0])
    x /= np.linalg.norm(x)
    R = np.stack([x, np.cross(z, x), z])
    M = np.eye(4)
    M[:3, :3], M[:3, 3] = R, -R @ eye
    K = np.array([[1.25 * size, 0, (size - 1) / 2], [0, 1.25 * size, (size - 1) / 2], [0, 0, 1]])
    return Camera("bench", K, M, size, size)


# ----------------------------------------------------------------------------------------
# Naive reference


def naive_rasterize(vertices: np.ndarray, faces: np.ndarray, cam: Camera, attributes: np.ndarray,
                    near: float = 0.01) -> dict[str, np.ndarray]:
    """Per-triangle Python loop over bounding boxes; same conventions as shards.raster."""
    H, W = cam.height, cam.width
    X = vertices.astype(np.float64) @ cam.world_to_cam[:3, :3].T + cam.world_to_cam[:3, 3]
    uvw = X @ cam.K.T
    uv = uvw[:, :2] / uvw[:, 2:]
    depth = np.full((H, W), np.inf)
    tri_id = np.full((H, W), -1, np.int64)
    bary = np.zeros((H, W, 3))
    for fi, (a, b, c) in enumerate(faces):
        z = X[[a, b, c], 2]
        if z.min() < near:
            continue
        p = uv[[a, b, c]]
        area = (p[1, 0] - p[0, 0]) * (p[2, 1] - p[0, 1]) - (p[1, 1] - p[0, 1]) * (p[2, 0] - p[0, 0])
        if area == 0:
            continue
        x0, y0 = max(math.ceil(p[:, 0].min()), 0), max(math.ceil(p[:, 1].min()), 0)
        x1, y1 = min(math.floor(p[:, 0].max()), W - 1), min(math.floor(p[:, 1].max()), H - 1)
        if x0 > x1 or y0 > y1:
            continue
        px, py = np.meshgrid(np.arange(x0, x1 + 1, dtype=np.float64), np.arange(y0, y1 + 1, dtype=np.float64))
        e = np.stack([(p[(k + 2) % 3, 0] - p[(k + 1) % 3, 0]) * (py - p[(k + 1) % 3, 1])
                      - (p[(k + 2) % 3, 1] - p[(k + 1) % 3, 1]) * (px - p[(k + 1) % 3, 0]) for k in range(3)])
        e /= area
        inside = (e >= 0).all(0)
        if not inside.any():
            continue
        w = e / z[:, None, None]
        zi = 1.0 / w.sum(0)
        win = inside & (zi < depth[y0:y1 + 1, x0:x1 + 1])
        depth[y0:y1 + 1, x0:x1 + 1][win] = zi[win]
        tri_id[y0:y1 + 1, x0:x1 + 1][win] = fi
        bary[y0:y1 + 1, x0:x1 + 1][win] = (w * zi).transpose(1, 2, 0)[win]
    mask = tri_id >= 0
    f = faces[tri_id[mask]]
    b = bary[mask]
    n = vertex_normals(torch.from_numpy(vertices), torch.from_numpy(faces)).double().numpy()
    n = n @ np.linalg.inv(cam.world_to_cam[:3, :3])
    normals = np.zeros((H, W, 3))
    normals[mask] = (b[:, :, None] * n[f]).sum(1)
    normals[mask] /= np.linalg.norm(normals[mask], axis=1, keepdims=True)
    attr = np.zeros((H, W, attributes.shape[1]))
    attr[mask] = (b[:, :, None] * attributes[f]).sum(1)
    return {"mask": mask, "depth": np.where(mask, depth, 0), "triangle_id": tri_id, "barycentrics": bary,
            "normals": normals, "attributes": attr}


# ----------------------------------------------------------------------------------------


def time_frames(render, size: int, frames: int, warmup: int) -> tuple[list[float], list[float], object]:
    """Wall and process-CPU seconds per frame over an orbit of cameras, and the first output.

    CPU time is reported too because the machine is shared: wall time includes waiting
    for a core, CPU time (all threads of this process) does not.
    """
    for i in range(warmup):
        render(orbit_camera(size, i))
    wall, cpu, first = [], [], None
    for i in range(frames):
        cam = orbit_camera(size, i)
        t, c = time.perf_counter(), time.process_time()
        out = render(cam)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        first = out if i == 0 else first
    return wall, cpu, first


def row(impl: str, size: int, threads: int, wall: list[float], cpu: list[float]) -> dict:
    return {"impl": impl, "size": size, "torch_threads": threads, "frames": len(wall),
            "fps": len(wall) / sum(wall), "ms_median": 1e3 * statistics.median(wall), "ms_min": 1e3 * min(wall),
            "cpu_ms_median": 1e3 * statistics.median(cpu)}


def agreement(a: RasterBuffers, b: dict[str, np.ndarray]) -> dict[str, float]:
    ma, mb = a.mask.numpy(), b["mask"]
    both = ma & mb
    return {"mask_differing_pixels": int((ma != mb).sum()), "covered_pixels": int(ma.sum()),
            "max_depth_diff": float(np.abs(a.depth.numpy()[both] - b["depth"][both]).max()),
            "max_normal_diff": float(np.abs(a.normals.numpy()[both] - b["normals"][both]).max())}


# ----------------------------------------------------------------------------------------
# Data stages per person


#: What the child process runs in a source tree: the generator, the ingest (not timed) and the
#: shards stage of the main job's synthetic data, one process, one torch thread; prints CPU seconds.
_STAGES = """
import json, resource, sys, torch
from pathlib import Path
torch.set_num_threads(1)
from shards.ingest import ingest_person
from shards.synthetic import SyntheticConfig, generate
from shards.writer import ShardConfig, write_shards
root, persons, sequences = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
config = SyntheticConfig(persons=persons, sequences=sequences)
t0 = cpu()
generate(config, root / "captures")
t1 = cpu()
stores = [ingest_person(root / "captures", p, root / "zarr").path for p in config.person_ids]
t2 = cpu()
result = write_shards(stores, root / "shards", ShardConfig(raster_backend="cpu"), workers=1, progress=False)
t3 = cpu()
assert not result.failed, result.failed
print(json.dumps({"startup": t0, "synthetic": t1 - t0, "ingest": t2 - t1, "shards": t3 - t2}))
"""


def _digest(root: Path, patterns: tuple[str, ...]) -> str:
    """sha256 of the files' bytes; of an .npz's arrays (names, dtypes, shapes, values), not its zip bytes."""
    h = hashlib.sha256()
    for pattern in patterns:
        for p in sorted(root.rglob(pattern)):
            h.update(str(p.relative_to(root)).encode())
            if p.suffix != ".npz":
                h.update(p.read_bytes())
                continue
            with np.load(p) as z:
                for name in sorted(z.files):
                    h.update(f"{name} {z[name].dtype} {z[name].shape}".encode())
                    h.update(np.ascontiguousarray(z[name]).tobytes())
    return h.hexdigest()


def data_stages(persons: int, sequences: int, before_ref: str, work: Path) -> tuple[list[dict], dict]:
    """CPU seconds per person of the synthetic generator and the shards stage: this tree vs `before_ref`.

    Each tree runs `_STAGES` in its own child process (the before tree from `git archive`, so its
    whole data path is the old code), one after the other on the same machine.
    """
    repo = Path(__file__).resolve().parents[1]
    old_src = work / "before-src"
    old_src.mkdir()
    archive = subprocess.run(["git", "-C", str(repo), "archive", before_ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(old_src)], input=archive, check=True)
    rows, digests = [], {}
    for label, src in ((f"before ({before_ref})", old_src), ("now", repo)):
        out = work / label.split()[0]
        env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-c", _STAGES, str(out), str(persons), str(sequences)], cwd=src,
                              env=env, check=True, capture_output=True, text=True)
        cpu = json.loads(proc.stdout.strip().splitlines()[-1])
        config = SyntheticConfig(sequences=sequences)
        rows.append({"code": label, "images_per_person": sequences * config.frames * config.cameras,
                     "synthetic_cpu_s": cpu["synthetic"] / persons, "shards_cpu_s": cpu["shards"] / persons,
                     "data_stages_cpu_s": (cpu["synthetic"] + cpu["shards"]) / persons,
                     "ingest_cpu_s": cpu["ingest"] / persons, "process_startup_cpu_s": cpu["startup"]})
        digests[label] = {"captures": _digest(out / "captures", ("*.png", "*.npz", "*.json")),
                          "shards": _digest(out / "shards", ("*.tar",))}
    a, b = digests.values()
    return rows, {"before_ref": before_ref, "identical_outputs": a == b, "digests": digests}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="256,512")
    ap.add_argument("--frames", type=int, default=30, help="timed frames per size for the CPU backend")
    ap.add_argument("--naive-frames", type=int, default=2, help="timed frames per size for the naive loop")
    ap.add_argument("--old-frames", type=int, default=5, help="timed frames per size for the old torch backend")
    ap.add_argument("--threads", default="1", help="torch thread counts to time, e.g. 1,2 (more threads only "
                    "help on an otherwise idle machine: OpenMP threads spin-wait for descheduled peers)")
    ap.add_argument("--data-persons", type=int, default=1, help="persons for the data-stage comparison (0: skip)")
    ap.add_argument("--before", default="1745134", help="git ref of the data stages' 'before' (default: the "
                    "commit before the compiled rasterizer and the eye-only albedo)")
    ap.add_argument("--data-sequences", type=int, default=6,
                    help="sequences per person there (the main job: 6; at least 3: two are held out)")
    return ap.parse_args(argv)


def main() -> None:
    args = parse_args()

    v, f = uv_sphere(128, 200)
    attrs = np.concatenate([v, np.linalg.norm(v, axis=1, keepdims=True)], 1).astype(np.float32)
    vt, ft, at = torch.from_numpy(v), torch.from_numpy(f), torch.from_numpy(attrs)
    sizes = [int(s) for s in args.sizes.split(",")]
    threads = sorted({int(t) for t in args.threads.split(",")})
    rows, checks = [], []
    for size in sizes:
        for nt in threads:
            torch.set_num_threads(nt)
            wall, cpu, fast = time_frames(lambda c: rasterize(vt, ft, c, attributes=at, backend="cpu"), size,
                                          args.frames, 3)
            rows.append(row("shards.raster cpu backend", size, nt, wall, cpu))
        torch.set_num_threads(1)
        wall, cpu, old = time_frames(lambda c: raster_reference.rasterize_cpu(vt, ft, c, at), size,
                                     max(args.old_frames, 1), 1)
        rows.append(row("the torch backend it replaced (tests/shards/raster_reference.py)", size, 1, wall, cpu))
        identical = all(torch.equal(getattr(fast, k), getattr(old, k)) for k in RasterBuffers.__dataclass_fields__)
        wall, cpu, slow = time_frames(lambda c: naive_rasterize(v, f, c, attrs), size, max(args.naive_frames, 1), 0)
        rows.append(row("naive per-triangle bounding-box loop in numpy", size, 1, wall, cpu))
        checks.append({"size": size, "identical_to_old_backend": identical, **agreement(fast, slow)})  # frame 0

    print(f"mesh: bumpy UV sphere, {len(f)} faces, {len(v)} vertices; load average {os.getloadavg()[0]:.1f} "
          "(the machine is shared: wall times include waiting for a core, cpu_ms_median does not)")
    report("raster", rows, {
        "mesh": {"kind": "bumpy UV sphere (128 x 200)", "faces": int(len(f)), "vertices": int(len(v)),
                 "attributes": int(attrs.shape[1])},
        "load_average": list(os.getloadavg()), "agreement": checks})
    for size in sizes:
        fast = min(r["cpu_ms_median"] for r in rows if r["size"] == size and r["impl"].startswith("shards"))
        old = next(r["cpu_ms_median"] for r in rows if r["size"] == size and r["impl"].startswith("the torch"))
        slow = next(r["cpu_ms_median"] for r in rows if r["size"] == size and r["impl"].startswith("naive"))
        print(f"speed-up at {size}^2 (median CPU time per frame): {old / fast:.1f}x over the old torch backend, "
              f"{slow / fast:.0f}x over the naive loop")
    for c in checks:
        print(f"agreement at {c['size']}^2: {c['mask_differing_pixels']} of {c['covered_pixels']} covered pixels "
              f"differ in mask, max |depth diff| {c['max_depth_diff']:.2e}, max |normal diff| "
              f"{c['max_normal_diff']:.2e}; bit-identical to the old backend: {c['identical_to_old_backend']}")
    if args.data_persons > 0:
        torch.set_num_threads(1)
        with tempfile.TemporaryDirectory(prefix="bench_raster_") as tmp:
            data_rows, extra = data_stages(args.data_persons, args.data_sequences, args.before, Path(tmp))
        print(f"\ndata stages, CPU seconds per person ({args.data_persons} person(s), {args.data_sequences} sequences, "
              f"one torch thread; load average {os.getloadavg()[0]:.1f}):")
        report("raster_data_stages", data_rows, {"load_average": list(os.getloadavg()), **extra})
        print(f"outputs (images and shard tars byte for byte, mesh arrays) identical before and now: "
              f"{extra['identical_outputs']}")


if __name__ == "__main__":
    main()
