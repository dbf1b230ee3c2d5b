"""Content fingerprints of files and folders: what makes a result up to date.

A base model, a trained avatar or an evaluation is reused only while the fingerprints of what
it was made from are unchanged. Fingerprints hash contents, not paths or times, so a copied or
moved folder keeps its fingerprint and a rewritten file with the same bytes (a model saved again
after a resume that trained no step) does not look new.

Files up to :data:`WHOLE_FILE_BYTES` are hashed whole. Larger ones (a Stable Diffusion UNet is
3.5 GB) are hashed by their size and :data:`SAMPLED_BLOCKS` blocks of :data:`BLOCK_BYTES` spread
evenly over the file, first and last included: a few hundred milliseconds instead of seconds
per file on a network file system; a weight file rewritten with other values changes nearly
every block, so a sample sees it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common.io import DataError

WHOLE_FILE_BYTES = 64 * 2**20
SAMPLED_BLOCKS = 16
BLOCK_BYTES = 2**20


def file_digest(path: Path | str) -> str:
    """sha256 of a file's bytes (or of its size and sampled blocks when it is large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size <= WHOLE_FILE_BYTES:
            for chunk in iter(lambda: f.read(4 * 2**20), b""):
                h.update(chunk)
        else:
            h.update(f"sampled {size}".encode())
            for i in range(SAMPLED_BLOCKS):
                f.seek((size - BLOCK_BYTES) * i // (SAMPLED_BLOCKS - 1))
                h.update(f.read(BLOCK_BYTES))
    return h.hexdigest()


def walk_tree(root: Path | str) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk(root)`` top-down, into symbolic links to folders too (a capture's sequences or a base's
    weights are often links into shared storage: their files are the tree's own, and a change in them must
    change its fingerprint; ``os.walk`` and, before Python 3.13, ``Path.rglob`` do not follow them), never
    into a folder that is already on the way down (a link to an ancestor would loop), and raising what it
    cannot read (``os.walk`` skips it silently). An absent ``root`` has nothing under it."""
    root = os.fspath(root)
    chains = {root: frozenset({os.path.realpath(root)})}  # folder walked -> real paths of it and its ancestors

    def fail(e: OSError) -> None:
        if not (isinstance(e, FileNotFoundError) and e.filename == root):
            raise e

    for dirpath, dirnames, filenames in os.walk(root, onerror=fail, followlinks=True):
        chain = chains.pop(dirpath)
        kept = []
        for name in dirnames:
            child = os.path.join(dirpath, name)
            real = os.path.realpath(child)
            if real not in chain:
                kept.append(name)
                chains[child] = chain | {real}
        dirnames[:] = kept
        yield dirpath, dirnames, filenames


def _files(root: Path) -> list[Path]:
    """Every file name under ``root`` (:func:`walk_tree`), sorted as ``sorted(root.rglob("*"))`` sorts."""
    return sorted(Path(dirpath, name) for dirpath, _, names in walk_tree(root) for name in names)


def tree_fingerprint(root: Path | str) -> str:
    """sha256 over every file under ``root`` (relative path and :func:`file_digest`), in sorted
    order, those in linked folders included (:func:`walk_tree`). Names starting with '.' (temporary
    files of atomic writes) are left out."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    h = hashlib.sha256()
    for path in _files(root):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        h.update(f"{rel.as_posix()}\0{file_digest(path)}\n".encode())
    return h.hexdigest()


def json_digest(obj: Any) -> str:
    """sha256 of a JSON-able object in canonical form (sorted keys; paths and other objects by str)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: Path | str) -> str:
    """sha256 of every byte of a file, read in 4 MiB chunks (no sampling: what a recorded checksum of a saved file
    is; hashlib releases the GIL, so threads hash in parallel)."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(4 * 2**20):
            h.update(chunk)
    return h.hexdigest()


def folder_sha256(folder: Path | str, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """Relative path -> :func:`file_sha256` of every file under ``folder`` but ``exclude`` (relative paths)
    and names starting with '.' (temporary files of atomic writes)."""
    folder = Path(folder)
    files = {}
    for path in _files(folder):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel not in exclude and not any(p.startswith(".") for p in rel.split("/")):
            files[rel] = path
    with ThreadPoolExecutor(min(8, max(1, len(files)))) as pool:  # hashlib releases the GIL: files hash in parallel
        return dict(zip(files, pool.map(file_sha256, files.values())))


def check_sha256(folder: Path | str, recorded: dict[str, str], record: Path | str, remedy: str) -> None:
    """Raises DataError naming the first file under ``folder`` whose bytes differ from the sha256 ``record``
    lists for it (a flipped bit loads as other weights without any error); a missing one is a
    FileNotFoundError naming it."""
    for rel, digest in sorted(recorded.items()):
        path = Path(folder) / rel
        if not path.is_file():
            raise FileNotFoundError(errno.ENOENT, f"missing, though {record} lists it; {remedy}", str(path))
        if file_sha256(path) != digest:
            raise DataError(path, f"sha256 differs from the one {record} recorded when it was written (a corrupt "
                                  f"or changed file); {remedy}")
