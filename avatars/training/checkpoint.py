"""Resumable checkpoints: DeepSpeed engine state + data position + every RNG.

A checkpoint is `<run>/checkpoints/step_<N:07d>/`: DeepSpeed's own files (trainable
weights, optimizer state; frozen weights are excluded) plus `trainer_state.pt`
(data-loader epoch and position, torch / numpy / python RNG states, the diffusion
noise generator) and `train_config.json` (the run's options, which a resume compares with
its own: avatars.training.config.resume_conflicts). DeepSpeed writes into the folder directly, so completeness is
marked separately: `complete.json` is written (atomically, by rank 0, after every
rank has finished saving) last, and only folders with it count. It lists the sha256 of every
file of the folder, checked before a resume loads any of them (a flipped bit loads as other
weights without an error). The newest `keep_last` complete checkpoints are kept.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from avatars.training.finite import first_names, non_finite
from avatars.training.optim import match_state_layout
from common.fingerprint import check_sha256, folder_sha256
from common.io import DataError, atomic_write_bytes, atomic_write_json

MARKER = "complete.json"
#: What to do about a corrupt checkpoint.
REMEDY = "remove the folder to resume from the checkpoint before it, or start over with --resume never"
#: What to do about a checkpoint of a run that diverged (written before the trainer refused to save one).
DIVERGED_REMEDY = ("the run diverged before it was written (a version that saved such checkpoints): start over with "
                   "--resume never, with a lower --lr-networks / --lr-features if the loss diverges again")
STATE_FILE = "trainer_state.pt"
#: The weight average (``--ema-decay``), written once by rank 0: every rank holds the same average.
AVERAGE_FILE = "weight_average.pt"
#: The run's options (``to_jsonable`` of its TrainConfig), written once by rank 0: a resume compares its own.
OPTIONS_FILE = "train_config.json"


@dataclass
class TrainerState:
    """Where training stands, beyond the weights and optimizer."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # data epoch in progress
    position: int = 0  # samples of this epoch already consumed (by this rank)
    elapsed_s: float = 0.0  # training wall time before this process
    # The logging window open at the checkpoint (the micro-step losses, samples and training seconds
    # since the last metrics line), so that a resumed run logs the same means as an uninterrupted one
    # whether or not --log-every divides --checkpoint-every.
    window_losses: list[float] = field(default_factory=list)
    window_samples: int = 0
    window_s: float = 0.0
    # Records logged (Trainer.log) up to here: what metrics.jsonl keeps on resume, so that the records a run
    # logged after its checkpoint (the end of run's validation and latent-cache line) are not written twice.
    # None: a checkpoint written before they were counted (metrics.jsonl is then cut by step alone).
    records: int | None = 0


def tag(step: int) -> str:
    return f"step_{step:07d}"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def rng_state(noise: torch.Generator) -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "noise": noise.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict, noise: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    noise.set_state(state["noise"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.glob("step_*") if (p / MARKER).is_file())


def newest_step(ckpt_dir: Path) -> int:
    """The step of the newest complete checkpoint, the one a resume continues from; 0 without one."""
    done = complete_checkpoints(Path(ckpt_dir))
    return int(done[-1].name.removeprefix("step_")) if done else 0


def past_steps(ckpt_dir: Path, steps: int) -> str | None:
    """Why the checkpoints in ``ckpt_dir`` (``<run>/checkpoints``) cannot be resumed by a run of ``steps`` steps:
    the newest is past them (its loop would not run: result.json said 600 steps for --steps 300); None otherwise."""
    reached = newest_step(ckpt_dir)
    if reached <= steps:
        return None
    return (f"{Path(ckpt_dir) / tag(reached)}: the checkpoints of {Path(ckpt_dir).parent} are at step {reached}, past "
            f"--steps {steps}; pass --steps {reached} or more to continue it, or start over with --resume never")


#: Free space below which a failed checkpoint write is taken for a full disk.
FULL_DISK_BYTES = 64 * 2**20


def save(engine, ckpt_dir: Path, state: TrainerState, noise: torch.Generator, keep_last: int,
         average: dict[str, torch.Tensor] | None = None, options: dict | None = None) -> Path:
    """Save a checkpoint of `engine` + `state` (+ the weight average, + the run's options) (collective: every
    rank calls it)."""
    ckpt_dir = Path(ckpt_dir)
    name = tag(state.step)
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=name, save_latest=False, exclude_frozen_parameters=True)
    except RuntimeError as e:
        # torch.save reports a full disk as "[enforce fail at inline_container.cc] ... unexpected pos":
        # say what it is and where (the incomplete folder has no marker and is removed on resume).
        if shutil.disk_usage(ckpt_dir).free < FULL_DISK_BYTES:
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (torch.save: {e})", str(ckpt_dir / name)) from e
        raise
    import io

    buf = io.BytesIO()
    torch.save({"state": asdict(state), "rng": rng_state(noise)}, buf)
    atomic_write_bytes(ckpt_dir / name / f"rank{_rank():03d}_{STATE_FILE}", buf.getvalue())
    if average is not None and _rank() == 0:
        buf = io.BytesIO()
        torch.save(average, buf)
        atomic_write_bytes(ckpt_dir / name / AVERAGE_FILE, buf.getvalue())
    if options is not None and _rank() == 0:
        atomic_write_json(ckpt_dir / name / OPTIONS_FILE, options)
    _barrier()
    if _rank() == 0:  # every rank has written its files: the marker lists them with their sha256
        atomic_write_json(ckpt_dir / name / MARKER, {"step": state.step, "sha256": folder_sha256(ckpt_dir / name)})
        for old in complete_checkpoints(ckpt_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return ckpt_dir / name


def load_latest(engine, ckpt_dir: Path, noise: torch.Generator) -> TrainerState | None:
    """Restore the newest complete checkpoint into `engine` and the RNGs; None if there is none.

    Incomplete folders (a run killed while saving) are removed by rank 0.
    """
    ckpt_dir = Path(ckpt_dir)
    done = complete_checkpoints(ckpt_dir)
    if _rank() == 0 and ckpt_dir.is_dir():
        newest = done[-1].name if done else ""
        for p in ckpt_dir.glob("step_*"):
            if not (p / MARKER).is_file() and p.name > newest:
                shutil.rmtree(p, ignore_errors=True)
    _barrier()
    if not done:
        return None
    latest = done[-1]
    verify(latest)
    path, _ = engine.load_checkpoint(str(ckpt_dir), tag=latest.name, load_module_strict=False)
    if path is None:
        raise RuntimeError(f"{latest}: DeepSpeed could not load this checkpoint")
    # saved under the other --memory-format: the moments follow the weights (a stand-in engine may have no optimizer)
    match_state_layout(getattr(engine, "optimizer", None))
    module = getattr(engine, "module", None)  # a stand-in engine may have none
    if module is not None:
        _check_finite(latest, "weights", {n: p for n, p in module.named_parameters() if p.requires_grad})
    saved = _read(latest / f"rank{_rank():03d}_{STATE_FILE}", weights_only=False)
    losses = saved["state"].get("window_losses") or []
    if not all(np.isfinite(losses)):
        bad = [v for v in losses if not np.isfinite(v)]
        raise DataError(latest, f"its logging window holds {len(bad)} non-finite training losses ({bad[0]}, ...); "
                                f"{DIVERGED_REMEDY}")
    set_rng_state(saved["rng"], noise)
    return TrainerState(**{"records": None, **saved["state"]})


def _check_finite(folder: Path, what: str, tensors: dict[str, torch.Tensor]) -> None:
    """A DataError naming ``folder`` when a floating-point tensor of ``tensors`` holds a NaN or an infinity (one
    pass over the trainable weights, one host sync): resumed, NaN weights train on as NaN and are published."""
    bad = non_finite(tensors)
    if bad:
        raise DataError(folder, f"NaN or infinite {what} ({first_names(bad)}); {DIVERGED_REMEDY}")


def _recorded_sha256(folder: Path) -> dict[str, str] | None:
    """The sha256 per file the checkpoint's marker recorded (None: written before they were); a marker that does
    not parse is a DataError naming it."""
    marker = folder / MARKER
    try:
        recorded = json.loads(marker.read_text()).get("sha256")
    except (OSError, ValueError, AttributeError) as e:
        raise DataError(marker, f"unreadable checkpoint marker ({e}); {REMEDY}") from None
    if recorded is not None and not isinstance(recorded, dict):
        raise DataError(marker, f"its sha256 must be an object file -> digest; {REMEDY}")
    return recorded


def verify(folder: Path) -> None:
    """Every file of a complete checkpoint has the sha256 its marker recorded (DataError naming the first
    that does not: a flipped bit loads as other weights without any error). A marker without checksums
    (written before they were recorded) is loaded unverified, with a warning."""
    marker = folder / MARKER
    recorded = _recorded_sha256(folder)
    if recorded is None:
        warnings.warn(f"{folder}: written before checkpoints recorded the sha256 of their files; resumed from "
                      "without checking them", stacklevel=2)
        return
    check_sha256(folder, recorded, marker, REMEDY)


def saved_options(ckpt_dir: Path) -> tuple[Path, dict] | None:
    """(file, options) the newest complete checkpoint was trained with; None without a checkpoint; (its folder, {})
    for one written before checkpoints saved them: it records nothing a resume must compare
    (``config.MUST_BE_RECORDED``), so it is not continued."""
    done = complete_checkpoints(Path(ckpt_dir))
    if not done:
        return None
    path = done[-1] / OPTIONS_FILE
    if not path.is_file():
        return done[-1], {}
    recorded = _recorded_sha256(done[-1]) or {}
    check_sha256(done[-1], {OPTIONS_FILE: recorded[OPTIONS_FILE]} if OPTIONS_FILE in recorded else {},
                 done[-1] / MARKER, REMEDY)
    try:
        return path, json.loads(path.read_text())
    except ValueError as e:
        raise DataError(path, f"unreadable ({e}); {REMEDY}") from None


def load_average(ckpt_dir: Path, step: int) -> dict[str, torch.Tensor] | None:
    """The weight average stored with the complete checkpoint of ``step``; None when it was written
    without one (``--ema-decay 0``, or by a version before the option)."""
    path = Path(ckpt_dir) / tag(step) / AVERAGE_FILE
    if not path.is_file():
        return None
    average = _read(path, weights_only=True)
    if isinstance(average, dict):
        _check_finite(path.parent, "weight average", average)
    return average


def _read(path: Path, weights_only: bool):
    """torch.load of a checkpoint file, naming the file when it does not load (a corrupt disk; the
    files themselves are written atomically before the folder's marker)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as error:
        raise ValueError(f"{path}: checkpoint file does not load ({type(error).__name__}: {error}); remove its "
                         "folder to resume from the one before, or start over with --resume never") from error


def clear_run(run_dir: Path) -> None:
    """What ``--resume never`` removes before a run starts over: the earlier run's checkpoints and its avatar
    (``result.json``, ``model/``, ``val/``), which would otherwise stand for the new run until its end, and for good
    if it stops before. ``result.json`` first, the mark of a finished run; what cannot be removed is an error."""
    run_dir = Path(run_dir)
    (run_dir / "result.json").unlink(missing_ok=True)
    for folder in (run_dir / "model", run_dir / "val", run_dir / "checkpoints"):
        if folder.exists():
            shutil.rmtree(folder)
