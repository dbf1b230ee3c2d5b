"""Validate captures and write one zarr store per person."""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from pathlib import Path

import tyro

from common.io import DataError
from common.locks import AlreadyRunning, exclusive
from jobs._parallel import ITEM_TIMEOUT_S, check_item_timeout, check_workers, default_workers, map_persons_tolerant
from jobs._presets import UsageError, listed_persons
from shards.contract import find_persons
from shards.ingest import INGEST_WHAT, STORES_LOCK_FILE, IngestConfig, IngestResult, ingest_person


@dataclass
class IngestArgs:
    captures: Path = Path("data/captures")
    """Capture root (NeRSemble-like layout, see README 'Data contract')."""
    out: Path = Path("data/zarr")
    """Folder for the `<person>.zarr` stores."""
    persons: str = "all"
    """Comma-separated person ids, or 'all' for every person folder under the capture root."""
    ingest: IngestConfig = field(default_factory=IngestConfig)
    """Split and validation settings."""
    workers: int = field(default_factory=default_workers)
    """Persons ingested in parallel."""
    force: bool = False
    """Rebuild stores even when their fingerprint says they are up to date."""
    item_timeout_s: float = ITEM_TIMEOUT_S
    """A person's ingest still running after this many seconds is stopped (its process killed) and the person fails;
    the others finish (a read hung on a file system that does not answer held the stage forever). The persons run in
    worker processes, also with --workers 1."""

    def __post_init__(self) -> None:
        check_workers(self.workers)
        check_item_timeout(self.item_timeout_s)


def resolve_persons(spec: str, root: Path) -> list[str]:
    if spec == "all":
        return find_persons(root)
    return listed_persons(spec)


def _one(person: str, args: IngestArgs) -> IngestResult:
    return ingest_person(args.captures, person, args.out, args.ingest, force=args.force)


def main(args: IngestArgs) -> tuple[dict[str, IngestResult], dict[str, Exception]]:
    """Ingest every person; a broken person is reported and skipped, the others are written. Holds
    `<out>/.ingest.lock` (`shards.ingest.STORES_LOCK_FILE`) for the whole run: another ingest into --out, or a shard
    preprocess reading its stores, is `common.locks.AlreadyRunning`, before anything is written."""
    persons = resolve_persons(args.persons, args.captures)
    with exclusive(Path(args.out) / STORES_LOCK_FILE, INGEST_WHAT):
        results, errors = map_persons_tolerant(functools.partial(_one, args=args), persons, args.workers, "ingest",
                                               timeout_s=args.item_timeout_s)
    for r in results.values():
        state = "up to date" if r.skipped else "content unchanged, store kept" if r.kept else "written"
        print(f"{r.person}: {r.frames} frames, {r.images} images -> {r.path} ({state})")
    for person, e in errors.items():
        print(f"{person}: FAILED: {e}", file=sys.stderr)
    return results, errors


if __name__ == "__main__":
    try:
        _, failed = main(tyro.cli(IngestArgs))
    except (DataError, UsageError, AlreadyRunning) as e:  # AlreadyRunning: an ingest or preprocess on --out
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(2 if failed else 0)
