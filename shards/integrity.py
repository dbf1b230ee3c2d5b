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

Opening a shard does not walk its tar headers either (a header per member, 7 a sample: measured 4.3 read calls and
17 KB read per sample, ~0.4M calls and ~1.7 GB for a person's ~100k samples at every open, minutes on a network file
system; `benchmarks/bench_shards.py --open-only`): `<shard>.index.json` beside it (written by `shards.writer` with
the shard) lists where each sample's members lie, under the same trust rule as `verified.json` (the shard's size
and mtime_ns when it was indexed) plus its own digest and a consistency check against the shard's size
(`load_index`). Without a trusted one the headers are walked with all their checks (`walk_shard`) and the index
written again where the folder allows (`shard_index`). A wrong offset in a trusted index cannot make corrupt data
train: the bytes it points at fail their sample's sha256 when read.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common.fingerprint import file_sha256
from common.io import DataError, atomic_write_bytes, atomic_write_json

from .codec import MEMBERS

MANIFEST = "manifest.json"
#: Per shard, the size and mtime_ns the file had when its sha256 last matched the manifest's.
VERIFIED = "verified.json"
#: Suffix of the marker a reader leaves next to a shard in which it found a corrupt sample.
CORRUPT_SUFFIX = ".corrupt"
REBUILD_HINT = "the next jobs/preprocess.py run rebuilds it"
#: Suffix of the member index beside each shard (`<shard>.index.json`, `write_index`).
INDEX_SUFFIX = ".index.json"
#: Layout of `<shard>.index.json`; an index of another layout is not read (the shard is walked, the index rewritten).
INDEX_FORMAT = 1
#: The most bytes a tar written by `shards.writer` has after its last member: the two zero blocks that end the
#: archive and the zeros that fill its last 10 KiB record (a generous bound: other tar writers block differently).
MAX_TRAILER = 2**20
_BLOCK = tarfile.BLOCKSIZE

#: [(sample key, {member ext: (offset of its bytes in the shard, size)})] of one shard, in its order, every sample
#: with exactly the members of `MEMBERS`: what the loader reads samples by.
SampleIndex = list[tuple[str, dict[str, tuple[int, int]]]]


class ShardError(DataError):
    """A shard that cannot be used: missing, truncated, corrupt, or not what its manifest lists."""


def load_manifest(path: Path) -> dict:
    """The manifest at `path`, or {} when it is missing or unreadable. One of another shape (`shards` not an object
    of objects: a hand edit, another program's file) is ShardError naming the file and the field (before, its
    readers failed with AttributeError or TypeError)."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    if not isinstance(raw, dict):
        return {}
    shards = raw.get("shards", {})
    fix = "; remove it and re-run jobs/preprocess.py to rebuild the shards of its folder"
    if not isinstance(shards, dict):
        raise ShardError(path, f'field "shards" is {_json_kind(shards)}, not an object of shard entries{fix}')
    for name, entry in shards.items():
        if not isinstance(entry, dict):
            raise ShardError(path, f'field "shards"."{name}" is {_json_kind(entry)}, not an object{fix}')
    return raw


def _json_kind(value: object) -> str:
    kinds = {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def load_verified(folder: Path) -> dict[str, dict]:
    """Shard name -> {bytes, mtime_ns, sha256} from `folder`'s `verified.json` ({} when missing, unreadable or of
    another shape: every shard is then hashed, never trusted)."""
    try:
        return load_manifest(Path(folder) / VERIFIED).get("shards", {})
    except ShardError:
        return {}


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


def corrupt(path: Path, problem: str) -> ShardError:
    """The error for a shard found corrupt while reading it, which is marked for a rebuild (`mark_corrupt`): bit rot
    changes neither its size nor its mtime, so the preprocess's up-to-date check alone would keep it."""
    return ShardError(path, f"{problem}; {mark_corrupt(path, problem)}")


def index_path(path: Path) -> Path:
    """Where the member index of the shard at `path` is kept: `<shard>.index.json` beside it."""
    return Path(path).with_name(Path(path).name + INDEX_SUFFIX)


def member_key(name: str) -> tuple[str, str]:
    """(sample key, member ext) of a tar member's name: its base name is split at the first dot."""
    stem, _, ext = os.path.basename(name).partition(".")
    return os.path.join(os.path.dirname(name), stem), ext


def shard_stat(path: Path) -> os.stat_result:
    try:
        return Path(path).stat()
    except FileNotFoundError:
        raise ShardError(path, "shard file is missing") from None
    except OSError as e:
        raise ShardError(path, f"cannot read the shard: {e}") from None


def walk_shard(path: Path, st: os.stat_result) -> SampleIndex:
    """The member index of the shard at `path` (whose stat is `st`) from its tar headers, checking that the shard is
    complete: every sample has every member and nothing but zeros follows the last member. A damaged tar header fails
    its checksum, but `tarfile` takes one after the first member for the end of the archive, so the samples after it
    would silently be left out. A damaged, truncated or incomplete shard is marked for a rebuild (`corrupt`)."""
    file_size = st.st_size
    try:
        with tarfile.open(path, mode="r:") as tar:
            members = tar.getmembers()
            end = tar.offset  # where the member list ended: the trailer, or a header that is not one
        trailer = b"\1" if file_size - end > MAX_TRAILER else _read_from(path, end)
    except FileNotFoundError:
        raise ShardError(path, "shard file is missing") from None
    except (tarfile.TarError, EOFError) as e:
        raise corrupt(path, f"corrupt or truncated shard: {e}") from None
    except OSError as e:
        raise ShardError(path, f"cannot read the shard: {e}") from None
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    for m in members:
        if not m.isfile():
            continue
        if m.offset_data + m.size > file_size:
            raise corrupt(path, f"truncated shard: member {m.name} ends past the end of the file")
        key, ext = member_key(m.name)
        samples.setdefault(key, {})[ext] = (m.offset_data, m.size)
    if trailer.strip(b"\0"):
        raise corrupt(path, f"corrupt shard: the tar header at byte {end} is damaged (the {file_size - end} bytes "
                            "after it cannot be read)")
    if not samples:
        raise corrupt(path, "shard holds no samples (empty or truncated)")
    for key, exts in samples.items():
        missing = [e for e in MEMBERS if e not in exts]
        if missing:
            raise corrupt(path, f"corrupt or truncated shard: sample {key} lacks {', '.join(missing)}")
    return [(key, {e: exts[e] for e in MEMBERS}) for key, exts in samples.items()]


def _read_from(path: Path, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read()


def _index_digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_index(path: Path, st: os.stat_result, samples: SampleIndex) -> None:
    """Writes (atomically) `<shard>.index.json` for the shard at `path` whose stat is `st` (taken before its members
    were listed: a shard changed since then has another mtime, and the index is not trusted). OSError when the
    folder cannot be written."""
    body = {"format": INDEX_FORMAT, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "members": list(MEMBERS),
            "samples": [[key, *(v for ext in MEMBERS for v in exts[ext])] for key, exts in samples]}
    text = json.dumps({**body, "sha256": _index_digest(body)}, separators=(",", ":"))
    atomic_write_bytes(index_path(path), text.encode() + b"\n")


def load_index(path: Path, st: os.stat_result) -> tuple[SampleIndex | None, str | None]:
    """(the member index, None) from `<shard>.index.json` of the shard at `path` (whose stat is `st`) when it can be
    trusted: written for a file of the shard's current size and mtime_ns, in this `INDEX_FORMAT`, its digest
    matching its content, and consistent with the shard (`_index_problem`). (None, None) when there is none or it
    is stale (another size or mtime: the shard was copied, touched or rewritten since); (None, why) when it was
    written for this file but is damaged or inconsistent."""
    try:
        record = json.loads(index_path(path).read_bytes())
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, f"unreadable: {e}"
    except ValueError as e:  # not JSON (or not UTF-8): a damaged file
        return None, f"damaged (not JSON: {e})"
    if not isinstance(record, dict) or record.get("format") != INDEX_FORMAT:
        return None, None if isinstance(record, dict) else "damaged (not a JSON object)"
    if record.get("bytes") != st.st_size or record.get("mtime_ns") != st.st_mtime_ns:
        return None, None
    body = {k: v for k, v in record.items() if k != "sha256"}
    if record.get("sha256") != _index_digest(body):
        return None, "damaged (its sha256 does not match its content)"
    return _index_problem(body, st.st_size)


def _index_problem(body: dict, file_size: int) -> tuple[SampleIndex | None, str | None]:
    """(the index, None) when `body` lists every member of `MEMBERS` for each of its (distinct) samples, each one's
    bytes starting on a tar block behind a header, inside the file and overlapping no other, with no more than a tar
    trailer after the last; else (None, what is wrong)."""
    if body.get("members") != list(MEMBERS):
        return None, f"inconsistent (its members {body.get('members')} are not {list(MEMBERS)})"
    entries, width = body.get("samples"), 1 + 2 * len(MEMBERS)
    if not isinstance(entries, list) or not entries:
        return None, "inconsistent (no samples)"
    samples: SampleIndex = []
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == width and isinstance(entry[0], str) and entry[0]
                and all(type(v) is int and v >= 0 for v in entry[1:])):
            return None, f"inconsistent (a sample entry is not [key, offset, size, ...] of every member: " \
                         f"{str(entry)[:200]})"
        samples.append((entry[0], {ext: (entry[1 + 2 * i], entry[2 + 2 * i]) for i, ext in enumerate(MEMBERS)}))
    if len({key for key, _ in samples}) != len(samples):
        return None, "inconsistent (a sample is listed twice)"
    end = 0  # where the bytes of the member before end, rounded up to a tar block
    for offset, size in sorted(span for _, exts in samples for span in exts.values()):
        if offset % _BLOCK or offset < end + _BLOCK:
            return None, f"inconsistent (member bytes at {offset} are not on a tar block behind a header of their " \
                         f"own: they overlap another member's)"
        end = -(-(offset + size) // _BLOCK) * _BLOCK
        if offset + size > file_size:
            return None, f"inconsistent (member bytes at {offset} end past the end of the {file_size}-byte shard)"
    if file_size - end > MAX_TRAILER:
        return None, f"inconsistent (the {file_size - end} bytes after its last member are more than a tar trailer)"
    return samples, None


def shard_index(path: Path, st: os.stat_result | None = None) -> tuple[SampleIndex, str | None]:
    """(the member index of the shard at `path`, why its `<shard>.index.json` could not be written or None).

    The index from `<shard>.index.json` when it can be trusted (`load_index`: nothing of the shard is read), else
    from the shard's tar headers (`walk_shard`, with its checks: a damaged, truncated or incomplete shard is a
    `ShardError` and marked for a rebuild), and then written beside it for the next open, where the folder can be
    written (best effort: a read-only folder is still read, by its headers). `st`: the shard's stat when the caller
    has it (`shard_stat`; one stat per shard and open)."""
    st = shard_stat(path) if st is None else st
    samples, problem = load_index(path, st)
    if samples is not None:
        return samples, None
    if problem is not None:
        warnings.warn(f"{index_path(path)}: {problem}; the shard's tar headers are read instead and the index written "
                      "again", RuntimeWarning, stacklevel=2)
    samples = walk_shard(path, st)
    try:
        write_index(path, st, samples)
    except OSError as e:
        return samples, str(e)
    return samples, None


def check_shard(path: Path, entry: dict | None, known: dict | None = None, full: bool = False,
                st: os.stat_result | None = None) -> tuple[str | None, dict | None]:
    """(problem, record) for the shard at `path` against its manifest `entry`.

    problem: why the shard does not match (None when it does). The file's size must match; its bytes are
    trusted without being read when `known` (its `verified.json` record) has the manifest's sha256 and the
    file's current size and mtime_ns, else (or with `full`) hashed. record: the `verified.json` record to keep
    when the shard was hashed now and matched (None otherwise: the stat check sufficed, or it did not match).
    `st`: the shard's stat when the caller has it (else it is statted here)."""
    if not entry:
        return "not listed in its manifest", None
    if st is None:
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


def verify_against_manifests(paths: list[Path], threads: int = 4, stats: list[os.stat_result] | None = None) -> None:
    """Raise ShardError naming the first shard (in `paths` order) that does not match the
    `manifest.json` of its folder (see `check_shard`: shards whose size and mtime match their
    `verified.json` record are not read). Folders without a manifest are not checked here (a
    shard copied out of its folder still has its per-sample checksums). Records are not
    updated here: the preprocess owns them. `stats`: each shard's stat, in `paths` order, when the
    caller has them (the loader's open stats each shard once), else each is statted here."""
    folders: dict[Path, tuple[dict, dict]] = {}
    todo = []
    for i, p in enumerate(map(Path, paths)):
        d = p.parent
        if d not in folders:
            manifest = load_manifest(d / MANIFEST) if (d / MANIFEST).exists() else {}
            if (d / MANIFEST).exists() and not manifest:
                raise ShardError(d / MANIFEST, "shard manifest is unreadable; re-run jobs/preprocess.py")
            folders[d] = (manifest, load_verified(d) if manifest else {})
        manifest, verified = folders[d]
        if manifest:
            todo.append((p, manifest.get("shards", {}).get(p.name), verified.get(p.name), False,
                         None if stats is None else stats[i]))
    if not todo:
        return
    with ThreadPoolExecutor(max(1, min(threads, len(todo))), thread_name_prefix="shard-verify") as pool:
        problems = list(pool.map(lambda args: check_shard(*args)[0], todo))
    for (p, *_), problem in zip(todo, problems):
        if problem is not None:
            raise ShardError(p, f"{problem}; re-run jobs/preprocess.py to rebuild it")
