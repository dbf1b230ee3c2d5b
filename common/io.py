"""File I/O every package shares: the input-error type, atomic writes and where a Unix socket fits.

Nothing is half-written: every writer puts its output under a temporary name beside the target
and renames it into place, so a reader (or a re-run after a crash) sees the old file or the new
one, never a part of one.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

from common.processes import pid_alive, pid_namespace

#: The longest path a Unix socket may have on Linux (``sun_path`` is 108 bytes with the terminating NUL).
SUN_PATH_MAX = 107


def fits_unix_socket(directory: os.PathLike | str, name_length: int) -> bool:
    """Whether sockets whose names add `name_length` bytes (separators included) to `directory` can be made there:
    a long ``TMPDIR`` (a cluster's per-job folder, pytest's) is not a place for them."""
    return len(os.fsencode(directory)) + name_length <= SUN_PATH_MAX


class DataError(ValueError):
    """Invalid input data; the message always names the offending file."""

    def __init__(self, path: os.PathLike | str, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):
        # Rebuilt from (path, problem), so it crosses process boundaries (worker pools, Ray).
        return type(self), (self.path, self.problem)


_UMASK_LOCK = threading.Lock()


def umask() -> int:
    """The process umask, read without changing it: from ``/proc/self/status`` on Linux (4.7 and later);
    elsewhere set and restored under a lock. ``os.umask`` alone cannot read it without setting it, and two
    threads doing so at once (the evaluation's writes) could each read the other's 0, write a file open to
    everyone and leave the whole process with umask 0."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    with _UMASK_LOCK:
        mask = os.umask(0)
        os.umask(mask)
    return mask


@contextlib.contextmanager
def naming(path: os.PathLike | str, *temporary: os.PathLike | str) -> Iterator[None]:
    """Re-raises an OSError of the block naming ``path`` (same errno, same OSError subclass) when
    it names no file, or only one of the ``temporary`` stand-ins for ``path``: a ``write`` on a full
    or read-only disk says "[Errno 28] No space left on device" and nothing else. Errors that name
    another file are left as they are."""
    try:
        yield
    except OSError as e:
        if e.filename is not None and str(e.filename) not in {str(t) for t in temporary}:
            raise
        if e.errno is None:
            raise OSError(f"{e} (writing {path})") from e
        raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(path)) from e


def _flush_to_disk(path: Path) -> None:
    """fsync before the rename: after a power loss or a node crash, file systems that delay allocation (ext4 for a
    new name, XFS, network file systems) can keep a rename whose data never reached the disk, a zero-length file
    under the final name. Directories written by :func:`atomic_directory` are not flushed file by file; what they
    hold (stores, checkpoints, avatars) carries checksums their readers check."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path, mode: int | None = None) -> Iterator[Path]:
    """Yields a temporary file name beside ``path`` (same suffix, for writers that pick the format
    by it); when the block succeeds the file gets ``mode`` (default: the usual 0o666 minus the
    umask; mkstemp makes 0600), is flushed to the disk and renamed over ``path``. On error it is removed; an I/O error
    names ``path`` (:func:`naming`)."""
    path = Path(path)
    with naming(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
        os.close(fd)
    tmp = Path(name)
    try:
        with naming(path, tmp):
            yield tmp
            os.chmod(tmp, 0o666 & ~umask() if mode is None else mode)
            _flush_to_disk(tmp)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write `data` to a sibling temporary file, then rename it over `path` (see :func:`atomic_file`)."""
    with atomic_file(path, mode) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: Path, obj: object, mode: int | None = None) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), mode)


def read_marker(path: Path) -> object | None:
    """The JSON content of a completion marker, or None when there is none. A marker that cannot be read (cut off
    by a power loss, a bad copy) means "not complete": the work it marks is redone, with a warning naming it,
    instead of a traceback on every later run."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        warnings.warn(f"{path}: unreadable completion marker ({e}); redoing the work it marks", RuntimeWarning,
                      stacklevel=2)
        return None


def read_safetensors(path: Path) -> dict:
    """The tensors of a safetensors file; one that does not parse (cut off, not safetensors) is a DataError naming
    it (safetensors' own message names no file)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise DataError(path, f"unreadable safetensors file ({e})") from None


def _writer_tag() -> str:
    """Who makes a temporary folder, in its name: this host, this pid namespace and this pid. A later writer of the
    same target removes what a killed one left (:func:`remove_leftovers`)."""
    namespace = (pid_namespace() or "").removeprefix("pid:[").removesuffix("]")  # "" where not Linux
    return f"{socket.gethostname()}@{namespace}@{os.getpid()}@"


def _temporary_prefix(path: Path, kind: str) -> str:
    return f".{path.name}.{kind}-{_writer_tag()}"


def remove_leftovers(path: Path) -> list[Path]:
    """Removes (and returns) the temporary folders beside ``path`` that writers of ``path`` on this host left when
    they were killed (SIGKILL, the OOM killer: no ``finally`` ran): a whole store or capture under ``.<name>.tmp-*``,
    and the old one under ``.<name>.old-*`` when the kill fell between :func:`replace_directory`'s renames. Only
    those whose process is gone: their names carry host, pid namespace and pid; a live writer's, another host's on
    a shared file system, another container's and those of older versions (no tag) are left."""
    path = Path(path)
    ours = _writer_tag().rsplit("@", 2)[0] + "@"  # host@namespace@
    removed = []
    for kind in ("tmp", "old"):
        prefix = f".{path.name}.{kind}-{ours}"
        for leftover in path.parent.glob(f"{glob.escape(prefix)}*"):
            pid = leftover.name[len(prefix):].split("@", 1)[0]
            if not pid.isdigit() or pid_alive(int(pid)) or not leftover.is_dir() or leftover.is_symlink():
                continue
            shutil.rmtree(leftover, ignore_errors=True)
            removed.append(leftover)
    return removed


def replace_directory(src: Path, dst: Path) -> None:
    """Renames the finished directory ``src`` over ``dst``. An existing ``dst`` is moved aside
    first (renames only), put back if the rename fails, and deleted afterwards."""
    src, dst = Path(src), Path(dst)
    aside = None
    if dst.exists():
        aside = Path(tempfile.mkdtemp(prefix=_temporary_prefix(dst, "old"), dir=dst.parent))
        os.replace(dst, aside / dst.name)
    try:
        os.replace(src, dst)
    except BaseException:
        if aside is not None:
            os.replace(aside / dst.name, dst)
            aside.rmdir()
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yields an empty temporary directory beside ``path``; when the block succeeds it replaces
    ``path`` (:func:`replace_directory`). On error it is removed and ``path`` is untouched; an I/O
    error that names no file names ``path`` (:func:`naming`). What killed writers of ``path`` left is
    removed first (:func:`remove_leftovers`): a killed ingest left a whole store each time."""
    path = Path(path)
    with naming(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        for leftover in remove_leftovers(path):
            warnings.warn(f"{leftover}: removed, the temporary folder of a writer of {path} that was killed",
                          RuntimeWarning, stacklevel=3)
        tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(path, "tmp"), dir=path.parent))
    try:
        with naming(path, tmp):
            os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700
            yield tmp
            replace_directory(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
