"""Compiled code kept between processes, so that only the first renderer (or training job) compiles.

On one H200 the Serve renderer's warm-up (``torch.compile`` of a 512x512 denoising step for the
buckets 1 and 8) had not finished after ~200 s (README "GPU"): every replica start, every night,
would pay that. torch keeps what it compiles (inductor's FX graphs, AOTAutograd's graphs, Triton
autotuning results) in a per-machine cache, which a fresh machine of a cluster does not have.
``torch.compiler.save_cache_artifacts`` packs what this process compiled into one portable blob,
and ``load_cache_artifacts`` seeds the local caches with it: a replica that finds the blob still
traces the model (dynamo) but skips code generation, which is most of the time. The trainer uses
the same for ``--compile`` (``TrainOptions.compile_cache``: loaded before the first step, saved
after it), in a folder of its own.

One blob per (torch version, device kind) in a folder the user names (shared storage for a
cluster): compiled code is only valid for both. A blob that does not load is reported and
ignored (the renderer then compiles as without a cache); writes are atomic, so replicas that
save at once never leave half a blob, and one that cannot be written is reported, not raised.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

from common.io import atomic_write_bytes


def cache_file(folder: Path, device: torch.device) -> Path:
    """The blob for this torch build and device kind inside ``folder``."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        kind = f"{torch.cuda.get_device_name(index)}-sm{major}{minor}"
    else:
        kind = device.type
    name = re.sub(r"[^A-Za-z0-9.+-]+", "_", f"torch-{torch.__version__}-{kind}")
    return Path(folder) / f"{name}.bin"


def load_compiled(folder: Path, device: torch.device) -> bool:
    """Seed torch's compile caches from the folder's blob; True when one was loaded."""
    path = cache_file(folder, device)
    if not path.is_file():
        return False
    # a stale or corrupt blob costs a compilation, never the renderer (torch logs the cause and
    # returns None for a blob it cannot read; other errors are caught here)
    try:
        info = torch.compiler.load_cache_artifacts(path.read_bytes())
        problem = None if info is not None else "torch could not read it"
    except Exception as error:
        problem = f"{type(error).__name__}: {error}"
    if problem is not None:
        warnings.warn(f"{path}: compiled-code cache not loaded ({problem}); compiling instead", stacklevel=2)
        return False
    return True


def save_compiled(folder: Path, device: torch.device) -> Path | None:
    """Write what this process compiled (and loaded) as the folder's blob, unless the blob there
    already holds exactly that; None when it compiled nothing that torch can pack (e.g. no
    compilation, or a backend without caches)."""
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None:
        return None
    blob, _info = artifacts
    if not blob:
        return None
    path = cache_file(folder, device)
    # an unwritable folder (full disk, read-only share) costs later processes a compilation, never
    # this one its training run or its replica
    try:
        if path.is_file() and path.read_bytes() == blob:
            return path  # loaded and nothing new compiled: every replica after the first ends here
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, blob)
    except OSError as error:
        warnings.warn(f"{path}: compiled-code cache not saved ({error})", stacklevel=2)
        return None
    return path
