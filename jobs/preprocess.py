"""Rasterize every (frame, camera) of each person's zarr store into WebDataset shards."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import tyro

from common.io import DataError
from common.locks import AlreadyRunning
from jobs._parallel import ITEM_TIMEOUT_S, check_item_timeout, check_workers, default_workers
from jobs._presets import UsageError, listed_persons
from shards.writer import ShardConfig, ShardRunResult, write_shards


@dataclass
class PreprocessArgs:
    stores: Path = Path("data/zarr")
    """Folder of `<person>.zarr` stores written by jobs/ingest.py."""
    out: Path = Path("data/shards")
    """Shard root: `<out>/<person>/<split>-%06d.tar` + `manifest.json`."""
    persons: str = "all"
    """Comma-separated person ids, or 'all' for every store in --stores."""
    shards: ShardConfig = field(default_factory=ShardConfig)
    """Rendering and packing settings."""
    workers: int = field(default_factory=default_workers)
    """Shards written in parallel (one process each)."""
    verify_all: bool = False
    """Hash every existing shard in full to decide whether it is up to date (reads every byte: hours at scale).
    Without it a shard is hashed only when its mtime changed since it was verified (another size, or a reader's
    `<shard>.corrupt` marker, rebuilds it unread); every sample checks its own checksum whenever it is read."""
    item_timeout_s: float = ITEM_TIMEOUT_S
    """A shard still being written after this many seconds is stopped (its process killed) and its person fails;
    the other shards are written (a read hung on a file system that does not answer held the stage forever). The
    shards are written in worker processes, also with --workers 1."""

    def __post_init__(self) -> None:
        check_workers(self.workers)
        check_item_timeout(self.item_timeout_s)


def store_paths(stores: Path, persons: str) -> list[Path]:
    if persons == "all":
        paths = sorted(p for p in Path(stores).glob("*.zarr") if p.is_dir())
        if not paths:
            raise DataError(stores, "no <person>.zarr stores found; run jobs/ingest.py first")
        return paths
    # A missing store fails that person alone (write_shards records it), not the whole run.
    return [Path(stores) / f"{p}.zarr" for p in listed_persons(persons)]


def main(args: PreprocessArgs) -> ShardRunResult:
    res = write_shards(store_paths(args.stores, args.persons), args.out, args.shards, workers=args.workers,
                       verify_all=args.verify_all, item_timeout_s=args.item_timeout_s)
    for name, reason in res.rebuilt.items():
        print(f"{name}: rebuilt, the file on disk did not match the manifest: {reason}", file=sys.stderr)
    checked = "sha256 checked" if args.verify_all else "size and mtime checked, sha256 where the mtime changed"
    print(f"shards: {len(res.written)} written ({len(res.rebuilt)} of them replacing damaged files), "
          f"{len(res.skipped)} up to date ({checked}), under {args.out}")
    for person, error in res.failed.items():
        print(f"{person}: FAILED: {error}", file=sys.stderr)
    return res


if __name__ == "__main__":
    try:
        result = main(tyro.cli(PreprocessArgs))
    except (DataError, UsageError, AlreadyRunning) as e:  # another preprocess on --out, an ingest into --stores
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(2 if result.failed else 0)
