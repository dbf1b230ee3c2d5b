"""Which frozen base an avatar was trained on, so it is never resumed or evaluated on another.

An avatar's ControlNet, feature planes and expression layers are trained against one frozen
base (UNet + VAE); on another base they render garbage that looks like a working model. So a
run records the base's content fingerprint (:func:`common.fingerprint.tree_fingerprint`; the
path alone says nothing once a folder is rewritten) in ``<run>/base.json`` once its model and
engine are built, before its first step, and the saved model repeats it in its ``config.json``
(``base_fingerprint``). Resuming a run whose checkpoints were trained on another base is refused
with :class:`BaseMismatch` (``--resume never`` retrains it on the new base); the evaluation
refuses a model whose base changed under it.
"""

from __future__ import annotations

import json
from pathlib import Path

from common.fingerprint import tree_fingerprint
from common.io import atomic_write_json

RECORD_FILE = "base.json"


class BaseMismatch(ValueError):
    """An avatar's training state belongs to another base than the one given now."""


def base_fingerprint(base_model: Path | str | None) -> str | None:
    """Content fingerprint of a base directory; None for a random (seeded) base."""
    return tree_fingerprint(base_model) if base_model is not None else None


def read_record(run_dir: Path) -> dict | None:
    """``<run>/base.json`` ({"path", "fingerprint"}), or None when the run never recorded one."""
    path = Path(run_dir) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BaseMismatch(f"{path} is unreadable ({e}): the base this avatar was trained on is unknown; "
                           "retrain it with --resume never") from None
    if not isinstance(record, dict) or "fingerprint" not in record:
        raise BaseMismatch(f"{path}: field 'fingerprint' is missing; retrain it with --resume never")
    return record


def write_record(run_dir: Path, base_model: Path | str | None, fingerprint: str | None) -> None:
    atomic_write_json(Path(run_dir) / RECORD_FILE,
                      {"path": str(base_model) if base_model is not None else None, "fingerprint": fingerprint})


def mismatch(run_dir: Path, fingerprint: str | None) -> str | None:
    """Why ``run_dir``'s training state cannot continue on a base with ``fingerprint`` (None:
    it can: no state yet, or the same base). A run with checkpoints but no record (trained
    before bases were recorded) counts as another base; a record without checkpoints or a model
    (a run that failed before its first checkpoint) binds nothing."""
    run_dir = Path(run_dir)
    if not any((run_dir / "checkpoints").glob("step_*")) and not (run_dir / "model").is_dir():
        return None
    record = read_record(run_dir)
    if record is None:
        return f"{run_dir} holds training state but no {RECORD_FILE}: the base it was trained on is unknown"
    if record["fingerprint"] != fingerprint:
        return (f"{run_dir} was trained on the base {record.get('path')} "
                f"(fingerprint {_short(record['fingerprint'])}), not on this one (fingerprint {_short(fingerprint)})")
    return None


def _short(fingerprint: str | None) -> str:
    return fingerprint[:12] if fingerprint else "none: a random base"
