"""Ingest throughput (frames/s and images/s) on the default synthetic data set.

    python benchmarks/bench_ingest.py [--persons 8] [--workdir data/bench]

Generates the default synthetic capture root first if it is not there (timed
separately), then ingests every person with --force, sequentially and with one
process per core, after an untimed pass that warms the page cache. The last row is
the part of it that the store's content identity costs: the CPU seconds of hashing
(sha256) every file the ingest reads, once, on one thread (the ingest hashes each
file's bytes as it reads them, on its image threads). The "touched" row is the ingest
after every capture file was touched (new mtimes, same bytes: a `touch`, a copy without
mtimes): its files are hashed again, nothing decoded, and each store is kept; compare it
with the sequential --force row, what such a capture cost before (a full ingest).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import report  # noqa: E402

from jobs._parallel import map_persons  # noqa: E402
from shards.ingest import IngestConfig, ingest_person  # noqa: E402
from shards.synthetic import SyntheticConfig, generate  # noqa: E402


def _ingest(person: str, captures: Path, out: Path):
    return ingest_person(captures, person, out, IngestConfig(), force=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--persons", type=int, default=8)
    ap.add_argument("--workdir", type=Path, default=Path("data/bench-ingest"))
    ap.add_argument("--workers", type=int, default=2)
    return ap.parse_args(argv)


def main() -> None:
    a = parse_args()
    cfg = replace(SyntheticConfig(), persons=a.persons)
    captures, out = a.workdir / "captures", a.workdir / "zarr"
    t = time.perf_counter()
    persons = map_persons(functools.partial(_gen, cfg=cfg, root=captures), cfg.person_ids, a.workers, "synthetic")
    gen_s = time.perf_counter() - t
    # Untimed pass: the page cache holds the images afterwards, so both timed runs see the same cache.
    map_persons(functools.partial(_ingest, captures=captures, out=out), list(persons), a.workers, "warm-up")
    rows = []
    for workers in (1, a.workers):
        t = time.perf_counter()
        res = map_persons(functools.partial(_ingest, captures=captures, out=out), list(persons), workers, "ingest")
        dt = time.perf_counter() - t
        frames = sum(r.frames for r in res.values())
        images = sum(r.images for r in res.values())
        rows.append({"stage": "ingest", "workers": workers, "persons": len(res), "frames": frames, "images": images,
                     "seconds": dt, "frames/s": frames / dt, "images/s": images / dt})
    rows.append(_touched(captures, out, list(persons)))
    rows.append(_hashing(captures, list(persons)))
    rows.append({"stage": "generate (incl. skip if present)", "workers": a.workers, "persons": len(persons),
                 "seconds": gen_s})
    report("ingest", rows, {"synthetic_config": cfg.__dict__})


def _touched(captures: Path, out: Path, persons: list[str]) -> dict:
    """The sequential ingest (no --force) after every file of the persons' captures got a new mtime."""
    for p in persons:
        for f in (captures / p).rglob("*"):
            os.utime(f)
    t = time.perf_counter()
    res = map_persons(functools.partial(ingest_person, captures, out_dir=out, config=IngestConfig()), persons, 1,
                      "touched")
    dt = time.perf_counter() - t
    if not all(r.kept for r in res.values()):
        raise SystemExit(f"a touched capture's store was not kept: {sorted(p for p, r in res.items() if not r.kept)}")
    frames = sum(r.frames for r in res.values())
    images = sum(r.images for r in res.values())
    return {"stage": "ingest after a touch (stores kept)", "workers": 1, "persons": len(res), "frames": frames,
            "images": images, "seconds": dt, "frames/s": frames / dt, "images/s": images / dt}


def _hashing(captures: Path, persons: list[str]) -> dict:
    """CPU seconds of sha256 over the bytes of every file of the persons' captures (page cache warm; read before
    the clock starts): what the ingest's content identity adds to it."""
    data = [f.read_bytes() for p in persons for f in sorted((captures / p).rglob("*")) if f.is_file()]
    t = time.process_time()
    for chunk in data:
        hashlib.sha256(chunk).digest()
    dt = time.process_time() - t
    megabytes = sum(map(len, data)) / 1e6
    return {"stage": "sha256 of the capture files (CPU s, 1 thread)", "workers": 1, "persons": len(persons),
            "files": len(data), "MB": round(megabytes, 1), "seconds": dt, "MB/s": megabytes / dt if dt else None}


def _gen(person: str, cfg: SyntheticConfig, root: Path) -> str:
    generate(cfg, root, [person])
    return person


if __name__ == "__main__":
    main()
