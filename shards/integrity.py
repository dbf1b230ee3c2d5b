"""Shard integrity without reading every shard at every launch.

Three layers, each cheap where the whole-file hash of ~230 GB per person each night was not:

* **Every sample checks itself when it is read**: its ``sha256`` member covers every byte of
  its other members (`shards.codec.verify_sample`), so a flipped byte anywhere in a sample,
  including the uncompressed `expr.npy` and `json`, is never trained on, with or without a
  manifest. Tar headers carry their own checksum (`tarfile` refuses a damaged one).
* **Size and mtime for "is this the file that was written"**: `manifest.json` (written by
  `shards.writer`) lists each shard's spec, size and sha256. `verified.json` beside it records,
  per shard, the size and ``mtime_ns`` the file had when its sha256 was last known to match
  (when it was written, or hashed since). The preprocess up-to-date check and the training
  loader's open trust a shard whose size and mtime still match that record, without reading
  it; a shard with another size is rebuilt (refused by the loader), one with another mtime
  (copied, touched, rewritten) is hashed in full, as is every shard with no record (shards
  written before this file existed: hashed once). Only the preprocess writes `verified.json`;
  it is kept out of the manifest so that a touched or copied shard does not change the
  manifest, whose bytes key the evaluation and the base pretraining.
* **A corrupt sample found while reading marks its shard**: bit rot changes neither size nor
  mtime, so the reader writes `<shard>.corrupt` (the reason, atomically) and the next
  preprocess rebuilds the shard (and removes the marker); the loader refuses a marked shard
  when it opens it.

`jobs/preprocess.py --verify-all` hashes every shard in full (slow: reads every byte).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common.fingerprint import file_sha256
from common.io import DataError, atomic_write_bytes, atomic_write_json

MANIFEST = "manifest.json"
#: Per shard, the size and mtime_ns the file had when its sha256 last matched the manifest's.
VERIFIED = "verified.json"
#: Suffix of the marker a reader leaves next to a shard in which it found a corrupt sample.
CORRUPT_SUFFIX = ".corrupt"
REBUILD_HINT = "the next jobs/preprocess.py run rebuilds it"


class ShardError(DataError):
    """A shard that cannot be used: missing, truncated, corrupt, or not what its manifest lists."""


def load_manifest(path: Path) -> dict:
    """The manifest at `path`, or {} when it is missing or unreadable."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return raw if isinstance(raw, dict) else {}


def load_verified(folder: Path) -> dict[str, dict]:
    """Shard name -> {bytes, mtime_ns, sha256} from `folder`'s `verified.json` ({} when missing or unreadable:
    every shard is then hashed, never trusted)."""
    shards = load_manifest(Path(folder) / VERIFIED).get("shards")
    return shards if isinstance(shards, dict) else {}


def write_verified(folder: Path, records: dict[str, dict]) -> None:
    atomic_write_json(Path(folder) / VERIFIED, {"shards": records})


def stat_record(st: os.stat_result, sha256: str) -> dict:
    """What `verified.json` keeps of a shard whose bytes (at stat `st`) were found to have `sha256`."""
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}


def corrupt_marker(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + CORRUPT_SUFFIX)


def corrupt_mark(path: Path) -> str | None:
    """The reason a reader marked the shard at `path` corrupt, or None when it is not marked."""
    try:
        return corrupt_marker(path).read_text().strip() or "marked corrupt"
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"marked corrupt (the marker is unreadable: {e})"


def mark_corrupt(path: Path, reason: str) -> str:
    """Leaves `<shard>.corrupt` holding `reason` next to the shard at `path` (atomically: readers that find the
    same sample at once each replace it with a whole file), so that the next preprocess rebuilds the shard.
    Returns what to say about it in the error (the marker cannot be written on a read-only folder)."""
    try:
        atomic_write_bytes(corrupt_marker(path), reason.encode() + b"\n")
    except OSError as e:
        return (f"it could not be marked for a rebuild ({e}): run jobs/preprocess.py with --verify-all, or delete "
                f"the shard and run jobs/preprocess.py")
    return f"marked for a rebuild: {REBUILD_HINT}"


def check_shard(path: Path, entry: dict | None, known: dict | None = None,
                full: bool = False) -> tuple[str | None, dict | None]:
    """(problem, record) for the shard at `path` against its manifest `entry`.

    problem: why the shard does not match (None when it does). The file's size must match; its bytes are
    trusted without being read when `known` (its `verified.json` record) has the manifest's sha256 and the
    file's current size and mtime_ns, else (or with `full`) hashed. record: the `verified.json` record to keep
    when the shard was hashed now and matched (None otherwise: the stat check sufficed, or it did not match)."""
    if not entry:
        return "not listed in its manifest", None
    try:
        st = path.stat()
    except FileNotFoundError:
        return "shard file is missing", None
    except OSError as e:
        return f"cannot stat the shard: {e}", None
    if st.st_size != entry.get("bytes"):
        return f"size {st.st_size} differs from the manifest's {entry.get('bytes')} (truncated or rewritten)", None
    if not full and known == stat_record(st, entry.get("sha256")):
        return None, None
    try:
        digest = file_sha256(path)
    except OSError as e:
        return f"cannot read the shard: {e}", None
    if digest != entry.get("sha256"):
        return (f"sha256 {digest[:12]}... differs from the manifest's {str(entry.get('sha256'))[:12]}... "
                "(corrupt)"), None
    return None, stat_record(st, digest)  # the stat from before the hash: a change while hashing is seen next time


def verify_against_manifests(paths: list[Path], threads: int = 4) -> None:
    """Raise ShardError naming the first shard (in `paths` order) that does not match the
    `manifest.json` of its folder (see `check_shard`: shards whose size and mtime match their
    `verified.json` record are not read). Folders without a manifest are not checked here (a
    shard copied out of its folder still has its per-sample checksums). Records are not
    updated here: the preprocess owns them."""
    folders: dict[Path, tuple[dict, dict]] = {}
    todo = []
    for p in map(Path, paths):
        d = p.parent
        if d not in folders:
            manifest = load_manifest(d / MANIFEST) if (d / MANIFEST).exists() else {}
            if (d / MANIFEST).exists() and not manifest:
                raise ShardError(d / MANIFEST, "shard manifest is unreadable; re-run jobs/preprocess.py")
            folders[d] = (manifest, load_verified(d) if manifest else {})
        manifest, verified = folders[d]
        if manifest:
            todo.append((p, manifest.get("shards", {}).get(p.name), verified.get(p.name)))
    if not todo:
        return
    with ThreadPoolExecutor(max(1, min(threads, len(todo))), thread_name_prefix="shard-verify") as pool:
        problems = list(pool.map(lambda pek: check_shard(*pek)[0], todo))
    for (p, _, _), problem in zip(todo, problems):
        if problem is not None:
            raise ShardError(p, f"{problem}; re-run jobs/preprocess.py to rebuild it")
