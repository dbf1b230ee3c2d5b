"""Shard integrity: every shard is checked against the sha256 its manifest recorded.

`manifest.json` (written by `shards.writer`) lists each shard's size and sha256. Two
readers check them: the preprocess up-to-date check (a shard whose bytes no longer
match is rebuilt, not kept) and the training loader, which verifies each shard when it
opens it, so flipped bytes anywhere in a shard, including the uncompressed
`expr.npy` and `json` members, are never trained on. The zstd members also carry
frame checksums (see `shards.codec`), checked on every decode.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common.fingerprint import file_sha256
from common.io import DataError

MANIFEST = "manifest.json"


class ShardError(DataError):
    """A shard that cannot be used: missing, truncated, corrupt, or not what its manifest lists."""


def load_manifest(path: Path) -> dict:
    """The manifest at `path`, or {} when it is missing or unreadable."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return raw if isinstance(raw, dict) else {}


def shard_problem(path: Path, entry: dict | None) -> str | None:
    """Why the shard at `path` does not match its manifest `entry` (None when it does)."""
    if not entry:
        return "not listed in its manifest"
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "shard file is missing"
    except OSError as e:
        return f"cannot stat the shard: {e}"
    if size != entry.get("bytes"):
        return f"size {size} differs from the manifest's {entry.get('bytes')} (truncated or rewritten)"
    try:
        digest = file_sha256(path)
    except OSError as e:
        return f"cannot read the shard: {e}"
    if digest != entry.get("sha256"):
        return f"sha256 {digest[:12]}... differs from the manifest's {str(entry.get('sha256'))[:12]}... (corrupt)"
    return None


def verify_against_manifests(paths: list[Path], threads: int = 4) -> None:
    """Raise ShardError naming the first shard (in `paths` order) that does not match the
    `manifest.json` of its folder. Folders without a manifest are not checked here (a
    shard copied out of its folder still has its zstd frame checksums)."""
    manifests: dict[Path, dict] = {}
    todo = []
    for p in map(Path, paths):
        d = p.parent
        if d not in manifests:
            manifests[d] = load_manifest(d / MANIFEST) if (d / MANIFEST).exists() else {}
            if (d / MANIFEST).exists() and not manifests[d]:
                raise ShardError(d / MANIFEST, "shard manifest is unreadable; re-run jobs/preprocess.py")
        if manifests[d]:
            todo.append((p, manifests[d].get("shards", {}).get(p.name)))
    if not todo:
        return
    with ThreadPoolExecutor(max(1, min(threads, len(todo))), thread_name_prefix="shard-verify") as pool:
        problems = list(pool.map(lambda pe: shard_problem(*pe), todo))
    for (p, _), problem in zip(todo, problems):
        if problem is not None:
            raise ShardError(p, f"{problem}; re-run jobs/preprocess.py to rebuild it")
