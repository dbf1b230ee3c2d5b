"""The main job: data -> stores -> (shards -> training -> evaluation -> report) for every person.

With no arguments it runs the embedded default: generate the synthetic capture root
(if missing), ingest every person into zarr and write the training shards; every
stage skips work that is already up to date.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import tyro

from jobs import ingest as ingest_job
from jobs import make_synthetic
from jobs import preprocess as preprocess_job
from jobs._parallel import default_workers
from shards.contract import DataError
from shards.ingest import IngestConfig
from shards.synthetic import SyntheticConfig
from shards.writer import ShardConfig


@dataclass
class LaunchAllArgs:
    persons: str = "all"
    """'all' or comma-separated person ids (e.g. 017,018)."""
    workdir: Path = Path("data")
    """Root for everything the pipeline writes (captures/ when synthetic, zarr/, ...)."""
    captures: Path | None = None
    """Existing capture root (NeRSemble-like layout). None: generate the synthetic data set into <workdir>/captures."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """Synthetic data set used when --captures is not given."""
    ingest: IngestConfig = field(default_factory=IngestConfig)
    """Split and validation settings of the ingest."""
    shards: ShardConfig = field(default_factory=ShardConfig)
    """Rasterization and packing of the training shards."""
    workers: int = field(default_factory=default_workers)
    """Parallel processes for data preparation."""


def main(args: LaunchAllArgs) -> int:
    t0 = time.time()
    captures = args.captures
    if captures is None:
        captures = args.workdir / "captures"
        make_synthetic.main(make_synthetic.MakeSyntheticArgs(out=captures, synthetic=args.synthetic, workers=args.workers))
    ingest_job.main(ingest_job.IngestArgs(captures=captures, out=args.workdir / "zarr", persons=args.persons,
                                          ingest=args.ingest, workers=args.workers))
    # Shards are rewritten only where the store or the shard config changed (manifest specs).
    preprocess_job.main(preprocess_job.PreprocessArgs(stores=args.workdir / "zarr", out=args.workdir / "shards",
                                                      persons=args.persons, shards=args.shards, workers=args.workers))
    print(f"pipeline finished in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(tyro.cli(LaunchAllArgs)))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
