"""Tiny synthetic data sets for tests and examples (seconds to build on one core)."""

from __future__ import annotations

import os
from pathlib import Path

from .ingest import IngestConfig, ingest_person
from .synthetic import SyntheticConfig, generate
from .writer import ShardConfig, write_shards

#: Small enough to generate in about a second on one core, big enough to have every feature.
TINY = SyntheticConfig(persons=2, sequences=3, frames=2, cameras=3, image_size=48, n_lat=24, n_lon=32,
                       expression_dim=10, seed=7)
#: The tiny data set holds out one of its three sequences.
TINY_INGEST = IngestConfig(held_out_sequences=1, io_threads=2)
#: Small shards so that every split has several.
TINY_SHARDS = ShardConfig(samples_per_shard=4, raster_backend="cpu")


def build_tiny(root: Path, config: SyntheticConfig = TINY) -> tuple[Path, Path, Path]:
    """Generate, ingest and shard the tiny data set under `root`; returns (captures, stores, shards)."""
    captures, stores, shards = root / "captures", root / "zarr", root / "shards"
    generate(config, captures)
    paths = [ingest_person(captures, p, stores, TINY_INGEST).path for p in config.person_ids]
    write_shards(paths, shards, TINY_SHARDS, workers=1, progress=False)
    return captures, stores, shards


def rot_bit(path: Path, offset: int) -> None:
    """Flip one bit of the file at `path` at byte `offset` and keep its mtime, as bit rot on a disk does (the tests of
    the shards' per-sample checksums and of their size-and-mtime up-to-date check)."""
    st = Path(path).stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
